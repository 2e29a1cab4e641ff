"""Merge methods: small pure functions that combine the same tensor from several data vectors.

Linear methods (`sum`, `mean`, `weighted`, `dare`) are `Σ cᵢ·fᵢ(τᵢ)`, so a merge can stream them one
vector file at a time. Non-linear ones (`ties`) need every vector's copy of a tensor at once and run
tensor by tensor. Every method is testable on small tensors through `MergeMethod.combine`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from taskvec.errors import TaskvecError

Tensor = torch.Tensor


def dare_seed(seed: int, vector_sha: str, key: str) -> int:
    """Deterministic per-(vector, tensor) seed, independent of the order vectors arrive in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{vector_sha}:{key}".encode()).digest()[:8], "little") >> 1


def dare_drop(t: Tensor, density: float, seed: int) -> Tensor:
    """DARE (Yu et al. 2024): keep each coordinate with probability `density`, rescale kept ones by 1/density."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(t.shape, generator=gen) < density
    return t * keep / density


def trim_top(t: Tensor, density: float) -> Tensor:
    """TIES trim: keep the `density` fraction of coordinates with the largest magnitude, zero the rest."""
    k = max(1, int(round(density * t.numel())))
    if k >= t.numel():
        return t.clone()
    flat = t.reshape(-1)
    idx = flat.abs().topk(k).indices
    out = torch.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(t.shape)


def ties(tensors: Sequence[Tensor], density: float) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect the sign of the summed mass, mean of agreeing entries."""
    trimmed = torch.stack([trim_top(t, density) for t in tensors])
    sign = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = (trimmed * agree).sum(0)
    count = agree.sum(0).clamp(min=1)
    return total / count


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method. Linear ones define `coefficients`; the others define `tensorwise`."""

    name: str
    help: str
    coefficients: Callable[[Sequence[float | None]], list[float]] | None = None
    drop: bool = False  # DARE: apply `dare_drop` to each vector before the linear combination
    tensorwise: Callable[[Sequence[Tensor], float], Tensor] | None = None
    default_density: float | None = None

    @property
    def linear(self) -> bool:
        return self.coefficients is not None

    def combine(
        self,
        tensors: Sequence[Tensor],
        samples: Sequence[float | None] | None = None,
        density: float | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Tensor:
        """Combine one tensor from several vectors (the reference the streaming merge must equal)."""
        density = self.default_density if density is None else density
        if self.tensorwise is not None:
            assert density is not None
            return self.tensorwise([t.float() for t in tensors], density)
        assert self.coefficients is not None
        coefs = self.coefficients(samples if samples is not None else [None] * len(tensors))
        out = torch.zeros_like(tensors[0], dtype=torch.float32)
        for i, (c, t) in enumerate(zip(coefs, tensors)):
            t = t.float()
            if self.drop:
                assert density is not None and seeds is not None
                t = dare_drop(t, density, seeds[i])
            out.add_(t, alpha=c)
        return out


def _sample_weights(samples: Sequence[float | None]) -> list[float]:
    if any(s is None for s in samples):
        raise TaskvecError("method 'weighted' needs every vector's sample count; export with `samples`",
                           field="samples")
    total = float(sum(samples))  # type: ignore[arg-type]
    return [float(s) / total for s in samples]  # type: ignore[arg-type]


MERGE_METHODS: dict[str, MergeMethod] = {
    m.name: m
    for m in [
        MergeMethod("sum", "Σ τᵢ (task arithmetic, as in the data-vector paper)", lambda s: [1.0] * len(s)),
        MergeMethod("mean", "Σ τᵢ / n", lambda s: [1.0 / len(s)] * len(s)),
        MergeMethod(
            "weighted", "Σ nᵢ τᵢ / Σ nᵢ by sample count (one-shot FedAvg)", _sample_weights
        ),
        MergeMethod(
            "dare", "drop with probability 1−d, rescale by 1/d (seeded), then sum",
            lambda s: [1.0] * len(s), drop=True, default_density=0.5,
        ),
        MergeMethod(
            "ties", "trim to top-d magnitude, elect sign, disjoint mean", tensorwise=ties, default_density=0.2
        ),
    ]
}


def get_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise TaskvecError(f"unknown merge method {name!r}; choose one of {', '.join(MERGE_METHODS)}")
    return MERGE_METHODS[name]
