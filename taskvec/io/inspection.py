"""`taskvec inspect`: what a file is and holds, computed from its bytes with numpy (no torch, no timm)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from taskvec.io.files import FLOAT_DTYPES, TensorInfo, read_header, scan
from taskvec.io.tensors_np import as_float64

__all__ = ["FileInfo", "inspect_file"]


@dataclass
class FileInfo:
    """What `inspect_file` found; `integrity` is None when the file stores no content hash."""

    path: str
    kind: str
    size_bytes: int
    tensors: int
    parameters: int
    l2_norm: float
    content_sha256: str
    integrity: bool | None
    finite: bool  # every float tensor free of NaN and Inf (merge and push refuse a vector that is not)
    privacy: list[dict[str, Any]]
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The record `taskvec inspect --json` prints."""
        return asdict(self)


def inspect_file(path: str | os.PathLike[str]) -> FileInfo:
    """Kind, metadata, tensor and parameter counts, size, L2 norm, integrity and privacy ledger of a file."""
    h = read_header(path)
    meta = h.meta
    listed = meta.get("statistics", [])
    stats = set(listed) if isinstance(listed, list) and all(isinstance(k, str) for k in listed) else set()
    sq, finite = 0.0, True

    def norm(name: str, t: TensorInfo, piece: bytes) -> None:
        nonlocal sq, finite
        if t.dtype in FLOAT_DTYPES:
            values = as_float64(piece, t.dtype)
            finite = finite and bool(np.isfinite(values).all())
            if name not in stats:
                sq += float(np.square(values).sum())

    content = scan(h, norm)
    params = sum(t.numel for t in h.tensors.values() if t.dtype in FLOAT_DTYPES)
    stored = meta.get("identity") if h.kind == "model" else meta.get("sha256")
    return FileInfo(str(h.path), h.kind, h.size, len(h.tensors), params, math.sqrt(sq), content,
                    None if stored is None else stored == content, finite, meta.get("privacy", []), meta)
