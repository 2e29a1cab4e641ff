"""A registry in a Hugging Face Hub model repo (`hf://ORG/REPO`), through `huggingface_hub.HfApi`.

The client gets an explicit endpoint (`HF_ENDPOINT`, default huggingface.co) and token (`HF_TOKEN` or
`hf auth login`, through huggingface_hub's own lookup); the token is never printed or logged. Each
change is one commit made with `parent_commit` = the head it was computed from: if someone else
committed in between, the Hub refuses it (412) and the change is recomputed on the new head. Files
are uploaded before the commit that names them, so an interrupted push publishes nothing.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taskvec.errors import first_line
from taskvec.io.files import private_copy
from taskvec.registry.schema import IntegrityError, RegistryError
from taskvec.registry.store import (
    MAX_TENSOR_FILE_BYTES,
    MAX_TEXT_BYTES,
    Change,
    Reader,
    Store,
    read_small_text,
    register_store,
)

COMMIT_ATTEMPTS = 8
RETRY_STATUS = {409, 412, 429, 500, 502, 503, 504}  # conflict (412: parent moved, 409: repo busy) or transient


def parse_repo(address: str) -> str:
    """`ORG/REPO` from `hf://ORG/REPO`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    repo_id = address.removeprefix("hf://").strip("/")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise RegistryError(f"{address}: a Hub repo is hf://ORG/REPO (a model repo)", path=address)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise RegistryError(f"{address}: not a Hub repo name ({first_line(e)})", path=address) from None
    return repo_id


