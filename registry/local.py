"""A registry in a folder (local disk or a shared drive): a file lock around each change, atomic renames.

Every file is written to a temporary name in its own folder and renamed into place, vectors before
the index, so a reader never sees a half-written file and an index never names a missing vector.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path

from filelock import FileLock, Timeout
from taskvec.registry.base import CARD_FILE, INDEX_FILE, Change, Reader, RegistryError, Store

from taskvec.io.files import atomic_output

LOCK_FILE = ".taskvec.lock"
LOCK_TIMEOUT_S = 120.0


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")


class _FolderReader(Reader):
    def __init__(self, root: Path) -> None:
        self.root = root

    def read_text(self, path: str) -> str | None:
        p = self.root / path
        return p.read_text() if p.is_file() else None


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
        return _FolderReader(self.root)

    def exists(self) -> bool:
        return self.root.is_dir()

    def create(self) -> None:
        if not self.root.parent.is_dir():
            raise RegistryError(f"{self.root.parent}: no such directory; create it first")
        self.root.mkdir(exist_ok=True)

    def list_files(self, prefix: str) -> dict[str, str]:
        return {
            p.relative_to(self.root).as_posix(): _iso(p.stat().st_mtime)
            for p in sorted((self.root / prefix).rglob("*")) if p.is_file() and not p.name.startswith(".")
        }

    def local_copy(self, path: str, file_sha256: str | None) -> Path:
        p = self.root / path
        if not p.is_file():
            raise RegistryError(
                f"{self.address}/{path}: listed in the index but missing; run `taskvec registry reindex`"
            )
        return p

    def update(self, change: Change, message: str) -> bool:
        if not self.root.is_dir():
            raise RegistryError(f"{self.address}: no such registry directory")
        try:
            with FileLock(str(self.root / LOCK_FILE), timeout=LOCK_TIMEOUT_S):
                files = change(_FolderReader(self.root))
                if not files:
                    return False
                # the index (and card) last: it must never name a file that is not yet in place
                for path in sorted(files, key=lambda p: p in (INDEX_FILE, CARD_FILE)):
                    _write_atomic(self.root / path, files[path])
        except Timeout:
            raise RegistryError(
                f"{self.address}: locked by another process for over {LOCK_TIMEOUT_S:.0f} s; "
                f"if none is running, remove {self.root / LOCK_FILE}"
            ) from None
        except PermissionError as e:
            raise RegistryError(f"{self.address}: cannot write ({e.strerror}: {e.filename})") from None
        return True
