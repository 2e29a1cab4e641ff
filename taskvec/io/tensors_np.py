"""Raw safetensors bytes with numpy, for commands that must not import torch: decoding, encoding, writing."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from taskvec.io.files import Meta, atomic_output, dump_meta

_NP = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}


def as_float64(data: bytes | memoryview, dtype: str) -> np.ndarray:
    """Raw little-endian tensor bytes as a flat float64 array (bfloat16 widened exactly)."""
    if dtype == "BF16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    if dtype == "BOOL":
        return np.frombuffer(data, dtype=np.uint8).astype(np.float64)
    return np.frombuffer(data, dtype=_NP[dtype]).astype(np.float64)


_EXPONENT = {"F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80), "F32": ("<u4", 0x7F800000),
             "F64": ("<u8", 0x7FF0000000000000)}


def non_finite(data: bytes | memoryview | np.ndarray, dtype: str) -> bool:
    """True when raw floating tensor bytes (or a contiguous array holding them) hold a NaN or ±Inf (all exponent
    bits set), without a float copy."""
    if dtype not in _EXPONENT:
        return False
    bits, mask = _EXPONENT[dtype]
    a = np.frombuffer(data, dtype=bits)
    return bool(np.any((a & a.dtype.type(mask)) == mask))


def as_float32(data: bytes | bytearray | memoryview, dtype: str) -> np.ndarray:
    """Raw little-endian floating tensor bytes as a flat float32 array (a view when they already are F32)."""
    if dtype == "F32":
        return np.frombuffer(data, dtype="<f4")
    if dtype == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, dtype=_NP[dtype]).astype(np.float32)


def from_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as an array holding the bytes of `dtype` (bfloat16 rounded to nearest even)."""
    if dtype == "F32":
        return x
    if dtype == "BF16":
        bits = x.astype(np.float32).view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype("<u2")
    return x.astype(_NP[dtype])


def save_arrays(arrays: Mapping[str, tuple[str, Sequence[int], np.ndarray]], path: str | os.PathLike[str],
                meta: Meta, force: bool = False) -> None:
    """Write `{name: (safetensors dtype, shape, array holding its bytes)}` with taskvec metadata, atomically,
    without torch and without copying the arrays."""
    header: dict[str, Any] = {"__metadata__": dump_meta(meta)}
    offset = 0
    names = sorted(arrays)
    for name in names:
        dtype, shape, a = arrays[name]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_output(path, force) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(np.ascontiguousarray(arrays[name][2]).data.cast("B"))
