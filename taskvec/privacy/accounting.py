"""Accounting maths: ε of the Gaussian mechanism (analytic, Balle & Wang 2018; composed exactly as Gaussian DP,
Dong, Roth & Su 2019) and of Poisson-subsampled Gaussian steps (Opacus's PRV accountant, RDP where PRV fails or
would need too much memory), and the searches that invert them (the noise for a target ε, the steps within it).

Mechanisms (`taskvec.privacy.mechanisms`) say which of these computes their ε; nothing here knows a mechanism.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from taskvec.errors import PrivacyConfigError, PrivacyError, check_range, first_line

ANALYTIC_GAUSSIAN = "analytic-gaussian (Balle & Wang 2018)"
PRV = "opacus-prv (Gopi et al. 2021)"
RDP = "opacus-rdp (fallback: PRV failed)"
RDP_LARGE = "opacus-rdp (PRV's grid over its limit)"
DP_SGD_ACCOUNTANTS = (PRV, RDP, RDP_LARGE)
# PRV discretises the privacy loss on a grid growing with ε and √steps, ~170 bytes a point at its peak: 2M points
# is ~350 MB and a few seconds. A noise multiplier of 0.05 at rate 0.5 over 50 steps would need 49M points (19 GB).
MAX_PRV_POINTS = 2_000_000
GDP_COMPOSITION = "gaussian-dp (Dong, Roth & Su 2019)"
# PRV's ε saturates at ln(float max) ≈ 709.8 (one Gaussian release at noise multiplier 0.026 gave 709.8, exactly
# 903.7): above this bound it is refused, and ε is RDP's, an upper bound
PRV_MAX_EPSILON = 500.0
MAX_NOISE_MULTIPLIER = 1e6  # the calibration's ceiling, as Opacus's: past it the noise drowns any clipped gradient


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
    check_range("noise_multiplier", noise_multiplier, low=0, error=PrivacyConfigError)
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
    check_range("epsilon", epsilon, low=0, error=PrivacyConfigError)
    hi = 1.0
    while analytic_gaussian_delta(epsilon, hi) > delta:
        hi *= 2
    return _bisect(lambda z: analytic_gaussian_delta(epsilon, z) <= delta, 0.0, hi)


def _check_delta(delta: float) -> None:
    check_range("delta", delta, low=0, high=1, error=PrivacyConfigError)


def composed_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Noise multiplier of one Gaussian release equivalent to composing these ones.

    A Gaussian release with noise multiplier z is exactly (1/z)-GDP, and GDP composes as
    μ = sqrt(Σ μᵢ²) (Dong, Roth & Su 2019), so k releases are one release with z = (Σ zᵢ⁻²)^(-1/2).
    """
    return 1.0 / math.sqrt(sum(z**-2 for z in noise_multipliers))


def accountant_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                       delta: float) -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps by the named accountant (`DP_SGD_ACCOUNTANTS`)."""
    return history_epsilon(accountant, [(noise_multiplier, sample_rate, steps)], delta)


def history_epsilon(accountant: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε of DP-SGD runs composed, each (noise multiplier, sample rate, steps), by the named accountant over all
    their steps (Opacus's accountants take such a history). PRV is refused where its grid would pass
    `MAX_PRV_POINTS` (a header naming PRV is hostile input too), and where its ε is not exact (`PrvInexact`)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant not in DP_SGD_ACCOUNTANTS:
        raise PrivacyError(f"unknown DP-SGD accountant {accountant!r} (known: {'; '.join(DP_SGD_ACCOUNTANTS)})",
                           field="accountant")
    points = prv_grid_points(history, delta) if accountant == PRV else 0.0
    if points > MAX_PRV_POINTS:
        raise PrivacyError(f"the PRV accountant would need {points:.3g} grid points for this history, over its "
                           f"limit of {MAX_PRV_POINTS:.3g} (memory); such ε is RDP's", field="accountant")
    acc: Any = PRVAccountant() if accountant == PRV else RDPAccountant()
    acc.history = [(float(z), float(q), int(t)) for z, q, t in history]
    if accountant != PRV:
        with _quiet_rdp():
            return float(acc.get_epsilon(delta))
    from scipy.integrate import IntegrationWarning

    try:
        with _quiet_rdp(), warnings.catch_warnings():
            warnings.simplefilter("error", IntegrationWarning)
            eps = float(acc.get_epsilon(delta))
    except (IntegrationWarning, ValueError, RuntimeError, ArithmeticError) as err:
        raise PrvInexact(f"the PRV accountant fails for this history ({first_line(err)}); such ε is RDP's",
                         field="accountant") from None
    if not 0 <= eps <= PRV_MAX_EPSILON:  # negative at a large δ; saturated far out
        raise PrvInexact(f"the PRV accountant's ε {eps:.6g} is not exact outside [0, {PRV_MAX_EPSILON:g}]; such ε is "
                         "RDP's", field="accountant")
    return eps


class PrvInexact(PrivacyError):
    """The PRV accountant's ε is not exact for a history (its integration fails, or ε is past its range)."""


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    """Silence RDP's warnings that its best order is at the edge of its grid of orders (at large noise, or at a
    tiny sampling rate: PRV bounds its domain with RDP; RDP's ε stays an upper bound there) and numpy's at
    sampling rate 1 (PRV's log(1 - q) is -inf there, which its formula handles) and at a tiny rate (exp
    overflows far out in PRV's domain, where the privacy loss's density is 0)."""
    import numpy as np

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


