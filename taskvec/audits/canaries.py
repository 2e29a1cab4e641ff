"""One-shot empirical privacy estimation of the export mechanism (Andrew et al., ICLR 2024, "One-shot
empirical privacy estimation for federated learning").

`k` random canary vectors, each clipped to the sensitivity C by the export code's own `clip_`, are summed
into one release that gets the export code's own noise (`add_noise_`, σ = z·C) once. Every canary is then
one contribution to one Gaussian release: the claim under test is the site add-remove ε of one export.
The auditor measures the cosine of each canary with the release. Without the canary that cosine would
follow the null N(0, 1/d) (a random direction in d dimensions); with it the cosines are shifted. Two
numbers come out, at the file's δ:

- the paper's estimate: ε between the null N(0, 1/d) and a Gaussian fitted to the observed cosines;
- a lower bound at nominal confidence 1 − α (default 95%): the best threshold test on the cosines, its
  false-positive rate exact under the null (as in the paper), its false-negative rate bounded for all
  thresholds at once. The confidence is approximate: the bound treats the cosines as independent, but the
  canaries share one noise draw.

A correct mechanism gives an estimate near the claimed ε and a lower bound below it; a broken one (no
noise) gives a large lower bound. Canaries span the first tensors of the vector up to `max_dim`
coordinates (the noise is drawn for every coordinate of those tensors).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from taskvec.errors import ConfigError, PrivacyError, check_range

DEFAULT_CANARIES = 1000
MAX_CANARIES = 100_000  # each is one pass over the vector: beyond it the audit runs for hours and says no more
DEFAULT_MAX_DIM = 1_000_000
MIN_DIM = 1000  # below it the null N(0, 1/d) is not accurate enough


@dataclass
class CanaryAudit:
    """What one audit measured: the mechanism's parameters, the claim and the two empirical ε."""

    canaries: int
    dim: int
    clip: float
    noise_multiplier: float
    delta: float
    claimed_epsilon: float
    cosine_mean: float
    cosine_std: float
    epsilon_estimate: float
    epsilon_lower_bound: float
    confidence: float


def _region_mass(a: float, b: float, c: float, mean: float, std: float) -> float:
    """Pr[a·Y² + b·Y + c > 0] for Y ~ N(mean, std²)."""
    cdf = stats.norm(mean, std).cdf
    if abs(a) < 1e-12 * max(abs(b), 1e-300) or a == 0:
        if b == 0:
            return 1.0 if c > 0 else 0.0
        t = -c / b
        return float(1 - cdf(t)) if b > 0 else float(cdf(t))
    disc = b * b - 4 * a * c
    if disc <= 0:
        return 1.0 if a > 0 else 0.0
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    inside = float(cdf(r2) - cdf(r1))
    return 1 - inside if a > 0 else inside


