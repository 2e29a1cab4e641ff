"""Privacy maths and the privacy ledger.

Every guarantee taskvec records is one ledger entry that names its mechanism, its unit of privacy and
how ε was computed. Nothing without noise is ever recorded as DP.
"""

from __future__ import annotations

import math
from typing import Any

from taskvec.errors import PrivacyError

ANALYTIC_GAUSSIAN = "analytic-gaussian (Balle & Wang 2018)"


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def analytic_gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """δ(ε) of one Gaussian mechanism with σ = noise_multiplier × sensitivity (Balle & Wang 2018, Thm 8)."""
    mu = 1.0 / noise_multiplier
    a = _phi(mu / 2 - epsilon / mu)
    b_arg = -mu / 2 - epsilon / mu
    b = math.exp(epsilon + math.log(_phi(b_arg))) if _phi(b_arg) > 0 else 0.0
    return max(a - b, 0.0)


def _bisect(f: Any, lo: float, hi: float, iters: int = 200) -> float:
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid):
            hi = mid
        else:
            lo = mid
    return hi


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Smallest ε such that the Gaussian mechanism with this noise multiplier is (ε, δ)-DP."""
    _check_delta(delta)
    if noise_multiplier <= 0:
        raise PrivacyError("noise multiplier must be > 0")
    if analytic_gaussian_delta(0.0, noise_multiplier) <= delta:
        return 0.0
    hi = 1.0
    while analytic_gaussian_delta(hi, noise_multiplier) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return _bisect(lambda e: analytic_gaussian_delta(e, noise_multiplier) <= delta, 0.0, hi)


def gaussian_noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest noise multiplier that makes one Gaussian release (ε, δ)-DP."""
    _check_delta(delta)
    if epsilon <= 0:
        raise PrivacyError("epsilon must be > 0")
    hi = 1.0
    while analytic_gaussian_delta(epsilon, hi) > delta:
        hi *= 2
    return _bisect(lambda z: analytic_gaussian_delta(epsilon, z) <= delta, 0.0, hi)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1), got {delta}")


def gaussian_output_entry(noise_multiplier: float, clip: float, delta: float, run_id: str | None) -> dict[str, Any]:
    """Ledger entry for one export-time Gaussian release of a site's whole clipped contribution."""
    return {
        "mechanism": "gaussian-output",
        "unit": "site",
        "epsilon": gaussian_epsilon(noise_multiplier, delta),
        "delta": delta,
        "accountant": ANALYTIC_GAUSSIAN,
        "noise_multiplier": noise_multiplier,
        "sample_rate": 1.0,
        "steps": 1,
        "clip": clip,
        "run_id": run_id,
    }


def summarize_ledger(ledger: list[dict[str, Any]]) -> str:
    """One line for humans: 'no DP' or each mechanism's (ε, δ) and unit."""
    if not ledger:
        return "no DP"
    return "; ".join(
        f"{e['mechanism']} ε={e['epsilon']:.3g} δ={e['delta']:.1e} per {e['unit']}" for e in ledger
    )
