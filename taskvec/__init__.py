"""taskvec: merge data vectors (fine-tuned minus base weights) from many hospitals into one model.

The package imports nothing heavy at import time; the public functions load torch/timm on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "build_base": "taskvec.models.spec",
    "save_model": "taskvec.models.spec",
    "load_model": "taskvec.models.spec",
    "model_spec": "taskvec.models.spec",
    "ModelSpec": "taskvec.models.spec",
    "export_vector": "taskvec.merging.export",
    "merge_vectors": "taskvec.merging.stream",
    "MERGE_METHODS": "taskvec.merging.methods",
    "inspect_file": "taskvec.io.inspection",
    "read_header": "taskvec.io.files",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'taskvec' has no attribute {name!r}")
