"""Reading vectors: one open file per vector, and the bytes used are the bytes hashed. Each read copies bytes
into private memory and queues that same memory for its file's sha256 on helper threads (hashlib releases the
GIL), so a vector whose bytes do not match its header fails the merge before anything is written."""

from __future__ import annotations

import errno
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from taskvec.errors import FileFormatError, TaskvecError
from taskvec.io.files import DTYPE_SIZES, Digest, Header
from taskvec.io.layout import factor_names
from taskvec.io.tensors_np import as_float32, as_float64
from taskvec.merging.methods import Array

CHUNK_ELEMENTS = 1 << 22  # consensus methods hold at most this many values of all vectors at once (16 MB)
HASH_LANES = 2  # threads hashing (each file's bytes in order on one lane)
IN_FLIGHT_BYTES = 256 << 20  # read but not yet hashed: at most this, and at most one vector's size


class Hasher:
    """sha256 on helper threads, overlapping the reading and summing; at most IN_FLIGHT_BYTES wait for it."""

    def __init__(self, max_bytes: int = IN_FLIGHT_BYTES) -> None:
        self.max_bytes = max_bytes
        self.lanes = [ThreadPoolExecutor(1) for _ in range(HASH_LANES)]
        self.pending: deque[tuple[Future[None], int]] = deque()
        self.in_flight = 0

    def submit(self, lane: int, fn: Callable[..., None], *args: Any, nbytes: int = 0) -> None:
        while self.pending and self.in_flight + nbytes > self.max_bytes:
            fut, n = self.pending.popleft()
            fut.result()
            self.in_flight -= n
        self.pending.append((self.lanes[lane % HASH_LANES].submit(fn, *args), nbytes))
        self.in_flight += nbytes

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft()[0].result()
        self.in_flight = 0

    def close(self) -> None:
        for lane in self.lanes:
            lane.shutdown(wait=True)


class VectorFile:
    """One vector file, opened once. `read` copies bytes into private memory and queues the same memory for its
    digest; tensors must be read whole, in sorted key order, for `verify` to pass."""

    def __init__(self, header: Header, hasher: Hasher, lane: int) -> None:
        self.header, self.hasher, self.lane = header, hasher, lane
        self.file = open(header.path, "rb", buffering=0)  # noqa: SIM115 - closed by `close`
        self.digest = Digest()

    def _read(self, key: str, start: int, buf: memoryview, verify: bool) -> None:
        """Fill `buf` with tensor `key`'s bytes from element `start` on (one pread), queued for the digest."""
        t = self.header.tensors[key]
        if os.preadv(self.file.fileno(), [buf], self.header.data_start + t.start + start * DTYPE_SIZES[t.dtype]
                     ) != len(buf):
            raise FileFormatError(f"{self.header.path}: truncated while reading {key}")
        if verify:
            if start == 0:
                self.hasher.submit(self.lane, self.digest.begin, key, t.dtype, t.shape, t.end - t.start)
            self.hasher.submit(self.lane, self.digest.feed, buf, nbytes=len(buf))

    def read(self, key: str, start: int = 0, stop: int | None = None, verify: bool = True, wide: bool = False
             ) -> Array:
        """Elements start..stop of tensor `key`, flat, as float32 (`wide`: float64), read-only when `verify`."""
        t = self.header.tensors[key]
        stop = t.numel if stop is None else stop
        buf = np.empty((stop - start) * DTYPE_SIZES[t.dtype], np.uint8)  # not zeroed, unlike a bytearray
        self._read(key, start, buf.data, verify)
        x = as_float64(buf.data, t.dtype) if wide else as_float32(buf.data, t.dtype)
        x.flags.writeable = not verify  # else it may be the memory being hashed
        return x

    def read_into(self, key: str, start: int, out: Array) -> None:
        """Elements start..start+out.size of tensor `key` into the float32 array `out`, which must then stay
        unchanged until the hasher is drained (for float32 tensors it is the memory hashed)."""
        dtype = self.header.tensors[key].dtype
        if dtype == "F32":
            self._read(key, start, out.data.cast("B"), True)
        else:
            out[:] = self.read(key, start, start + out.size)

    def read_delta(self, key: str) -> Array:
        """The whole delta of base key `key`, flat: a tensor of the file, or the product of its low-rank factors
        (a LoRA vector's `KEY@lora_A`, `KEY@lora_B`), expanded here one tensor at a time."""
        factors = self.header.vector.factors or {}
        if key not in factors:
            return self.read(key)
        a, b = (self.read(n).reshape(self.header.tensors[n].shape) for n in factor_names(key))
        return (b @ a).ravel()

    def verify(self) -> None:
        """After `Hasher.drain`: the bytes read are the bytes the vector's sha256 names."""
        if self.digest.hexdigest() != self.header.vector.sha256:
            raise FileFormatError(f"{self.header.path}: content does not match its sha256; the file is corrupted")

    def close(self) -> None:
        self.file.close()


class Reading:
    """Open vector files and their hasher for the length of a `with` block; `verify` checks every file."""

    def __init__(self, headers: Sequence[Header]) -> None:
        largest = max((sum(t.end - t.start for t in h.tensors.values()) for h in headers), default=0)
        self.hasher = Hasher(min(IN_FLIGHT_BYTES, largest))
        self.files: list[VectorFile] = []
        try:
            for i, h in enumerate(headers):
                self.files.append(VectorFile(h, self.hasher, i))
        except OSError as e:
            self.__exit__()
            if e.errno != errno.EMFILE:
                raise
            raise TaskvecError(f"{len(headers)} vectors are more files than this process may open at once "
                               f"({len(self.files)} opened); raise the limit (`ulimit -n`) or merge them in parts, "
                               "incrementally") from None

    def __enter__(self) -> Reading:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hasher.close()
        for f in self.files:
            f.close()

    def verify(self) -> None:
        self.hasher.drain()
        for f in self.files:
            f.verify()

    @property
    def step(self) -> int:
        """Values of one tensor per file in a chunk: CHUNK_ELEMENTS across all files."""
        return max(1, CHUNK_ELEMENTS // len(self.files))

    def chunks(self, key: str, numel: int) -> Iterator[tuple[int, int, Array]]:
        """(start, stop, values of every file) over tensor `key` in chunks of at most CHUNK_ELEMENTS values."""
        for start in range(0, numel, self.step):
            stop = min(numel, start + self.step)
            x = np.empty((len(self.files), stop - start), np.float32)
            for f, row in zip(self.files, x):
                f.read_into(key, start, row)
            x.flags.writeable = False  # the memory being hashed
            if not np.isfinite(x.sum()) and not np.isfinite(x).all():  # a finite sum: every value is finite
                bad = next(f for f, row in zip(self.files, x) if not np.isfinite(row).all())
                raise FileFormatError(f"{bad.header.path}: tensor {key} holds NaN or Inf")
            yield start, stop, x
