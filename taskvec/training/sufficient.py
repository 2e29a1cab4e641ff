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
mean (and never at p = d). A release adds Gaussian noise N(0, (zC)²) once to every coordinate of Σ_u v_u,
C = `max_grad_norm` and v_u = C·(a_S·S_u/b, a_n·n_u, a_M·M_u/b², a_L·L_u/`LOG_NORM_RANGE`) the unit u's
scaled contribution (an image, or a patient whose images each weigh 1/their number), a² the `SHARES`
(summing to 1). For an image ‖S_u‖ = ‖g‖ ≤ b, n_u = 1, ‖M_u‖_F = ‖g‖² ≤ b², |L_u| ≤ `LOG_NORM_RANGE`, so
‖v_u‖ ≤ C; for a patient, by the triangle inequality over their images: the L2 sensitivity under add-remove
is C, attained by an image with ‖g‖ = b and a clamped log norm. Rescaled back (post-processing), each
statistic's noise sd is z/(its scale): z·b/a_S on the sums, z/a_n on the counts, z·b²/a_M on the moments
(before symmetrising), z·`LOG_NORM_RANGE`/a_L on the log-norm sum (`noise_std`). C cancels: it sets the
ledger's sensitivity, not the noise on the statistics.

Most of a unit feature's norm is what all images share (on PBC blood cells at 224 px, the mean of f̂ has
squared norm 0.75), so the noise at the clip b swamps the spread that separates the classes. A DP run
therefore makes two releases (`dp_release`): first the centre sums Σ_u C·(√0.9·g/b, √0.05, √0.05·‖g‖²/b²)
at noise multiplier z/√ρ (ρ = `CENTRE_SHARE`; sensitivity C as above), from which it computes the centre c
and a clip b_c ≤ b of ‖g − c‖ (`centre_of`, post-processing); then the statistics above of h = g − c
clipped to ‖h‖ ≤ b_c in place of g (b_c in place of b in the scales) at z/√(1−ρ). Both are Gaussian
mechanisms of sensitivity C, so by the composition of Gaussian DP (Dong, Roth and Su 2022) the pair is
exactly one Gaussian release at z: 1/z² = ρ/z² + (1−ρ)/z², the `gaussian-sum` entry the run records. The
released statistics are brought back to the frame of g (`uncentre`, exact algebra on noisy values: they are
the statistics of c + h, which are g's for the units inside the clip), so vectors with different centres sum
like any others. The noise sds the file records are `noise_std`(z/√(1−ρ), b_c), those of the centred release;
bringing it back adds the count noise times c to the sums and c ξᵀ + ξ cᵀ + η c cᵀ to the moments (ξ the sums'
noise, η the counts'), which the LDA head's within-class covariance, about the overall mean, cancels.

The head is linear discriminant analysis on g (`solve_lda`): with N = Σ n_c, class means μ_c = S_c/n_c,
the overall mean ḡ = Σ_c S_c/N, the pooled within-class covariance
Σ = (M − Nḡḡᵀ − Σ_c n_c(μ_c − ḡ)(μ_c − ḡ)ᵀ + Σ_c σ_S²/n_c·I)/N (= M − Σ_c S_c S_cᵀ/n_c + …; written about ḡ
so that it does not depend on the centre of a DP release when a class is left out below; the last term removes
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from taskvec.errors import TaskvecError

KEYS = {"counts": "sufficient.counts", "sums": "sufficient.sums", "moments": "sufficient.moments",
        "log_norms": "sufficient.log_norms"}
CENTRE_SHARE = 0.1  # ρ: the centre's share of the release's 1/z² (noise multipliers z/√ρ and z/√(1−ρ))
CENTRE_CLIP = 1.0  # κ: under DP ‖g − c‖ is clipped at κ × its root mean square, as the centre release estimates it
CENTRE_SHARES = {"sum": 0.9, "count": 0.05, "square": 0.05}  # each part's share of a unit's ‖v_u‖² in the centre
MIN_CENTRE_CLIP = 1e-3  # b_c is at least this × b
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


@dataclass(frozen=True)
class Centre:
    """What the centre release gives, by post-processing of its noisy sums: the point c (‖c‖ ≤ b) that the
    statistics are centred on, and the clip b_c ≤ b of ‖g − c‖."""

    point: np.ndarray
    clip: float


def _clipped(x: np.ndarray, clip: float | None) -> np.ndarray:
    if clip is None:
        return x
    return x * np.minimum(1.0, clip / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300))


def _projected(feats: np.ndarray, proj: np.ndarray, clip: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(g = P f̂ clipped to ‖g‖ ≤ `clip`, ‖f‖) of each row f of `feats` (n × d, float64)."""
    norms = np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-300)
    return _clipped((feats / norms) @ proj.T, clip), norms


def contributions(feats: np.ndarray, labels: Sequence[int], weights: np.ndarray, num_classes: int,
                  proj: np.ndarray, clip: float | None, centre: Centre | None = None) -> dict[str, np.ndarray]:
    """Σ over the images of weight × (count in its class, g = P f̂ (clipped to ‖g‖ ≤ `clip`) in its class's
    row, g gᵀ, clamped log ‖f‖): the un-noised statistics of `feats` (n × d, float64). With a `centre`, of
    h = g − c clipped to ‖h‖ ≤ b_c in place of g (`uncentre` brings their noised sums back to g's)."""
    g, norms = _projected(feats, proj, clip)
    if centre is not None:
        g = _clipped(g - centre.point, centre.clip)
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


def noise_bound(z: float, dim: int, rank: int) -> dict[str, float]:
    """The largest sd of each statistic's centred noise in a DP release at noise multiplier z (before the data is
    seen): `noise_std` of the statistics' share, z/√(1−ρ), at the clip b ≥ b_c (the uncentred tensors add the
    terms along the centre, see the module docstring)."""
    return noise_std(z / math.sqrt(1 - CENTRE_SHARE), clip_bound(dim, rank))


def add_noise(stats: dict[str, np.ndarray], std: dict[str, float], normal: Any) -> dict[str, np.ndarray]:
    """The statistics plus N(0, std²) per coordinate (`normal(shape)` draws standard normals), moments
    symmetrised."""
    out = {k: v + std[k] * normal(np.shape(v)) for k, v in stats.items()}
    if "moments" in out:
        out["moments"] = (out["moments"] + out["moments"].T) / 2
    return out


def centre_contributions(feats: np.ndarray, weights: np.ndarray, proj: np.ndarray, clip: float
                         ) -> dict[str, np.ndarray]:
    """Σ over the images of weight × (g, 1, ‖g‖²), g = P f̂ clipped to ‖g‖ ≤ `clip`: what the centre release
    sums."""
    g = _projected(feats, proj, clip)[0]
    w = np.asarray(weights, dtype=np.float64)
    return {"sum": w @ g, "count": np.asarray(w.sum()), "square": np.asarray(w @ (g * g).sum(1))}


def centre_noise_std(z: float, clip: float) -> dict[str, float]:
    """The sd of each centre sum's noise after rescaling (as `noise_std`, with the `CENTRE_SHARES`)."""
    bound = {"sum": clip, "count": 1.0, "square": clip**2}
    return {k: z * bound[k] / math.sqrt(a) for k, a in CENTRE_SHARES.items()}


def centre_of(noisy: dict[str, np.ndarray], std: dict[str, float], clip: float) -> Centre:
    """The centre and its clip from the noised centre sums (post-processing): with n̂ = max(count, 1),
    c = sum/n̂ (scaled into ‖c‖ ≤ b) and b_c = κ·√(square/n̂ − ‖c‖² + 2p(σ_sum/n̂)² + 2σ_square/n̂), at least
    b·`MIN_CENTRE_CLIP`: κ × the root mean square of ‖g − c‖ as estimated (‖c‖²'s noise added back, once more
    for c's own error, and 2 sd of the square's noise: noisy sums widen the clip rather than cut the features).
    Where that is not below b (too few units for the centre to tighten anything) the centre is 0, the clip b."""
    n = max(float(noisy["count"]), 1.0)
    c = _clipped(noisy["sum"] / n, clip)
    p = len(c)
    square = float(noisy["square"]) / n - float(c @ c) + 2 * p * (std["sum"] / n) ** 2 + 2 * std["square"] / n
    tight = max(CENTRE_CLIP * math.sqrt(max(square, 0.0)), clip * MIN_CENTRE_CLIP)
    return Centre(c, tight) if tight < clip else Centre(np.zeros(p), clip)


def uncentre(stats: dict[str, np.ndarray], centre: Centre) -> dict[str, np.ndarray]:
    """The statistics of c + h from (noised) statistics of h = g − c clipped at b_c (those of g for the units
    inside the clip): S_c + n_c·c, M + c sᵀ + s cᵀ + N·c cᵀ with s = Σ_c S_c and N = Σ_c n_c (exact algebra:
    the scatter about the overall mean and each class's is unchanged, noise included)."""
    c, n, s = centre.point, stats["counts"], stats["sums"].sum(0)
    cross = np.outer(c, s)
    moments = stats["moments"] + (cross + cross.T) + float(n.sum()) * np.outer(c, c)  # symmetric to the bit
    return {**stats, "sums": stats["sums"] + np.outer(n, c), "moments": moments}


Pass = Callable[[Callable[[np.ndarray, Sequence[int], np.ndarray], dict[str, np.ndarray]]], dict[str, np.ndarray]]


def dp_release(one_pass: Pass, z: float, clip: float, num_classes: int, proj: np.ndarray, normal: Any
               ) -> tuple[dict[str, np.ndarray], dict[str, float], Centre]:
    """The DP statistics: two Gaussian releases of sensitivity C, the centre sums at noise multiplier z/√ρ,
    then the statistics of h = g − c at z/√(1−ρ) (ρ = `CENTRE_SHARE`), which compose to exactly one Gaussian
    release at z (Gaussian DP: 1/z² = ρ/z² + (1−ρ)/z²). `one_pass(part)` sums `part(feats, labels, weights)`
    over the data; `normal(shape)` draws standard normals. Returns the statistics of g (`uncentre`), the sd of
    their noise (at b_c) and the centre."""
    first = centre_noise_std(z / math.sqrt(CENTRE_SHARE), clip)
    centre = centre_of(add_noise(one_pass(lambda f, _y, w: centre_contributions(f, w, proj, clip)), first, normal),
                       first, clip)
    std = noise_std(z / math.sqrt(1 - CENTRE_SHARE), centre.clip)
    stats = one_pass(lambda f, y, w: contributions(f, y, w, num_classes, proj, clip, centre))
    return uncentre(add_noise(stats, std, normal), centre), std, centre


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
    mean = s.sum(0) / total
    means = np.where(known[:, None], s / counts[:, None], mean)
    noise_share = sd["sums"] ** 2 * float((1 / counts[known]).sum())  # E of the noise's share of Σ_c S_c S_cᵀ/n_c
    offsets = means[known] - mean  # scatter about the overall mean: the same whatever the statistics' centre
    within = m - total * np.outer(mean, mean) - (offsets.T * counts[known]) @ offsets + noise_share * np.eye(p)
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