def _delta(eps: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """δ(ε) of telling Q from P: Pr_Q[L > ε] − e^ε·Pr_P[L > ε], L = log q/p (a quadratic in y)."""
    (mp, sp), (mq, sq) = p, q
    a = 0.5 / sp**2 - 0.5 / sq**2
    b = mq / sq**2 - mp / sp**2
    c = 0.5 * mp**2 / sp**2 - 0.5 * mq**2 / sq**2 + math.log(sp / sq) - eps
    mass_p = _region_mass(a, b, c, mp, sp)
    return _region_mass(a, b, c, mq, sq) - (math.exp(min(eps, 700.0)) * mass_p if mass_p > 0 else 0.0)


def epsilon_two_gaussians(p: tuple[float, float], q: tuple[float, float], delta: float) -> float:
    """Smallest ε such that N(mean, std²) distributions `p` and `q` are (ε, δ)-indistinguishable both ways."""

    def over(eps: float) -> bool:
        return max(_delta(eps, p, q), _delta(eps, q, p)) > delta

    if not over(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while over(hi):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if over(mid) else (lo, mid)
    return hi


def epsilon_lower_bound(cosines: np.ndarray, dim: int, delta: float, alpha: float = 0.05) -> float:
    """ε lower bound at nominal confidence 1 − α (approximate: the DKW band assumes independent cosines, and the
    canaries share one noise draw): the best threshold test at the observed cosines, its FPR exact under the
    null N(0, 1/d), its FNR bounded above for all thresholds at once by the one-sided DKW band (Massart 1990).
    (Per-threshold intervals, maximized over the thresholds, overshot a correct mechanism's ε in our runs.)"""
    t = np.sort(np.asarray(cosines, dtype=np.float64))
    n = len(t)
    fnr = np.minimum(1.0, np.arange(n) / n + math.sqrt(math.log(1 / alpha) / (2 * n)))  # t[i] itself detected
    log_fpr = stats.norm.logcdf(-t * math.sqrt(dim))
    with np.errstate(divide="ignore", invalid="ignore"):
        one = np.log(1 - delta - fnr) - log_fpr  # FNR + e^ε·FPR ≥ 1 − δ
        two = np.log(1 - delta - np.exp(log_fpr)) - np.log(fnr)  # FPR + e^ε·FNR ≥ 1 − δ
    bound = np.concatenate([one, two])
    bound = bound[np.isfinite(bound)]
    return float(max(0.0, bound.max(initial=0.0)))


def canary_cosines(shapes: Sequence[Sequence[int]], clip: float, noise_multiplier: float, canaries: int,
                   seed: int | None = None) -> tuple[np.ndarray, int]:
    """Run the export mechanism once on `canaries` clipped random vectors over tensors of these shapes;
    return each canary's cosine with the release, and the dimension."""
    from taskvec.merging import export
    from taskvec.privacy.dpsgd import secret_generator

    sizes = [math.prod(s) for s in shapes]
    dim = sum(sizes)
    release = torch.zeros(dim)
    tensors = {f"t{i}": part.view(*s) for i, (part, s) in enumerate(zip(release.split(sizes), shapes))}
    base_seed = secrets.randbits(62) if seed is None else seed

    def canary(j: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(base_seed + j)
        c = torch.randn(dim, generator=g)
        return c.mul_(3 * clip / float(c.norm()))  # drawn above the clip, so the mechanism's clip must act

    for j in range(canaries):
        c = {"c": canary(j)}
        export.clip_(c, clip)
        release.add_(c["c"])
    export.add_noise_(tensors, noise_multiplier * clip, secret_generator("cpu"))
    norm = float(release.norm())
    cos = [float(canary(j) @ release) / (3 * clip * norm) for j in range(canaries)]
    return np.array(cos), dim


def audit_export_mechanism(
    shapes: Sequence[Sequence[int]], *, clip: float, noise_multiplier: float, delta: float,
    canaries: int = DEFAULT_CANARIES, confidence: float = 0.95, seed: int | None = None,
) -> CanaryAudit:
    """Claimed vs empirical ε of one export release with this clip and noise multiplier (see module doc)."""
    from taskvec.privacy.ledger import gaussian_epsilon

    check_range("clip", clip, low=0)
    check_range("noise_multiplier", noise_multiplier, low=0)
    check_range("delta", delta, low=0, high=1)
    check_range("confidence", confidence, low=0, high=1)
    if not isinstance(canaries, int) or not 10 <= canaries <= MAX_CANARIES:
        raise ConfigError(f"canaries must be an integer in 10..{MAX_CANARIES}, got {canaries!r}", field="canaries",
                          got=canaries)
    dim = sum(math.prod(s) for s in shapes)
    if dim < MIN_DIM:
        raise ConfigError(f"max_dim must give at least {MIN_DIM} coordinates, got {dim}", field="max_dim", got=dim)
    cos, dim = canary_cosines(shapes, clip, noise_multiplier, canaries, seed)
    mean, std = float(cos.mean()), float(max(cos.std(ddof=1), 1e-12))
    return CanaryAudit(
        canaries=canaries, dim=dim, clip=clip, noise_multiplier=noise_multiplier, delta=delta,
        claimed_epsilon=gaussian_epsilon(noise_multiplier, delta), cosine_mean=mean, cosine_std=std,
        epsilon_estimate=epsilon_two_gaussians((0.0, dim**-0.5), (mean, std), delta),
        epsilon_lower_bound=epsilon_lower_bound(cos, dim, delta, 1 - confidence), confidence=confidence,
    )


def audit_vector(path: Any, *, canaries: int = DEFAULT_CANARIES, max_dim: int = DEFAULT_MAX_DIM,
                 confidence: float = 0.95, seed: int | None = None) -> CanaryAudit:
    """`audit_export_mechanism` with the clip, noise multiplier, δ and tensor shapes of a noised vector
    file (its first tensors, up to `max_dim` coordinates)."""
    from taskvec.io.files import read_kind
    from taskvec.privacy.ledger import LedgerEntry, validate_ledger
    from taskvec.privacy.mechanisms.gaussian_output import GaussianOutput

    h = read_kind(path, "vector")
    ledger = [LedgerEntry.from_json(e) for e in validate_ledger(h.vector.privacy, str(h.path))]
    entries = [e for e in ledger if e.mechanism == GaussianOutput.name]
    if not entries:
        raise PrivacyError(f"{h.path}: carries no export-time noise; there is no export mechanism to audit",
                           path=h.path, field="privacy")
    check_range("max_dim", max_dim, low=0)
    shapes, dim = [], 0
    for name in sorted(h.tensors):
        if dim >= max_dim:
            break
        shapes.append(tuple(h.tensors[name].shape))
        dim += math.prod(shapes[-1])
    e = entries[-1]
    return audit_export_mechanism(shapes, clip=e.clip, noise_multiplier=e.noise_multiplier, delta=e.delta,
                                  canaries=canaries, confidence=confidence, seed=seed)
