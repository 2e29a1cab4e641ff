"""taskvec: merge data vectors (fine-tuned minus base weights) from many hospitals into one model.

The public API, one entry per role (the README's Python example uses each; docs/reference/api.md documents them):
- the coordinator: `build_base(arch, ...)` and `save_model(module, spec, path)`: the shared base;
- a site: `finetune(base, data, out, FinetuneConfig(...))` (with `DPConfig` for DP), then `export_vector(model,
  base, out, ...)`: its data vector and privacy ledger;
- the exchange: `open_registry(address)` (a folder, or a Hugging Face Hub repository), `merge_inputs(registry, ...)`;
- the merger: `merge(vectors, base, out, method=..., budget=PrivacyBudget(...))`, `evaluate(model, data)`.

The package imports nothing heavy at import time; each name loads its module (and torch/timm) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {  # public name: (module, attribute), imported on first use
    "build_base": ("taskvec.models.spec", "build_base"),
    "save_model": ("taskvec.models.spec", "save_model"),
    "load_model": ("taskvec.models.spec", "load_model"),
    "model_spec": ("taskvec.models.spec", "model_spec"),
    "ModelSpec": ("taskvec.models.spec", "ModelSpec"),
    "finetune": ("taskvec.training.loop", "finetune"),
    "FinetuneConfig": ("taskvec.training.config", "FinetuneConfig"),
    "DPConfig": ("taskvec.privacy.dpsgd", "DPConfig"),
    "export_vector": ("taskvec.merging.export", "export_vector"),
    "merge": ("taskvec.merging.stream", "merge_vectors"),
    "merge_vectors": ("taskvec.merging.stream", "merge_vectors"),
    "MergePlan": ("taskvec.merging.plan", "MergePlan"),
    "PrivacyBudget": ("taskvec.privacy.budget", "PrivacyBudget"),
    "MERGE_METHODS": ("taskvec.merging.methods", "MERGE_METHODS"),
    "evaluate": ("taskvec.training.evaluate", "evaluate_model"),
    "open_registry": ("taskvec.registry", "open_registry"),
    "TrustPolicy": ("taskvec.registry", "TrustPolicy"),
    "merge_inputs": ("taskvec.registry", "merge_inputs"),
    "inspect_file": ("taskvec.io.inspection", "inspect_file"),
    "read_header": ("taskvec.io.files", "read_header"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'taskvec' has no attribute {name!r}")
