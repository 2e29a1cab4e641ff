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
