"""taskvec: merge data vectors (fine-tuned minus base weights) from many hospitals into one model.

The package imports nothing heavy at import time; the public functions load torch/timm on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "build_base": "taskvec.models",
    "save_model": "taskvec.models",
    "load_model": "taskvec.models",
    "model_spec": "taskvec.models",
    "ModelSpec": "taskvec.models",
    "export_vector": "taskvec.vectors",
    "merge_vectors": "taskvec.merge",
    "MERGE_METHODS": "taskvec.merge_methods",
    "inspect_file": "taskvec.inspection",
    "read_header": "taskvec.files",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'taskvec' has no attribute {name!r}")
