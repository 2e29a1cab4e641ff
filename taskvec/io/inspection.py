"""`taskvec inspect`: what a file is and holds, computed from its bytes with numpy (no torch, no timm)."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from taskvec.io.files import FLOAT_DTYPES, Digest, iter_raw, read_header
from taskvec.io.tensors_np import as_float64

__all__ = ["inspect_file"]


def inspect_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Kind, metadata, tensor and parameter counts, size, L2 norm, integrity and privacy ledger of a file."""
    h = read_header(path)
    meta = h.meta
    stats = set(meta.get("statistics", []))
    sq = 0.0
    params = 0
    dig = Digest()
    for name, t, data in iter_raw(h):
        dig.update(name, t.dtype, t.shape, data)
        if t.dtype in FLOAT_DTYPES:
            params += t.numel
            if name not in stats:
                sq += float(np.square(as_float64(data, t.dtype)).sum())
    content = dig.hexdigest()
    stored = meta.get("identity") if h.kind == "model" else meta.get("sha256")
    return {
        "path": str(h.path),
        "kind": h.kind,
        "size_bytes": h.size,
        "tensors": len(h.tensors),
        "parameters": params,
        "l2_norm": math.sqrt(sq),
        "content_sha256": content,
        "integrity": None if stored is None else stored == content,
        "privacy": meta.get("privacy", []),
        "metadata": meta,
    }