def prv_grid_points(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Points of the grid Opacus's PRV accountant discretises `history` on at its defaults (ε error 0.01, δ error
    δ/1000), as `PRVAccountant._get_domain` sizes it: the safe domain [-L, L] (from RDP) at mesh
    0.01 / √(T·ln(12/δ error)/2), T the total steps. PRV's memory and time grow with it."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    eps_error, delta_error = 0.01, delta / 1000
    steps = [int(t) for _, _, t in history]
    with _quiet_rdp():
        half = compute_safe_domain_size([PoissonSubsampledGaussianPRV(float(q), float(z)) for z, q, _ in history],
                                        steps, eps_error=eps_error, delta_error=delta_error)
    return 2 * half * math.sqrt(sum(steps) * math.log(12 / delta_error) / 2) / eps_error


def dp_sgd_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> tuple[float, str]:
    """ε of DP-SGD runs composed over all their steps and the accountant that computed it: PRV, RDP where PRV's
    ε is not exact (its integration fails far out in its domain, or ε is past `PRV_MAX_EPSILON`) or its grid
    would pass `MAX_PRV_POINTS` (RDP only bounds ε from above, and such ε is large or the run very long), so
    every call is bounded in memory and time."""
    try:
        return history_epsilon(PRV, history, delta), PRV
    except PrvInexact:
        return history_epsilon(RDP, history, delta), RDP
    except PrivacyError:  # the grid over its limit
        return history_epsilon(RDP_LARGE, history, delta), RDP_LARGE


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> tuple[float, str]:
    """ε after `steps` Poisson-subsampled Gaussian steps, and the accountant that computed it (PRV; RDP
    where PRV fails or would need too much memory: `dp_sgd_epsilon`)."""
    if steps == 0:
        return 0.0, PRV
    return dp_sgd_epsilon([(noise_multiplier, sample_rate, steps)], delta)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    prior: Sequence[tuple[float, float, int]] = ()) -> float:
    """Smallest noise multiplier (ε within 1% below the target) whose ε after `steps` steps is at most the
    target: Opacus's search (`get_noise_multiplier`: double, then bisect), on `dp_sgd_epsilon`, whose every
    call is bounded in memory (Opacus's own would run PRV at any noise it tries).

    `prior`: releases on the same data that the target covers too, each (noise multiplier, sample rate, steps)
    (a Gaussian release is one step at rate 1): the steps are then calibrated so that all of them compose to the
    target, a second stage spending exactly what the first left of one budget."""
    if prior and dp_sgd_epsilon(prior, delta)[0] >= target_epsilon:
        raise PrivacyError(f"the earlier releases already spend ε ≥ {target_epsilon:g}; nothing is left for these "
                           "steps")

    def epsilon(z: float) -> float:
        return dp_sgd_epsilon([*prior, (z, sample_rate, steps)], delta)[0] if steps else 0.0

    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise PrivacyError(f"ε = {target_epsilon:g} is out of reach in {steps} step{'s' * (steps != 1)} at rate "
                               f"{sample_rate:.3g}: it needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}, "
                               "noise under which nothing is learnt; raise the target ε")
        eps_high = epsilon(high)
    for _ in range(60):  # ε jumps where PRV gives way to RDP: the tolerance may never be met there
        if target_epsilon - eps_high <= 0.01 * target_epsilon:
            break
        mid = (low + high) / 2
        eps = epsilon(mid)
        if eps <= target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


def max_steps(noise_multiplier: float, sample_rate: float, delta: float, target_epsilon: float,
              prior: Sequence[tuple[float, float, int]] = ()) -> int:
    """The largest number of steps whose ε (composed with the `prior` releases, as in `calibrate_noise`) is at
    most the target (0 if even one step is over it)."""

    def within(steps: int) -> bool:
        return dp_sgd_epsilon([*prior, (noise_multiplier, sample_rate, steps)], delta)[0] <= target_epsilon

    if not within(1):
        return 0
    lo, hi = 1, 2
    while within(hi):
        lo, hi = hi, hi * 2
        if hi > 10**7:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if within(mid) else (lo, mid)
    return lo
