"""What a site trains, and what its vector then carries: one module per training mode in this package, each a
registered `TrainMode` (`taskvec.training.modes.base`) that declares the parameters it trains, its vector, its
default learning rate and what it supports. Importing the package registers every module in it.

Frozen parameters get no gradient, so DP-SGD computes per-example gradients only for what is trained (the cost
per mode: docs/results/performance.md). Torch-free at import.
"""

import importlib
import pkgutil

from taskvec.training.modes.base import TrainMode, VectorLayout, default_mode, head_prefixes, parse_mode, registered

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TrainMode", "VectorLayout", "default_mode", "head_prefixes", "parse_mode", "registered"]