def resolve_endpoint(endpoint: str | None) -> str:
    """`endpoint`, else `HF_ENDPOINT` (read now, not at import), else huggingface_hub's default."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def default_cache() -> Path:
    return Path(os.environ.get("TASKVEC_CACHE", Path.home() / ".cache" / "taskvec"))


def make_api(endpoint: str | None, token: str | None) -> Any:
    from huggingface_hub import HfApi, get_token

    from taskvec import __version__

    return HfApi(
        endpoint=resolve_endpoint(endpoint), token=token or get_token(),
        library_name="taskvec", library_version=__version__,
    )


@contextlib.contextmanager
def hub_errors(address: str, endpoint: str) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one-line RegistryErrors (never echoing the token)."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RepositoryNotFoundError:
        raise RegistryError(
            f"{address}: repository not found on {endpoint}, or your token may not access it; check the name "
            "and log in with `hf auth login` or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise RegistryError(f"{address}: revision not found; check `revision`", field="revision") from None
    except HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise RegistryError(
                f"{address}: access denied ({status}); your token needs write access for push/init "
                "(`hf auth login` or HF_TOKEN)"
            ) from None
        detail = " ".join((e.server_message or str(e).splitlines()[0]).split())[:200]
        raise RegistryError(f"{address}: the Hub answered {status} ({detail}); nothing was published") from None
    except (LocalEntryNotFoundError, httpx2.TransportError, ConnectionError) as e:
        raise RegistryError(
            f"{address}: cannot reach {endpoint} ({type(e).__name__}); check the network or HF_ENDPOINT and retry"
        ) from None
    except RuntimeError as e:  # huggingface_hub wraps a failed LFS upload (after its own retries)
        if not isinstance(e.__cause__, (HfHubHTTPError, httpx2.TransportError, ConnectionError)):
            raise
        cause = e.__cause__
        reason = cause.response.status_code if isinstance(cause, HfHubHTTPError) else type(cause).__name__
        raise RegistryError(
            f"{address}: upload failed after retries ({reason}); nothing was published; try again"
        ) from None


def size_guard(declared: int, what: str) -> type:
    """A progress bar class for `hf_hub_download` that stops a download past the `declared` size.

    huggingface_hub compares the size only once the whole body is on disk (`http_get`), but it hands each
    chunk to the bar's `update` before writing it, so a server that sends more than it declared is cut off
    here and huggingface_hub deletes the partial file."""
    from huggingface_hub.utils import tqdm

    class SizeGuard(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.received = kwargs.get("initial", 0)  # counted here: a disabled bar does not count

        def update(self, n: float | None = 1) -> bool | None:
            self.received += n or 0
            if self.received > declared:
                raise RegistryError(f"{what}: the Hub sent more than the {declared} B it declared; "
                                    "download stopped and nothing was kept", path=what)
            return super().update(n)

    return SizeGuard


class _CommitReader(Reader):
    def __init__(self, store: HubStore, commit: str) -> None:
        self.store, self.commit = store, commit

    def read_text(self, path: str) -> str | None:
        local = self.store.download(path, self.commit, MAX_TEXT_BYTES)
        return None if local is None else read_small_text(local, f"{self.store.address}/{path}")


class HubStore(Store):
    """A registry in the Hub model repo `repo_id` (branch `revision`, default main)."""

    def __init__(
        self, repo_id: str, revision: str | None = None, endpoint: str | None = None, token: str | None = None,
        private: bool = True, cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.repo_id, self.revision, self.private = repo_id, revision, private
        self.address = f"hf://{repo_id}" + (f" (revision {revision})" if revision else "")
        self.api = make_api(endpoint, token)
        self.cache = Path(cache_dir) if cache_dir is not None else default_cache()
        self._commit: str | None = None
        self.last_commit: str | None = None  # the commit the last `update` made

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return hub_errors(self.address, self.api.endpoint)

    def head(self) -> str:
        with self.errors():
            return str(self.api.repo_info(self.repo_id, revision=self.revision).sha)

    def download(self, path: str, commit: str, limit: int) -> Path | None:
        """`path` at `commit` into the download folder of the cache; None when the commit has no such file.

        The size the Hub declares is checked against `limit` before anything is downloaded, and a download
        longer (`size_guard`) or shorter than declared is refused and not kept."""
        from huggingface_hub.hf_api import RepoFile

        what = f"{self.address}/{path}"
        if path.startswith("/") or ".." in path.split("/"):
            raise RegistryError(f"{what}: leaves the repository; refused", path=path)
        with self.errors():
            info = self.api.get_paths_info(self.repo_id, [path], revision=commit)
            file = next((f for f in info if isinstance(f, RepoFile) and f.path == path), None)
            if file is None:
                return None
            if type(file.size) is not int or file.size < 0:
                raise RegistryError(f"{what}: the Hub declares no valid size for it; refused", path=what)
            if file.size > limit:
                raise RegistryError(f"{what}: {file.size} B on the Hub, over the {limit} B limit for this "
                                    "file; refused before download", path=what, expected=limit, got=file.size)
            try:
                return Path(self.api.hf_hub_download(
                    self.repo_id, path, revision=commit, local_dir=self.cache / "downloads" / self.repo_id,
                    tqdm_class=size_guard(file.size, what),
                ))
            except OSError as e:  # huggingface_hub's check once the body is in: fewer bytes than declared
                if not str(e).startswith("Consistency check failed"):
                    raise
                raise RegistryError(f"{what}: the Hub sent fewer bytes than the {file.size} B it declared; "
                                    "nothing was kept; try again", path=what) from None

    def reader(self) -> Reader:
        self._commit = self.head()
        return _CommitReader(self, self._commit)

    def exists(self) -> bool:
        from huggingface_hub.errors import RepositoryNotFoundError

        with self.errors():
            try:
                self.api.repo_info(self.repo_id)
            except RepositoryNotFoundError:
                return False
        return True

    def create(self) -> None:
        with self.errors():
            self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)

    def list_files(self, prefix: str) -> dict[str, str]:
        from huggingface_hub.hf_api import RepoFile

        commit = self._commit or self.head()
        with self.errors():
            tree = self.api.list_repo_tree(
                self.repo_id, path_in_repo=prefix, recursive=True, expand=True, revision=commit
            )
            return {
                f.path: f.last_commit.date.isoformat(timespec="seconds") if f.last_commit else ""
                for f in tree if isinstance(f, RepoFile)
            }

    def copy_to(self, path: str, dest: Path, expected_sha256: str | None) -> str:
        cached = self.cache / "vectors" / f"{expected_sha256}.safetensors"
        if expected_sha256 is not None and cached.is_file():
            if private_copy(cached, dest) == expected_sha256:
                return expected_sha256
            dest.unlink()
            cached.unlink()  # a damaged cache entry: download it again
        local = self.download(path, self.head(), MAX_TENSOR_FILE_BYTES)  # the head holds every file ever indexed
        if local is None:
            raise RegistryError(f"{self.address}/{path}: listed in the index but missing from the repo")
        actual = private_copy(local, dest)
        if expected_sha256 is None:
            return actual
        if actual != expected_sha256:
            local.unlink()
            dest.unlink()
            raise IntegrityError(
                f"{self.address}/{path}: downloaded file has sha256 {actual[:12]}, the registry recorded "
                f"{expected_sha256[:12]}; the download was corrupted and was not kept; try again"
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, cached)
        return actual

    def update(self, change: Change, message: str) -> bool:
        import httpx2
        from huggingface_hub import CommitOperationAdd
        from huggingface_hub.errors import HfHubHTTPError

        last = ""
        for attempt in range(COMMIT_ATTEMPTS):
            commit = self.head()
            files = change(_CommitReader(self, commit))
            if not files:
                return False
            ops = [
                CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(c) if isinstance(c, Path) else c)
                for p, c in files.items()
            ]
            with self.errors():
                try:
                    info = self.api.create_commit(
                        self.repo_id, ops, commit_message=message, parent_commit=commit, revision=self.revision
                    )
                    self.last_commit = str(info.oid)
                    return True
                except HfHubHTTPError as e:
                    if e.response.status_code not in RETRY_STATUS:
                        raise
                    last = f"{e.response.status_code} {e.server_message or ''}".strip()
                except (httpx2.TransportError, ConnectionError) as e:
                    # the commit may or may not have landed: recompute on the new head (changes are idempotent)
                    last = type(e).__name__
            time.sleep(min(8.0, 0.2 * 2**attempt) * (0.5 + random.random()))
        raise RegistryError(
            f"{self.address}: could not commit after {COMMIT_ATTEMPTS} attempts (last: {last}); "
            "nothing was published; try again"
        )


@register_store("hf", describe="a Hub model repo (hf://ORG/REPO)")
def open_hub(
    address: str, *, revision: str | None = None, endpoint: str | None = None, token: str | None = None,
    private: bool = True, cache_dir: str | os.PathLike[str] | None = None,
) -> HubStore:
    """The Hub model repo `hf://ORG/REPO`, on branch `revision` (default main) at `endpoint` with `token`;
    `private` applies to a repo it creates, `cache_dir` holds downloads."""
    return HubStore(parse_repo(address), revision, endpoint, token, private, cache_dir)
