"""Sufficient statistics of a frozen base's features and the ridge head solved from them (the `stats-head`
training mode and the `ridge-head` merge). numpy only: the merge imports it without torch.

The statistics describe each unit's pooled feature f (timm's `forward_head(..., pre_logits=True)`), clipped to
f̃ = f·min(1, C/‖f‖) under DP (no clip without), and g = P f̃, its image under a projection P with orthonormal
rows (p × d) that uses no private data: the identity when the feature dimension d is at most p, else the
orthonormalised Gaussian matrix drawn from a seed that is a hash of the backbone's content and the two
dimensions (`projection`). Per class c they are the count n_c and the sum S_c = Σ g, and over all classes the
second moment M = Σ g gᵀ (p × p). Sums over sites are sums over the pooled data, so summing vectors is exact.

Under DP one release adds Gaussian noise once to every coordinate of Σ_u v_u, v_u = (S_u, C·n_u, M_u/C), the
unit u's contribution (an image, or a patient whose images each weigh 1/their number): ‖v_u‖² = ‖g‖² + C² +
‖g‖⁴/C² ≤ 3C² for an image (‖g‖ ≤ ‖f̃‖ ≤ C as P's rows are orthonormal), and ≤ 3C² for a patient by the
triangle inequality, so the L2 sensitivity under add-remove is √3·C (`SENSITIVITY`), attained by an image with
‖g‖ = C. The noise is N(0, (z·√3·C)²) per coordinate (a `gaussian-sum` release with that bound); counts and
moments are then rescaled (÷C, ×C) and M symmetrised, which is post-processing.

The head (`solve_head`) is ridge regression of one-hot targets t on g with an unpenalised bias (Fed3R: Fanì et
al. 2024): with N = Σ n_c, ḡ = Σ_c S_c / N, t̄ = n / N,

    Σ = M − N ḡḡᵀ,   X = Sᵀ − ḡ nᵀ,   A = (Σ + λI)⁻¹ X,   W = Aᵀ P,   b = t̄ − Aᵀ ḡ,

λ = ridge · tr(M)/p + 2·√(2p)·σ_M (σ_M the sd of M's noise: about twice the spectral norm of the symmetrised
noise, so that Σ + λI stays positive definite). The classifier applies W f + b to the raw feature: exactly the
regression for every f with ‖f‖ ≤ C.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

KEYS = {"counts": "sufficient.counts", "sums": "sufficient.sums", "moments": "sufficient.moments"}
SENSITIVITY = math.sqrt(3.0)  # × clip: the L2 norm bound of one unit's (S, C·n, M/C)
DEFAULT_RIDGE = 1e-2


def projection_seed(backbone: str, dim: int, rank: int) -> int:
    """The projection's seed: a hash of public values (the backbone's content identity and the dimensions)."""
    return int.from_bytes(hashlib.sha256(f"taskvec projection:{backbone}:{dim}:{rank}".encode()).digest()[:8],
                          "little")


def projection(seed: int | None, dim: int, rank: int) -> np.ndarray:
    """P (rank × dim) with orthonormal rows: the identity when `seed` is None (rank == dim), else the Q of a
    Householder QR (signs fixed by R's diagonal) of a Gaussian matrix drawn by Box–Muller from PCG64's raw
    64-bit stream, which numpy keeps stable across versions."""
    if seed is None:
        return np.eye(dim)
    n = dim * rank
    raw = np.random.PCG64(seed).random_raw(2 * ((n + 1) // 2))
    u = ((raw >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # in (0, 1]
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    q, tri = np.linalg.qr(z.reshape(dim, rank))
    return (q * np.sign(np.diag(tri))).T


def features_record(backbone: str, arch: str, dim: int, rank: int) -> dict[str, Any]:
    """What the statistics describe: the backbone (content identity of the base's tensors outside the head),
    its architecture, the feature dimension and the projection (seed None: the identity)."""
    p = min(dim, rank)
    return {"backbone": backbone, "arch": arch, "dim": dim,
            "projection": {"dim": p, "seed": None if p == dim else projection_seed(backbone, dim, p)}}


def contributions(feats: np.ndarray, labels: Sequence[int], weights: np.ndarray, num_classes: int,
                  proj: np.ndarray, clip: float | None) -> dict[str, np.ndarray]:
    """Σ over the images of weight × (count in its class, projected clipped feature in its class's row,
    its outer product): the un-noised statistics of `feats` (n × d, float64)."""
    if clip is not None:
        feats = feats * np.minimum(1.0, clip / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-300))
    g = feats @ proj.T
    onehot = np.zeros((len(labels), num_classes))
    onehot[np.arange(len(labels)), np.asarray(labels, dtype=int)] = 1.0
    w = np.asarray(weights, dtype=np.float64)[:, None]
    return {"counts": (onehot * w).sum(0), "sums": (onehot * w).T @ g, "moments": (g * w).T @ g}


def noise_std(z: float, clip: float) -> dict[str, float]:
    """The sd of each statistic's noise after rescaling, for noise multiplier z: σ = z·√3·C on the sums,
    σ/C on the counts, σ·C on the moments (before symmetrising)."""
    sigma = z * SENSITIVITY * clip
    return {"counts": sigma / clip, "sums": sigma, "moments": sigma * clip}


def add_noise(stats: dict[str, np.ndarray], std: dict[str, float], normal: Any) -> dict[str, np.ndarray]:
    """The statistics plus N(0, std²) per coordinate (`normal(shape)` draws standard normals), moments
    symmetrised."""
    out = {k: v + std[k] * normal(v.shape) for k, v in stats.items()}
    out["moments"] = (out["moments"] + out["moments"].T) / 2
    return out


def ridge_strength(moments: np.ndarray, ridge: float, moments_std: float) -> float:
    """λ = ridge · tr(M)/p + 2·√(2p)·σ_M (see the module docstring)."""
    p = moments.shape[0]
    return ridge * max(float(np.trace(moments)), 0.0) / p + 2 * math.sqrt(2 * p) * moments_std


def solve_head(stats: dict[str, np.ndarray], proj: np.ndarray, ridge: float, moments_std: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the ridge head on raw features (k × d, k), float64, from (noisy) statistics."""
    n, s, m = stats["counts"], stats["sums"], stats["moments"]
    total = max(float(n.sum()), 1.0)
    mean = s.sum(0) / total
    scatter = m - total * np.outer(mean, mean)
    cross = s.T - np.outer(mean, n)
    lam = ridge_strength(m, ridge, moments_std)
    a = np.linalg.solve(scatter + lam * np.eye(len(mean)), cross)
    return a.T @ proj, n / total - a.T @ mean
