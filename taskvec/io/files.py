"""The safetensors container, read without torch: header parsing, content identity, safe writes.

A safetensors file is `u64 little-endian header length | JSON header | raw tensor bytes`. taskvec keeps
all its metadata as one JSON string under the header key ``"taskvec"``, so every file describes itself.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import socket
import stat
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from taskvec.errors import FileFormatError, OutputExistsError
from taskvec.io.schema import FORMAT_VERSION, ModelHeader, VectorHeader, is_count, parse_header

META_KEY = "taskvec"

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar"}
MAX_HEADER_BYTES = 8 * 1024 * 1024  # a timm model's header is a few KB; this bounds the JSON parse's memory


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
    """The parsed header of a safetensors file; `meta` is taskvec's own metadata as JSON ({} for plain files).

    A header read by `read_kind` also holds it typed: `model` for a model file, `vector` for a vector."""

    path: Path
    tensors: dict[str, TensorInfo]
    data_start: int
    meta: dict[str, Any] = field(default_factory=dict)
    size: int = 0  # the file's size in bytes when the header was read
    typed: ModelHeader | VectorHeader | None = None

    @property
    def kind(self) -> str:
        """`model`, `vector`, or `state_dict` for a plain safetensors file."""
        return str(self.meta.get("kind", "state_dict"))

    @property
    def model(self) -> ModelHeader:
        """The typed header of a model file."""
        if not isinstance(self.typed, ModelHeader):
            self.typed = read_typed(self, "model")
        return self.typed  # type: ignore[return-value]

    @property
    def vector(self) -> VectorHeader:
        """The typed header of a vector file."""
        if not isinstance(self.typed, VectorHeader):
            self.typed = read_typed(self, "vector")
        return self.typed  # type: ignore[return-value]


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


@contextlib.contextmanager
def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Iterator[BinaryIO]:
    """Open a regular file for reading, refusing FIFOs, devices, sockets and directories (which would block
    or never end) and, with `follow_symlinks=False`, a symbolic link. Everything read from the returned file
    comes from that one file, whatever happens to its path meanwhile."""
    p = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_symlinks else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise FileFormatError(f"{p}: no such file", path=p) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileFormatError(f"{p}: is a symbolic link, which is not followed here", path=p) from None
        raise FileFormatError(f"{p}: cannot open ({e.strerror})", path=p) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise FileFormatError(f"{p}: is {what}; give a .safetensors file", path=p)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        yield f


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


def _tensor_info(p: Path, name: str, info: Any) -> TensorInfo:
    """One header entry, checked as strictly as the format: dtype, non-negative shape, offsets fitting it."""
    ok = isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}
    if ok:
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        ok = (isinstance(dtype, str) and dtype in DTYPE_SIZES and isinstance(shape, list)
              and all(map(is_count, shape)) and isinstance(offsets, list) and len(offsets) == 2
              and all(map(is_count, offsets)))
    if not ok:
        raise FileFormatError(f"{p}: corrupt entry for tensor {name!r}", path=p, field=name)
    t = TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])
    if t.end - t.start != t.numel * DTYPE_SIZES[dtype]:
        raise FileFormatError(
            f"{p}: corrupt entry for tensor {name!r} (shape {shape} of {dtype} does not fit offsets {offsets})",
            path=p, field=name,
        )
    return t


def _check_layout(p: Path, tensors: dict[str, TensorInfo], data_len: int) -> None:
    """Tensor data must tile the data section exactly: no overlaps, no holes, nothing beyond or after it."""
    pos = 0
    for name, t in sorted(tensors.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if t.start != pos:
            what = "overlaps the tensor before it" if t.start < pos else "leaves a gap before it"
            raise FileFormatError(f"{p}: corrupt header: tensor {name!r} {what}", path=p, field=name)
        pos = t.end
    if pos > data_len:
        raise FileFormatError(f"{p}: truncated (tensor data needs {pos} B, file holds {data_len} B)", path=p)
    if pos < data_len:
        raise FileFormatError(f"{p}: {data_len - pos} bytes after the last tensor; not a clean safetensors file",
                              path=p)


def _taskvec_meta(p: Path, raw_meta: Any) -> dict[str, Any]:
    if not isinstance(raw_meta, dict) or not all(isinstance(v, str) for v in raw_meta.values()):
        raise FileFormatError(f"{p}: corrupt safetensors header (__metadata__ must map names to strings)", path=p)
    if META_KEY not in raw_meta:
        return {}
    try:
        meta = json.loads(raw_meta[META_KEY], object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # nested deeper than the parser's stack
        raise FileFormatError(f"{p}: corrupt taskvec metadata", path=p) from None
    if not isinstance(meta, dict):
        raise FileFormatError(f"{p}: corrupt taskvec metadata (not a JSON object)", path=p)
    version: Any = meta.get("format_version")
    if not (is_count(version) and version >= 1):
        raise FileFormatError(f"{p}: taskvec format_version must be a whole number >= 1, got {version!r}",
                              path=p, field="format_version")
    if version > FORMAT_VERSION:
        raise FileFormatError(
            f"{p}: taskvec format version {version!r} is newer than this taskvec reads "
            f"({FORMAT_VERSION}); upgrade taskvec", path=p, field="format_version",
        )
    return meta


def read_header(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Header:
    """Parse and validate a safetensors header; raise FileFormatError naming what is wrong.

    As strict as the format: a regular file, a header of at most `MAX_HEADER_BYTES`, no duplicate names,
    tensor data that tiles the data section exactly, and taskvec metadata with a valid `format_version`."""
    p = Path(path)
    refuse_pickle(p)
    with open_regular(p, follow_symlinks=follow_symlinks) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise _not_safetensors(p, raw, "not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES and 8 + n <= size:
            raise _not_safetensors(p, raw, f"header of {n} B is over the {MAX_HEADER_BYTES} B limit")
        if 8 + n > size:  # a header longer than any this format writes: text or other bytes, not a cut file
            what = "not a safetensors file" if n > MAX_HEADER_BYTES else "a truncated safetensors file (or not one)"
            raise _not_safetensors(p, raw, f"{what}: its first 8 bytes give a header of {n:,} B in a file of "
                                           f"{size:,} B")
        body = f.read(n)
    try:
        header = json.loads(body, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _not_safetensors(p, raw, f"corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{p}: corrupt safetensors header (not a JSON object)", path=p)
    meta = _taskvec_meta(p, header.pop("__metadata__", {}))
    tensors = {name: _tensor_info(p, name, info) for name, info in header.items()}
    _check_layout(p, tensors, size - 8 - n)
    return Header(p, tensors, 8 + n, meta, size)


def read_kind(path: str | os.PathLike[str], kind: str) -> Header:
    """Read a header and require a taskvec file of the given kind (`model`, `vector` or `checkpoint`); a model's
    or vector's metadata is validated and typed once (`Header.model`, `Header.vector`)."""
    h = read_header(path)
    if kind in ("model", "vector"):
        h.typed = read_typed(h, kind)
    elif h.kind != kind:
        raise _wrong_kind(h, kind)
    return h


