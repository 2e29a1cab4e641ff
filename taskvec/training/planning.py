"""What a DP run will look like, from public numbers and a site's own count of units, before it touches the data
(`taskvec plan-dp`).

For each DP-SGD mode: the noise multiplier z that the run's calibration gives for the target ε at its public
schedule (`noise_and_limit` over `plan_steps`' steps at sampling rate q), and the per-step noise-to-signal
ratio z·C·√d / (q·N·C) = z·√d / (q·N): the expected L2 norm of the step's noise (N(0, (zC)²) on each of the d
trained coordinates) over the largest norm the sum of the expected q·N clipped per-unit gradients can have
(all aligned; real gradients are less aligned, so the true ratio is larger). Above 1 the noise dominates every
step.

For the statistics head (`stats-head:P`, one `gaussian-sum` release at rate 1): z₁ for the target ε, the noise
sd σ = z₁·√3·C of its sums, and the noise-to-signal ratio of a class's feature sum, σ·√p / ((N/k)·C) =
z₁·√3·√p·k / N (noise norm over p coordinates against the largest norm of the sum of a class's N/k clipped
features), with p = min(P, feature dimension) and k classes; also the expected noise norms of the released
tensors, √(k·p)·σ, √k·σ/C and p·σ·C (sums, counts, moments before symmetrising).

The recommendation is the mode with the smallest ratio (DP-SGD modes and the statistics head compared by the
ratios above, a coarse rule), with a warning when even that is above 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from taskvec.errors import ConfigError
from taskvec.io.files import read_kind
from taskvec.privacy import DEFAULT_MAX_GRAD_NORM, DEFAULT_SAMPLE_RATE
from taskvec.training.sufficient import SENSITIVITY


@dataclass
class ModePlan:
    """One mode's prediction: its noise multiplier, steps, trained (or released) coordinates and ratio."""

    mode: str
    noise_multiplier: float
    steps: int
    coordinates: int
    noise_to_signal: float
    noise_norms: dict[str, float] = field(default_factory=dict)


@dataclass
class DPPlan:
    units: int
    epsilon: float
    delta: float
    clip: float
    sample_rate: float
    modes: list[ModePlan]
    recommended: str
    warnings: list[str] = field(default_factory=list)


def plan_dp(base: str | Path, units: int, epsilon: float, delta: float = 1e-5, *, clip: float = DEFAULT_MAX_GRAD_NORM,
            sample_rate: float = DEFAULT_SAMPLE_RATE, stats_dim: int = 128, modes: list[str] | None = None) -> DPPlan:
    """Predict the DP runs of `base` on `units` units at (ε, δ) for `modes` (default: every DP-SGD mode that
    takes no count, and `stats-head:stats_dim`)."""
    from taskvec.models.spec import ModelSpec, create_module
    from taskvec.privacy.dpsgd import DPConfig, noise_and_limit
    from taskvec.training.config import FinetuneConfig
    from taskvec.training.modes import parse_mode, registered
    from taskvec.training.schedule import plan_steps

    if isinstance(units, bool) or not isinstance(units, int) or units < 1:
        raise ConfigError(f"units must be an integer >= 1, got {units!r}", field="units", got=units)
    dp = DPConfig(max_grad_norm=clip, delta=delta, target_epsilon=epsilon, sample_rate=sample_rate)
    dp.check()
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    if spec.task != "classification":
        raise ConfigError(f"plan-dp predicts classification runs; {base} is a {spec.task} base", field="base")
    names = modes or [m.name if not m.arg else f"{m.name}:{stats_dim}" for m in registered()
                      if m.arg and m.fits_in_one_pass or not m.arg and not m.fits_in_one_pass]
    plans = []
    for name in names:
        mode = parse_mode(name)
        net = create_module(spec)
        if mode.fits_in_one_pass:
            if not mode.arg:
                continue  # a one-pass mode without statistics (class means): not predicted here
            plans.append(_stats_plan(str(mode), dp, units, spec.num_classes,
                                     min(mode.k, net.get_classifier().in_features)))  # type: ignore[operator]
            continue
        config = FinetuneConfig(train=str(mode), dp=dp)
        steps = plan_steps(config)[0]
        z = noise_and_limit(dp, steps)[0]
        trained, _ = mode.prepare(net, spec.task)
        d = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        plans.append(ModePlan(str(mode), z, steps, d, z * math.sqrt(d) / (sample_rate * units),
                              {"step": z * clip * math.sqrt(d)}))
    best = min(plans, key=lambda p: p.noise_to_signal)
    warnings = [] if best.noise_to_signal <= 1 else [
        f"even {best.mode}'s noise exceeds its signal ({best.noise_to_signal:.2g}×): more units or a larger ε"]
    return DPPlan(units, epsilon, delta, clip, sample_rate, plans, best.mode, warnings)


def _stats_plan(mode: str, dp: Any, units: int, k: int, p: int) -> ModePlan:
    from taskvec.training.modes.stats_head import release_noise

    z = release_noise(dp)[0]
    sigma = z * SENSITIVITY * dp.max_grad_norm
    norms = {"sums": math.sqrt(k * p) * sigma, "counts": math.sqrt(k) * sigma / dp.max_grad_norm,
             "moments": p * sigma * dp.max_grad_norm}
    return ModePlan(mode, z, 1, k * p + k + p * p, sigma * math.sqrt(p) * k / (units * dp.max_grad_norm), norms)
