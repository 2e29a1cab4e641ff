"""The safetensors container, read without torch: header parsing, content identity, safe writes.

A safetensors file is `u64 little-endian header length | JSON header | raw tensor bytes`. taskvec keeps
all its metadata as one JSON string under the header key ``"taskvec"``, so every file describes itself.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskvec.errors import FileFormatError, OutputExistsError

FORMAT = "taskvec"
FORMAT_VERSION = 1
META_KEY = "taskvec"

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Header:
    """The parsed header of a safetensors file; `meta` is taskvec's own metadata ({} for plain files)."""

    path: Path
    tensors: dict[str, TensorInfo]
    data_start: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """`model`, `vector`, or `state_dict` for a plain safetensors file."""
        return str(self.meta.get("kind", "state_dict"))

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def refuse_pickle(path: Path) -> None:
    """Refuse pickle-based checkpoints by name: loading them can run arbitrary code."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise FileFormatError(
            f"{path}: pickle checkpoints ({path.suffix}) are never loaded (unpickling can run code); "
            "save the state_dict with safetensors.torch.save_file and pass the .safetensors file"
        )


def _not_safetensors(path: Path, head: bytes, reason: str) -> FileFormatError:
    """The error for a file that fails the safetensors structure check, naming pickle/zip when it is one."""
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return FileFormatError(
            f"{path}: this is a pickle/zip torch checkpoint, which taskvec never loads; "
            "convert it with safetensors.torch.save_file"
        )
    return FileFormatError(f"{path}: {reason}")


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and validate a safetensors header; raise FileFormatError naming what is wrong."""
    p = Path(path)
    if p.is_dir():
        raise FileFormatError(f"{p}: is a directory, expected a .safetensors file")
    if not p.exists():
        raise FileFormatError(f"{p}: no such file")
    refuse_pickle(p)
    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _not_safetensors(p, raw, "not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise _not_safetensors(p, raw, f"not a safetensors file or truncated (header length {n}, file {size} B)")
        body = f.read(n)
        try:
            header = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _not_safetensors(p, raw, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{p}: corrupt safetensors header (not a JSON object)")
    raw_meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    try:
        for name, info in header.items():
            dtype, shape = info["dtype"], tuple(int(s) for s in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
            t = TensorInfo(dtype, shape, start, end)
            if dtype not in DTYPE_SIZES or end - start != t.numel * DTYPE_SIZES[dtype] or start < 0:
                raise FileFormatError(f"{p}: corrupt entry for tensor {name!r}")
            tensors[name] = t
            end_max = max(end_max, end)
    except (KeyError, TypeError, ValueError):
        raise FileFormatError(f"{p}: corrupt safetensors header") from None
    if end_max > data_len:
        raise FileFormatError(f"{p}: truncated (tensor data needs {end_max} B, file holds {data_len} B)")
    meta: dict[str, Any] = {}
    if META_KEY in raw_meta:
        try:
            meta = json.loads(raw_meta[META_KEY])
        except json.JSONDecodeError:
            raise FileFormatError(f"{p}: corrupt taskvec metadata") from None
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FileFormatError(
                f"{p}: taskvec format version {version!r} is newer than this taskvec reads "
                f"({FORMAT_VERSION}); upgrade taskvec"
            )
    return Header(p, tensors, 8 + n, meta)


def read_kind(path: str | os.PathLike[str], kind: str) -> Header:
    """Read a header and require a taskvec file of the given kind (`model` or `vector`)."""
    h = read_header(path)
    if h.kind != kind:
        what = "a plain safetensors state_dict" if h.kind == "state_dict" else f"a taskvec {h.kind}"
        raise FileFormatError(f"{h.path}: expected a taskvec {kind} file, got {what}")
    return h


class Digest:
    """Incremental content identity: sha256 over (name, dtype, shape, bytes) of tensors in sorted order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, dtype: str, shape: Sequence[int], data: bytes | memoryview) -> None:
        self._h.update(json.dumps([name, dtype, list(shape)]).encode())
        self._h.update(struct.pack("<Q", len(data)))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest(items: Iterable[tuple[str, str, Sequence[int], bytes | memoryview]]) -> str:
    """Content identity of tensors given in sorted name order."""
    d = Digest()
    for item in items:
        d.update(*item)
    return d.hexdigest()


def iter_raw(header: Header, names: Iterable[str] | None = None) -> Iterator[tuple[str, TensorInfo, bytes]]:
    """Yield raw little-endian bytes of tensors, one at a time, in the given (default: sorted) order."""
    with open(header.path, "rb") as f:
        for name in names if names is not None else sorted(header.tensors):
            t = header.tensors[name]
            f.seek(header.data_start + t.start)
            yield name, t, f.read(t.end - t.start)


def file_digest(header: Header) -> str:
    """Content identity of a file's tensors; equals `tensors.state_digest` of the same tensors."""
    return digest((name, t.dtype, t.shape, data) for name, t, data in iter_raw(header))


def key_difference(expected: Iterable[str], got: Iterable[str]) -> str | None:
    """`missing keys a, b; extra keys c` (at most 5 of each), or None when the key sets are equal."""
    want, have = set(expected), set(got)
    parts = []
    for what, keys in (("missing", sorted(want - have)), ("extra", sorted(have - want))):
        if keys:
            parts.append(f"{what} keys {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return "; ".join(parts) or None


def dump_meta(meta: dict[str, Any]) -> dict[str, str]:
    """The safetensors header metadata that carries taskvec metadata."""
    return {"format": "pt", META_KEY: json.dumps(meta, sort_keys=True)}


def check_output(path: str | os.PathLike[str], force: bool) -> Path:
    """Fail early, before any work, when the output exists and `force` is not set."""
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(f"{p}: exists; pass --force to overwrite it")
    if p.exists() and p.is_dir():
        raise OutputExistsError(f"{p}: is a directory")
    if not p.parent.exists():
        raise FileFormatError(f"{p.parent}: output directory does not exist")
    return p


def now() -> str:
    """The current UTC time, to the second, in ISO 8601: every timestamp taskvec records."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically, replacing any existing file."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds."""
    p = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        if p.exists() and not force:
            raise OutputExistsError(f"{p}: appeared while writing; pass --force to overwrite it")
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
