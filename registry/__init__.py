"""Vector exchange: one registry interface over pluggable stores (a folder, a Hugging Face Hub repo), with signing.

`open_registry(address)` gives a `Registry`; `merge_inputs(registry, ...)` decides what a merge of it takes. The
layout and records are in `taskvec.registry.schema`, the store interface in `taskvec.registry.store`, and each
backend in its own module under `registry/stores/`.
"""

from taskvec.registry.address import open_registry
from taskvec.registry.registry import PushResult, Registry
from taskvec.registry.schema import Entry, IntegrityError, RegistryError, RegistryInfo, Version
from taskvec.registry.selection import MergeInputs, merge_inputs
from taskvec.registry.trust import TrustError, TrustPolicy

__all__ = ["Entry", "IntegrityError", "MergeInputs", "PushResult", "Registry", "RegistryError", "RegistryInfo",
           "TrustError", "TrustPolicy", "Version", "merge_inputs", "open_registry"]
