"""A registry in a folder (local disk or a shared drive), addressed by its path or `file:///ABSOLUTE/PATH`:
a file lock around each change, atomic renames.

Every file is written to a temporary name in its own folder and renamed into place, vectors and versions
before the records (`index.json`, `registry.json`), so a reader never sees a half-written file and a record
never names a missing file. New files get the mode the umask gives, so colleagues on a shared drive can
read them. Symbolic links inside the folder are never followed: what a registry holds is what is in its folder.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import stat
from pathlib import Path

from filelock import FileLock, Timeout

from taskvec.io.files import atomic_output, make_folder, private_copy
from taskvec.registry.schema import CARD_FILE, INDEX_FILE, REGISTRY_FILE, RegistryError
from taskvec.registry.store import MAX_TENSOR_FILE_BYTES, Change, Reader, Store, read_small_text, register_store

LOCK_FILE = ".taskvec.lock"
LOCK_TIMEOUT_S = 120.0


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


def _inside(root: Path, path: str, address: str) -> Path:
    """`root/path`, refused when it leaves the folder (`..`, an absolute path, a symbolic link on the way)."""
    p = root / path
    try:
        p.parent.resolve(strict=False).relative_to(root.resolve())
    except ValueError:
        raise RegistryError(f"{address}/{path}: leaves the registry folder; refused", path=path) from None
    if ".." in Path(path).parts or Path(path).is_absolute():
        raise RegistryError(f"{address}/{path}: leaves the registry folder; refused", path=path)
    return p


class _FolderReader(Reader):
    def __init__(self, root: Path, address: str) -> None:
        self.root, self.address = root, address

    def read_text(self, path: str) -> str | None:
        p = _inside(self.root, path, self.address)
        if not os.path.lexists(p):
            return None
        return read_small_text(p, f"{self.address}/{path}")


def _write_atomic(target: Path, content: bytes | Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target, force=True) as tmp:
        if isinstance(content, Path):
            shutil.copyfile(content, tmp)
        else:
            tmp.write_bytes(content)


class FolderStore(Store):
    """A registry rooted at a local directory."""

    def __init__(self, root: str | os.PathLike[str], address: str | None = None) -> None:
        self.root = Path(root)
        self.address = address or str(root)

    def reader(self) -> Reader:
        return _FolderReader(self.root, self.address)

    def exists(self) -> bool:
        """Whether the folder exists; a file or a broken link at its path is refused."""
        if (self.root.exists() or self.root.is_symlink()) and not self.root.is_dir():
            raise RegistryError(f"{self.address}: a file or a broken link, not a registry folder")
        return self.root.is_dir()

    def create(self) -> None:
        if not self.exists():
            make_folder(self.root)

    def _walk(self, prefix: str) -> tuple[dict[str, str], list[str]]:
        """(regular files under `prefix` with their times, the other entries), not following symbolic links (to
        files or folders) nor hidden names."""
        found, other = {}, []
        for folder, dirs, files in os.walk(_inside(self.root, prefix, self.address), followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            other += [Path(folder, d).relative_to(self.root).as_posix() for d in dirs if Path(folder, d).is_symlink()]
            for name in sorted(files):
                st = os.lstat(os.path.join(folder, name))
                rel = Path(folder, name).relative_to(self.root).as_posix()
                if not name.startswith("."):
                    if stat.S_ISREG(st.st_mode):
                        found[rel] = _iso(st.st_mtime)
                    else:
                        other.append(rel)
        return found, other

    def list_files(self, prefix: str) -> dict[str, str]:
        """Regular files under `prefix`, not following symbolic links (to files or folders) nor hidden names."""
        return self._walk(prefix)[0]

    def left_out(self, prefix: str) -> list[str]:
        return [f"{self.address}/{rel}: a symbolic link or special file, never followed; left out"
                for rel in sorted(self._walk(prefix)[1])]

    def copy_to(self, path: str, dest: Path, expected_sha256: str | None) -> str:
        p = _inside(self.root, path, self.address)
        if not os.path.lexists(p):
            raise RegistryError(
                f"{self.address}/{path}: listed in the index but missing; run `taskvec registry reindex`", path=path
            )
        return private_copy(p, dest, follow_symlinks=False, max_bytes=MAX_TENSOR_FILE_BYTES)

    def update(self, change: Change, message: str) -> bool:
        if not self.root.is_dir():
            raise RegistryError(f"{self.address}: no such registry directory")
        try:
            with FileLock(str(self.root / LOCK_FILE), timeout=LOCK_TIMEOUT_S):
                files = change(_FolderReader(self.root, self.address))
                if not files:
                    return False
                # the records (and card) last: they must never name a file that is not yet in place
                for path in sorted(files, key=lambda p: p in (REGISTRY_FILE, INDEX_FILE, CARD_FILE)):
                    _write_atomic(_inside(self.root, path, self.address), files[path])
        except Timeout:
            raise RegistryError(
                f"{self.address}: locked by another process for over {LOCK_TIMEOUT_S:.0f} s; "
                f"if none is running, remove {self.root / LOCK_FILE}"
            ) from None
        except PermissionError as e:
            raise RegistryError(f"{self.address}: cannot write ({e.strerror}: {e.filename})") from None
        return True


@register_store("file", describe="a folder (./registry, file:///mnt/share/x)", paths=True)
def open_folder(address: str) -> FolderStore:
    """The folder at a path (`~` expanded) or a `file://` URL with an absolute path."""
    path = address
    if address.startswith("file://"):
        path = address.removeprefix("file://")
        if not path.startswith("/"):
            raise RegistryError(f"{address}: a file URL needs an absolute path (file:///mnt/share/registry)")
    return FolderStore(Path(path).expanduser(), address)
