"""Versions of merged models as messages name them, and the staleness discount of a vector fine-tuned from an
older version. The versions themselves are fields of the typed headers (`taskvec.io.schema`)."""

from __future__ import annotations

from collections.abc import Sequence


def describe_versions(ids: Sequence[str]) -> str:
    """`v0 1a2b3c4d5e6f, v1 ...`: versions for a message."""
    return ", ".join(f"v{i} {s[:12]}" for i, s in enumerate(ids))


DEFAULT_STALENESS = 0.5  # FedBuff's 1/sqrt(1 + staleness)
STALENESS_RULE = "s = (1 + d)^(-a), d = N - K (FedBuff, Nguyen et al. 2022; FedAsync, Xie et al. 2019)"


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's / FedAsync's polynomial discount s = (1 + d)^(−a) of a vector `d` versions behind."""
    return float((1 + staleness) ** -exponent)
