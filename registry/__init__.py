"""Vector exchange: one registry interface over a folder and a Hugging Face Hub repo, with signing.

`open_registry(address)` gives a `Registry`; see `taskvec.registry.base` for the layout.
"""

from taskvec.registry.address import open_registry
from taskvec.registry.base import (
    Entry,
    IntegrityError,
    Registry,
    RegistryError,
    RegistryInfo,
)
from taskvec.registry.trust import TrustError, TrustPolicy

__all__ = ["Entry", "IntegrityError", "Registry", "RegistryError", "RegistryInfo", "TrustError", "TrustPolicy",
           "open_registry"]
