"""Where a registry's files live: the `Store` interface, and `register_store`, by which each backend
(one module under `registry/stores/`) declares the address scheme it serves.

A `Store` knows how to read a file, list files, give a local copy of a file, and apply one change
atomically (a lock and renames for a folder, a commit with `parent_commit` for the Hub). Everything
else (validation, trust, the index, the card) lives in `taskvec.registry.registry`, once.
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from taskvec.io.files import open_regular
from taskvec.registry.schema import RegistryError

# registry.json, index.json (about 25,000 vectors of 650 B), signatures: an index of empty entries this size
# parses within 0.5 GiB
MAX_TEXT_BYTES = 16 * 1024 * 1024
MAX_TENSOR_FILE_BYTES = 32 * 1024**3  # vectors and versions: a 7B-parameter float32 model is 28 GB


def read_small_text(path: str | os.PathLike[str], what: str) -> str:
    """A registry text file (JSON, signature) of at most `MAX_TEXT_BYTES`, never through a symbolic link."""
    with open_regular(path, follow_symlinks=False) as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise RegistryError(f"{what}: over {MAX_TEXT_BYTES} B; not a registry file", path=what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"{what}: not UTF-8 text; not a registry file", path=what) from None


class Reader(ABC):
    """Read access to one consistent state of a store (a folder under its lock, or one Hub commit)."""

    @abstractmethod
    def read_text(self, path: str) -> str | None:
        """The file's text, or None when it does not exist."""


Change = Callable[[Reader], "dict[str, bytes | Path] | None"]


class Store(ABC):
    """Where a registry's files live. Paths are POSIX, relative to the registry root."""

    address: str

    @abstractmethod
    def reader(self) -> Reader:
        """The current state, for reading."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the folder or repo exists (it may still hold no registry)."""

    @abstractmethod
    def create(self) -> None:
        """Create the empty folder or repo; no-op when it exists."""

    @abstractmethod
    def list_files(self, prefix: str) -> dict[str, str]:
        """Every file under `prefix`, with the ISO time it was last written (folder) or committed (Hub)."""

    def left_out(self, prefix: str) -> list[str]:
        """Why entries under `prefix` are not among `list_files` (a folder's symbolic links, never followed), one
        line each; none where the store holds only files."""
        return []

    @abstractmethod
    def copy_to(self, path: str, dest: Path, expected_sha256: str | None) -> str:
        """Copy the file at `path` to the new private file `dest`; return the sha256 of the bytes copied.

        Callers check that sha256 and then read only `dest`, so what was verified is what is used
        (`taskvec.io.files.private_copy`). A Hub store serves a cached download when its bytes still hash
        to `expected_sha256`, and downloads again otherwise."""

    @abstractmethod
    def update(self, change: Change, message: str) -> bool:
        """Atomically apply `change(reader)` (files to write; None for nothing); retried on conflict."""


Opener = TypeVar("Opener", bound=Callable[..., Store])


@dataclass(frozen=True)
class Backend:
    """A store scheme: `open(address, **options)` makes its `Store`; `options` are the `open_registry` keywords
    it takes (its keyword-only parameters); `describe` is how its addresses look, for help and errors."""

    scheme: str
    open: Callable[..., Store]
    options: frozenset[str]
    describe: str
    paths: bool


STORES: dict[str, Backend] = {}


def register_store(scheme: str, *, describe: str, paths: bool = False) -> Callable[[Opener], Opener]:
    """Declare `opener(address, *, option=...)` as the backend for `scheme://` addresses (and, with `paths`,
    for addresses with no scheme: folder paths). One module under `registry/stores/` per backend::

        @register_store("s3", describe="an S3 bucket (s3://BUCKET/PREFIX)")
        def open_s3(address: str, *, endpoint: str | None = None, token: str | None = None) -> S3Store: ...
    """

    def add(opener: Opener) -> Opener:
        if scheme in STORES or (paths and any(b.paths for b in STORES.values())):
            raise ValueError(f"registry store {scheme!r} is registered twice")
        options = frozenset(name for name, p in inspect.signature(opener).parameters.items()
                            if p.kind is p.KEYWORD_ONLY)
        STORES[scheme] = Backend(scheme, opener, options, describe, paths)
        return opener

    return add
