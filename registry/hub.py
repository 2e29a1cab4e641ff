"""A registry in a Hugging Face Hub model repo, through `huggingface_hub.HfApi`.

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

from taskvec.registry.base import Change, IntegrityError, Reader, RegistryError, Store, read_small_text

from taskvec.io.files import private_copy

COMMIT_ATTEMPTS = 8
RETRY_STATUS = {409, 412, 429, 500, 502, 503, 504}  # conflict (412: parent moved, 409: repo busy) or transient


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
    """Turn huggingface_hub and transport errors into one-line RegistryErrors (never echoing the token).

    A missing file (`RemoteEntryNotFoundError`) passes through for the caller to handle."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except RemoteEntryNotFoundError:
        raise
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


class _CommitReader(Reader):
    def __init__(self, store: HubStore, commit: str) -> None:
        self.store, self.commit = store, commit

    def read_text(self, path: str) -> str | None:
        from huggingface_hub.errors import RemoteEntryNotFoundError

        try:
            local = self.store.download(path, self.commit)
        except RemoteEntryNotFoundError:
            return None
        return read_small_text(local, f"{self.store.address}/{path}")


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

    def download(self, path: str, commit: str) -> Path:
        """`path` at `commit` into the download folder of the cache (huggingface_hub checks size and etag)."""
        if path.startswith("/") or ".." in path.split("/"):
            raise RegistryError(f"{self.address}/{path}: leaves the repository; refused", path=path)
        with self.errors():
            return Path(self.api.hf_hub_download(
                self.repo_id, path, revision=commit, local_dir=self.cache / "downloads" / self.repo_id
            ))

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
        from huggingface_hub.errors import RemoteEntryNotFoundError

        cached = self.cache / "vectors" / f"{expected_sha256}.safetensors"
        if expected_sha256 is not None and cached.is_file():
            if private_copy(cached, dest) == expected_sha256:
                return expected_sha256
            dest.unlink()
            cached.unlink()  # a damaged cache entry: download it again
        try:  # vectors are never removed: the head holds every file an index ever named
            local = self.download(path, self.head())
        except RemoteEntryNotFoundError:
            raise RegistryError(f"{self.address}/{path}: listed in the index but missing from the repo") from None
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
