"""Sufficient statistics of a frozen base's features and the classifier solved from them (the `stats-head`
training mode and the `lda-head` / `ridge-head` merges). numpy only: the merge imports it without torch.

The statistics describe each unit's pooled feature f (timm's `forward_head(..., pre_logits=True)`) through its
direction f̂ = f/‖f‖ and its log norm: g = P f̂, the image of f̂ under a projection P with orthonormal rows
(p × d) that uses no private data (the identity when the feature dimension d is at most p, else the
orthonormalised Gaussian matrix drawn from a seed that is a hash of the backbone's content and the two
dimensions, `projection`), and ℓ = log‖f‖ clamped to ±`LOG_NORM_RANGE`. Per class c they are the count n_c
and the sum S_c = Σ g; over all classes the second moment M = Σ g gᵀ (p × p) and the log-norm sum L = Σ ℓ.
Sums over sites are sums over the pooled data, so summing vectors is exact.

Under DP g is clipped to ‖g‖ ≤ b = min(1, `CLIP_FACTOR`·√(p/d)), a public bound: for any fixed unit vector
f̂ and a random orthonormal P independent of it, ‖P f̂‖² ~ Beta(p/2, (d−p)/2), of mean p/d and sd about
√(2/p)·p/d, so at c = 1.25 the bound clips only features more than 2 (p = 32) to 4 (p = 128) sd above the
mean (and never at p = d). One release adds Gaussian noise N(0, (zC)²) once to every coordinate of Σ_u v_u,
C = `max_grad_norm` and v_u = C·(a_S·S_u/b, a_n·n_u, a_M·M_u/b², a_L·L_u/`LOG_NORM_RANGE`) the unit u's
scaled contribution (an image, or a patient whose images each weigh 1/their number), a² the `SHARES`
(summing to 1). For an image ‖S_u‖ = ‖g‖ ≤ b, n_u = 1, ‖M_u‖_F = ‖g‖² ≤ b², |L_u| ≤ `LOG_NORM_RANGE`, so
‖v_u‖ ≤ C; for a patient, by the triangle inequality over their images: the L2 sensitivity under add-remove
is C, attained by an image with ‖g‖ = b and a clamped log norm. Rescaled back (post-processing), each
statistic's noise sd is z/(its scale): z·b/a_S on the sums, z/a_n on the counts, z·b²/a_M on the moments
(before symmetrising), z·`LOG_NORM_RANGE`/a_L on the log-norm sum (`noise_std`). C cancels: it sets the
ledger's sensitivity, not the noise on the statistics.

The head is linear discriminant analysis on g (`solve_lda`): with N = Σ n_c, class means μ_c = S_c/n_c,
the pooled within-class covariance Σ = (M − Σ_c S_c S_cᵀ/n_c + Σ_c σ_S²/n_c·I)/N (the last term removes
the noise's expected share of the means' outer products), its eigenvalues floored at
`NOISE_FLOOR`·√(2p)·σ_M/N (the scale of the symmetrised moment noise's spectral norm, on the covariance's
scale) + shrink·max(tr Σ, `MIN_WITHIN`·tr M/N)/p (the second term keeps the floor positive when the classes
have no spread of their own, e.g. one unit each), and

    A_c = Σ⁻¹μ_c,   β_c = −½(μ_cᵀΣ⁻¹μ_c − (σ_S/n_c)²·tr Σ⁻¹) + log(n_c/N)

(the noise's expected share of μ_cᵀΣ⁻¹μ_c subtracted). A class whose count is below 3 sd of the count's
noise (without DP: no unit) is put at the mean of all units with the prior of one unit, where it takes no
side. `solve_ridge` is the ridge regression of one-hot targets on g with an unpenalised bias instead (Fed3R:
Fanì et al. 2024). The model applies W f + b to the raw feature, so both fold the typical norm in:
W = Aᵀ P/ν with ν = exp(L/N), the geometric mean of the feature norms; W f + b = Aᵀ g·‖f‖/ν + b, the
head's logits exactly for a feature of norm ν, and the same ranking of images for each class's score up to
the spread of the norms.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from taskvec.errors import TaskvecError

KEYS = {"counts": "sufficient.counts", "sums": "sufficient.sums", "moments": "sufficient.moments",
        "log_norms": "sufficient.log_norms"}
CLIP_FACTOR = 1.25  # c: under DP ‖g‖ is clipped at c·√(p/d) (its mean square is p/d)
LOG_NORM_RANGE = 10.0  # log feature norms are clamped to ±10 (norms from 4.5e-5 to 2.2e4)
SHARES = {"sums": 0.45, "counts": 0.05, "moments": 0.45, "log_norms": 0.05}  # a²: each statistic's share of ‖v_u‖²
NOISE_FLOOR = 0.25  # the covariance's eigenvalue floor, in units of the moment noise's spectral scale
DEFAULT_SHRINK = 1e-2  # the covariance's eigenvalue floor relative to its mean eigenvalue (without noise)
MIN_WITHIN = 1e-3  # the within-class spread the floor assumes at least, relative to the second moment's
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


def clip_bound(dim: int, rank: int) -> float:
    """b = min(1, c·√(p/d)): the public bound on ‖g‖ under DP."""
    return min(1.0, CLIP_FACTOR * math.sqrt(rank / dim))


def contributions(feats: np.ndarray, labels: Sequence[int], weights: np.ndarray, num_classes: int,
                  proj: np.ndarray, clip: float | None) -> dict[str, np.ndarray]:
    """Σ over the images of weight × (count in its class, g = P f̂ (clipped to ‖g‖ ≤ `clip`) in its class's
    row, g gᵀ, clamped log ‖f‖): the un-noised statistics of `feats` (n × d, float64)."""
    norms = np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-300)
    g = (feats / norms) @ proj.T
    if clip is not None:
        g = g * np.minimum(1.0, clip / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-300))
    onehot = np.zeros((len(labels), num_classes))
    onehot[np.arange(len(labels)), np.asarray(labels, dtype=int)] = 1.0
    w = np.asarray(weights, dtype=np.float64)[:, None]
    log_norms = np.clip(np.log(norms), -LOG_NORM_RANGE, LOG_NORM_RANGE)
    return {"counts": (onehot * w).sum(0), "sums": (onehot * w).T @ g, "moments": (g * w).T @ g,
            "log_norms": (log_norms * w).sum(0)}


def release_scales(clip: float) -> dict[str, float]:
    """Each statistic's factor in a unit's released vector v_u (÷ C): a_S/b, a_n, a_M/b², a_L/`LOG_NORM_RANGE`,
    so that ‖v_u‖ ≤ C when ‖g‖ ≤ b = `clip`."""
    bound = {"sums": clip, "counts": 1.0, "moments": clip**2, "log_norms": LOG_NORM_RANGE}
    return {k: math.sqrt(SHARES[k]) / bound[k] for k in KEYS}


def noise_std(z: float, clip: float) -> dict[str, float]:
    """The sd of each statistic's noise after rescaling, for noise multiplier z and ‖g‖ ≤ `clip`: z/(its scale)
    (before the moments are symmetrised)."""
    return {k: z / s for k, s in release_scales(clip).items()}


def add_noise(stats: dict[str, np.ndarray], std: dict[str, float], normal: Any) -> dict[str, np.ndarray]:
    """The statistics plus N(0, std²) per coordinate (`normal(shape)` draws standard normals), moments
    symmetrised."""
    out = {k: v + std[k] * normal(v.shape) for k, v in stats.items()}
    out["moments"] = (out["moments"] + out["moments"].T) / 2
    return out


def typical_norm(stats: dict[str, np.ndarray]) -> float:
    """ν = exp(L/N): the geometric mean of the feature norms (clamped to the log range)."""
    total = max(float(stats["counts"].sum()), 1.0)
    return math.exp(min(max(float(stats["log_norms"].sum()) / total, -LOG_NORM_RANGE), LOG_NORM_RANGE))


def solve_lda(stats: dict[str, np.ndarray], proj: np.ndarray, shrink: float,
              std: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the LDA head on raw features (k × d, k), float64, from (noisy) statistics with noise sds `std`
    (None: no noise; see the module docstring)."""
    sd = std or dict.fromkeys(KEYS, 0.0)
    n, s, m = stats["counts"], stats["sums"], stats["moments"]
    p = m.shape[0]
    total = max(float(n.sum()), 1.0)
    known = n > 3 * sd["counts"]
    counts = np.where(known, n, 1.0)
    means = np.where(known[:, None], s / counts[:, None], s.sum(0) / total)
    noise_share = sd["sums"] ** 2 * float((1 / counts[known]).sum())  # E of the noise's share of Σ_c S_c S_cᵀ/n_c
    within = m - (means[known].T * counts[known]) @ means[known] + noise_share * np.eye(p)
    values, vectors = np.linalg.eigh((within + within.T) / (2 * total))
    spread = max(float(values.sum()), MIN_WITHIN * float(np.trace(m)) / total, 0.0)
    floor = NOISE_FLOOR * math.sqrt(2 * p) * sd["moments"] / total + shrink * spread / p
    inverse = (vectors / np.maximum(values, max(floor, np.finfo(np.float64).tiny))) @ vectors.T
    a = means @ inverse
    square = np.einsum("ij,ij->i", a, means) - np.where(known, (sd["sums"] / counts) ** 2, 0.0) * np.trace(inverse)
    return a @ proj / typical_norm(stats), -0.5 * square + np.log(counts / total)


