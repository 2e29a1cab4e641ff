"""torch-side helpers for taskvec files: dtype names, content identity of in-memory tensors, safe saving."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from taskvec.io.files import Meta, atomic_output, digest, dump_meta

TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
def all_finite(t: torch.Tensor) -> bool:
    """True when `t` holds no NaN/Inf. One reduction; the elementwise check only runs if the sum is not finite."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The little-endian bytes safetensors would write for `t`."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Content identity (sha256 over sorted names, dtypes, shapes, bytes) of a state_dict."""
    return digest(
        (name, TORCH_TO_ST[state[name].dtype], tuple(state[name].shape), tensor_bytes(state[name]))
        for name in sorted(state)
    )


def save_tensors(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike[str], meta: Meta, force: bool = False
) -> Path:
    """Write tensors plus taskvec metadata atomically (temporary file, then rename)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_output(path, force) as tmp:
        save_file(tensors, str(tmp), metadata=dump_meta(meta))
    return Path(path)