def read_typed(h: Header, kind: str) -> ModelHeader | VectorHeader:
    """The typed metadata of `h`, which must be a taskvec file of `kind` (`model` or `vector`)."""
    if h.kind != kind:
        raise _wrong_kind(h, kind)
    return parse_header(h.meta, kind, h.path)


def _wrong_kind(h: Header, kind: str) -> FileFormatError:
    what = "a plain safetensors state_dict" if h.kind == "state_dict" else f"a taskvec {h.kind}"
    return FileFormatError(f"{h.path}: expected a taskvec {kind} file, got {what}", path=h.path)


class Digest:
    """Incremental content identity: sha256 over (name, dtype, shape, bytes) of tensors in sorted order."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def update(self, name: str, dtype: str, shape: Sequence[int], data: bytes | memoryview) -> None:
        self.begin(name, dtype, shape, len(data))
        self._h.update(data)

    def begin(self, name: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        """Start a tensor whose `nbytes` of data follow in one or more `feed` calls."""
        self._h.update(json.dumps([name, dtype, list(shape)]).encode())
        self._h.update(struct.pack("<Q", nbytes))

    def feed(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest(items: Iterable[tuple[str, str, Sequence[int], bytes | memoryview]]) -> str:
    """Content identity of tensors given in sorted name order."""
    d = Digest()
    for item in items:
        d.update(*item)
    return d.hexdigest()


SCAN_CHUNK = 1 << 24  # bytes; a multiple of every dtype size


def scan(header: Header, visit: Callable[[str, TensorInfo, bytes], None] | None = None) -> str:
    """Read every tensor once, in sorted order and pieces of at most `SCAN_CHUNK` bytes (whole elements),
    calling `visit(name, info, piece)`; return the content identity. Memory stays bounded whatever the file."""
    d = Digest()
    with open_regular(header.path) as f:
        for name in sorted(header.tensors):
            t = header.tensors[name]
            d.begin(name, t.dtype, t.shape, t.end - t.start)
            f.seek(header.data_start + t.start)
            left = t.end - t.start
            while left:
                piece = f.read(min(left, SCAN_CHUNK))
                if not piece:
                    raise FileFormatError(f"{header.path}: truncated while reading {name}", path=header.path)
                left -= len(piece)
                d.feed(piece)
                if visit is not None:
                    visit(name, t, piece)
    return d.hexdigest()


def file_digest(header: Header) -> str:
    """Content identity of a file's tensors; equals `tensors.state_digest` of the same tensors."""
    return scan(header)


