"""Decoding raw safetensors bytes with numpy, for commands that must not import torch."""

from __future__ import annotations

import numpy as np

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


def non_finite(data: bytes | memoryview, dtype: str) -> bool:
    """True when raw floating tensor bytes hold a NaN or ±Inf (all exponent bits set), without a float copy."""
    if dtype not in _EXPONENT:
        return False
    bits, mask = _EXPONENT[dtype]
    a = np.frombuffer(data, dtype=bits)
    return bool(np.any((a & a.dtype.type(mask)) == mask))