def ridge_strength(moments: np.ndarray, ridge: float, moments_std: float) -> float:
    """λ = ridge · tr(M)/p + 2·√(2p)·σ_M: the noise's share keeps Σ + λI positive definite."""
    p = moments.shape[0]
    return ridge * max(float(np.trace(moments)), 0.0) / p + 2 * math.sqrt(2 * p) * moments_std


def solve_ridge(stats: dict[str, np.ndarray], proj: np.ndarray, ridge: float,
                std: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the ridge head on raw features (k × d, k), float64: with ḡ = Σ_c S_c/N and t̄ = n/N,
    A = (M − Nḡḡᵀ + λI)⁻¹(Sᵀ − ḡnᵀ), W = AᵀP/ν, b = t̄ − Aᵀḡ."""
    n, s, m = stats["counts"], stats["sums"], stats["moments"]
    total = max(float(n.sum()), 1.0)
    mean = s.sum(0) / total
    scatter = m - total * np.outer(mean, mean)
    cross = s.T - np.outer(mean, n)
    lam = ridge_strength(m, ridge, (std or {}).get("moments", 0.0))
    a = np.linalg.solve(scatter + lam * np.eye(len(mean)), cross)
    return a.T @ proj / typical_norm(stats), n / total - a.T @ mean


SOLVERS = {"lda": solve_lda, "ridge": solve_ridge}


def solve(solver: str, stats: dict[str, np.ndarray], proj: np.ndarray, strength: float,
          std: dict[str, float] | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of `SOLVERS[solver]`; a TaskvecError naming `what` (the statistics' source) when they give no
    finite head (statistics out of range, or features without spread)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range statistics: refused below
            weight, bias = SOLVERS[solver](stats, proj, strength, std)
    except np.linalg.LinAlgError as e:
        raise TaskvecError(f"{what}: the {solver} head cannot be solved from these statistics ({e})") from None
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise TaskvecError(f"{what}: the {solver} head solved from these statistics is not finite (statistics out "
                           "of range, or features that do not vary)")
    return weight, bias