def key_difference(expected: Iterable[str], got: Iterable[str]) -> str | None:
    """`missing keys a, b; extra keys c` (at most 5 of each), or None when the key sets are equal."""
    want, have = set(expected), set(got)
    parts = []
    for what, keys in (("missing", sorted(want - have)), ("extra", sorted(have - want))):
        if keys:
            parts.append(f"{what} keys {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
    return "; ".join(parts) or None


Meta = dict[str, Any] | ModelHeader | VectorHeader


def dump_meta(meta: Meta) -> dict[str, str]:
    """The safetensors header metadata that carries taskvec metadata (a typed header, or a checkpoint's JSON)."""
    raw = meta if isinstance(meta, dict) else meta.to_json()
    return {"format": "pt", META_KEY: json.dumps(raw, sort_keys=True)}


def check_output(path: str | os.PathLike[str], force: bool,
                 inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Fail early, before any work, when the output exists and `force` is not set, or when it is one of the
    command's `inputs` (even with `force`: replacing an input with the result loses the input)."""
    p = Path(path)
    if p.exists():
        for i in inputs:
            if Path(i).exists() and os.path.samefile(p, i):
                raise OutputExistsError(f"{p}: is an input of this command ({i}); write the result elsewhere",
                                        path=p)
    if p.exists() and not force:
        raise OutputExistsError(f"{p}: exists; pass `force` to overwrite it", path=p)
    if p.exists() and p.is_dir():
        raise OutputExistsError(f"{p}: is a directory")
    _nearest_folder(p.parent, p)  # missing folders are created when the file is written
    return p


def _nearest_folder(folder: Path, target: Path) -> Path:
    """The nearest existing one of `folder` and its parents; refused when it is not a directory."""
    found = next(a for a in (folder, *folder.parents) if a.exists())
    if not found.is_dir():
        raise FileFormatError(f"{found}: is not a directory, so {target} cannot be written there", path=target)
    return found


def make_folder(path: str | os.PathLike[str]) -> Path:
    """`path` as a folder, created with any missing parents (an existing file on the way is refused)."""
    p = Path(path)
    _nearest_folder(p, p)
    p.mkdir(parents=True, exist_ok=True)
    return p


def now() -> str:
    """The current UTC time, to the second, in ISO 8601: every timestamp taskvec records."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


Fields = dict[str, type | tuple[type, ...]]  # a record's fields (dotted names reach into nested objects) and types


def read_record(path: Path, fields: Fields, remedy: str) -> dict[str, Any]:
    """The JSON object taskvec wrote in `path`, refused in one line naming the file and ending in `remedy` unless
    each of `fields` has its type (a missing field is None)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise FileFormatError(f"{path}: cannot be read ({e}); {remedy}", path=path) from e
    wrong = [name for name, kind in fields.items() if not isinstance(_field(record, name), kind)]
    problem = ("not a JSON object" if not isinstance(record, dict) else
               f"{', '.join(wrong)} missing or of the wrong type" if wrong else "")
    if problem:
        raise FileFormatError(f"{path}: not what taskvec writes there ({problem}); {remedy}", path=path)
    return record


def _field(record: Any, name: str) -> Any:
    for key in name.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically, replacing any existing file."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def temp_beside(target: str | os.PathLike[str]) -> Path:
    """A new empty file `.NAME.HOST-PID-RANDOM.tmp` beside `target`, with the mode the umask gives new files.

    Temporary files of `target` left by a process of this host that no longer runs (killed mid-write) are
    removed first, so an interrupted write never leaves debris for good."""
    p = Path(target)
    host = socket.gethostname().replace(".", "_").replace("-", "_") or "host"
    prefix = f".{p.name}."
    for old in p.parent.glob(f"{glob_escape(prefix)}*.tmp"):
        owner = old.name[len(prefix):-len(".tmp")].split("-")
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _alive(int(owner[1])):
            with contextlib.suppress(OSError):
                old.unlink()
    while True:
        tmp = p.parent / f"{prefix}{host}-{os.getpid()}-{os.urandom(4).hex()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def glob_escape(text: str) -> str:
    """`text` with glob wildcards escaped, for a `Path.glob` pattern."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def private_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str], *, follow_symlinks: bool = False,
                 max_bytes: int | None = None) -> str:
    """Copy `src` to a new file `dest` (mode 0600) and return the sha256 of exactly the bytes copied.

    The way to verify what you read and read what you verified: the hash and the copy come from one open
    file, so a file swapped or rewritten at `src` after the check cannot reach the caller, who reads `dest`.
    Refuses anything but a regular file (and a symbolic link unless `follow_symlinks`), and a file of over
    `max_bytes`, by its size before copying and by the bytes read while copying (it may grow meanwhile)."""
    h = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    done = False
    try:
        with os.fdopen(fd, "wb") as out, open_regular(src, follow_symlinks=follow_symlinks) as f:
            size, copied = os.fstat(f.fileno()).st_size, 0
            for block in iter(lambda: f.read(1 << 20), b""):
                copied += len(block)
                if max_bytes is not None and max(size, copied) > max_bytes:
                    raise FileFormatError(f"{src}: over the {max_bytes} B limit; refused", path=src)
                h.update(block)
                out.write(block)
        done = True
    finally:
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(dest)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (its missing folders created); rename it into place only if the
    block succeeds."""
    p = check_output(path, force)
    make_folder(p.parent)
    tmp = temp_beside(p)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        if p.exists() and not force:
            raise OutputExistsError(f"{p}: appeared while writing; pass `force` to overwrite it", path=p)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
