"""What a DP run will look like, from public numbers and a site's own count of units, before it touches the data
(`taskvec plan-dp`).

For each DP-SGD mode: the noise multiplier z that the run's calibration gives for the target ε at its public
schedule (`noise_and_limit` over `plan_steps`' steps at sampling rate q), and the per-step noise-to-signal
ratio z·C·√d / (q·N·C) = z·√d / (q·N): the expected L2 norm of the step's noise (N(0, (zC)²) on each of the d
trained coordinates) over the largest norm the sum of the expected q·N clipped per-unit gradients can have
(all aligned; real gradients are less aligned, so the true ratio is larger). Above 1 the noise dominates every
step.

For the statistics head (`stats-head:P`, one `gaussian-sum` release at rate 1, made of a centre release and the
statistics' release at z₁/√(1−ρ); `taskvec.training.sufficient`): z₁ for the target ε, the largest noise sd of
each statistic (`sufficient.noise_bound`: at the clip b of ‖g‖, p = min(P, feature dimension d); the run's
own is smaller by b_c/b on the sums and (b_c/b)² on the moments, b_c the clip its centre release sets), and the
noise-to-signal ratio of a class's feature sum, σ_S·√p / ((N/k)·b) = z₁·√p·k / (√(1−ρ)·a_S·N) (noise norm
over p coordinates against the largest norm of the sum of a class's N/k clipped projected unit features; k
classes, a_S² the sums' share); also the largest expected noise norms of the released tensors, √(k·p)·σ_S,
√k·σ_n, p·σ_M (before symmetrising) and σ_L.

P itself is recommended (`stats_dim`) as the largest of `STATS_DIMS` (at most d) whose moment noise ratio
ρ(p) = √(2p)·σ_M·d / (√K·N) is at most `MAX_MOMENT_RATIO`: the scale of the symmetrised moment noise's
spectral norm (√(2p)·σ_M; √K·σ_M once K sites of N units each are summed) over the mean eigenvalue of the
second moment of K·N projected unit features (K·N/d, as E‖g‖² = p/d). A larger p keeps more of the feature
but lets the noise swamp more of the covariance, which the LDA head then floors. The threshold 3 is set on
the PBC benchmark (docs/results/stats_head.md, 5 iid sites): among P = 64, 128, 256 it picks the one of the
best balanced accuracy, or one within a seed's sd of it, for the merged, single-site and centralised heads at
ε = 1, 3 and 8 (256 where it would pick 512, untested). AUROC favours the largest P measured at every ε.

On a segmentation base the units are images and the statistics are per pixel (the features the segmentation
head's convolution reads; each image's pixels weigh 1/pixels, so an image is bounded as one classification
unit is): the same formulas hold with N images, d the pixel feature's dimension and N/k read as a class's
share of the pixel mass.

Two stages under one budget (`stats_share` s): the statistics head is planned at ε·s, and each DP-SGD mode from
it at what that release leaves of ε (its noise calibrated so that both compose to ε, as `finetune
--epsilon-includes-lineage` calibrates it).

The recommendation is the mode with the smallest ratio (DP-SGD modes and the statistics head compared by the ratios
above, a coarse rule), with a warning when even that is above 1. The statistics head's one release is nearly always
the least noisy, but it learns only what a linear head on the frozen features can: when it is recommended, the
DP-SGD mode that trains the features (not `head`) with the smallest ratio is recommended to follow it (`then`: two
stages under one ε) if its ratio at what the statistics leave of ε (at `stats_share`, else `STAGE_SHARE`) is at
most `MAX_STEP_RATIO`. The ratio's signal is the largest the clipped gradients can sum to, so it is a coarse guide,
and the threshold 2 is read off the PBC benchmark (docs/results/two-stage.md, 5 sites of about 2,400 images, stage
1 at 3/8 of ε): from the merged head, `norm-bias` beat the statistics head given the whole ε in AUROC and balanced
accuracy on iid sites at step ratios 0.71 (ε 8) and 1.54 (ε 3), in AUROC only under Dirichlet-0.5 label skew at the
same ratios and at 4.0 (ε 1, iid); `lora:8` at 1.37 (ε 8, iid) in AUROC only. No second stage is recommended on a
segmentation base, where none was measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from taskvec.errors import ConfigError, check_range
from taskvec.io.files import read_kind
from taskvec.io.schema import MAX_COUNT, MAX_STEPS
from taskvec.privacy import DEFAULT_MAX_GRAD_NORM, DEFAULT_SAMPLE_RATE
from taskvec.training.sufficient import clip_bound, noise_bound

if TYPE_CHECKING:
    from taskvec.privacy.dpsgd import DPConfig

STATS_DIMS = (16, 32, 64, 128, 256, 512)  # the projection dims recommended from
MAX_MOMENT_RATIO = 3.0  # the largest moment noise ratio ρ(p) of a recommended P
MAX_STEP_RATIO = 2.0  # the largest DP-SGD step ratio of a mode recommended to follow the statistics head
STAGE_SHARE = 0.375  # the statistics head's share of ε that a recommended second stage is planned at by default


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
    stats_dim: int | None  # the recommended P of `stats-head:P` (None: the base's classifier is not linear)
    warnings: list[str] = field(default_factory=list)
    stats_share: float | None = None  # two stages: the statistics head's share of ε, DP-SGD from it at the rest
    then: str | None = None  # two stages: the DP-SGD mode recommended from the merged statistics head
    then_noise_to_signal: float | None = None  # its step ratio at what the statistics leave of ε


def plan_dp(base: str | Path, units: int, epsilon: float, delta: float = 1e-5, *, clip: float = DEFAULT_MAX_GRAD_NORM,
            sample_rate: float = DEFAULT_SAMPLE_RATE, stats_dim: int | None = None, sites: int = 1,
            modes: list[str] | None = None, steps: int | None = None, stats_share: float | None = None) -> DPPlan:
    """Predict the DP runs of `base` on `units` units at (ε, δ) for `modes` (default: every DP-SGD mode that
    takes no count, and, when the base's classifier is linear, `stats-head:stats_dim`, the recommended P for
    statistics summed over `sites` sites of about `units` units each when None); DP-SGD runs of `steps`
    optimiser steps (default: `finetune`'s). `class-means` is not predicted.
    `stats_share`: plan two stages, the statistics head at ε·stats_share and each DP-SGD mode from it at the
    rest of ε."""
    from taskvec.models.spec import ModelSpec, create_module
    from taskvec.privacy.dpsgd import DPConfig, noise_and_limit
    from taskvec.privacy.mechanisms.gaussian_sum import release_noise
    from taskvec.training.config import FinetuneConfig
    from taskvec.training.modes import parse_mode, registered
    from taskvec.training.modes.stats_head import StatsHead, head_layer
    from taskvec.training.schedule import plan_steps

    counts = ({"units": units, "sites": sites} | ({} if stats_dim is None else {"stats_dim": stats_dim})
              | ({} if steps is None else {"steps": steps}))
    for name, value in counts.items():
        top = MAX_STEPS if name == "steps" else MAX_COUNT
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
            raise ConfigError(f"{name} must be an integer in 1..{top}, got {value!r}", field=name, got=value)
    if stats_share is not None and not 0 < stats_share < 1:
        raise ConfigError(f"stats_share must be in (0, 1), got {stats_share!r}", field="stats_share", got=stats_share)
    check_range("epsilon", epsilon, low=0)
    dp = DPConfig(max_grad_norm=clip, delta=delta, target_epsilon=epsilon, sample_rate=sample_rate)
    dp.check()
    spec = ModelSpec.from_dict(read_kind(base, "model").model.model)
    try:
        wanted = [parse_mode(name) for name in dict.fromkeys(modes or ())]
    except ConfigError as e:  # parse_mode speaks of the `train` option
        raise ConfigError("mode" + e.message.removeprefix(e.field or ""), field="mode", got=e.got) from None
    for mode in wanted:
        if mode.fits_in_one_pass and not mode.arg:
            raise ConfigError(f"mode {mode} is not predicted: plan-dp predicts the DP-SGD modes and stats-head:P",
                              field="mode", got=str(mode))
    try:
        dim: int | None = head_layer(create_module(spec), spec, StatsHead.name)[1]  # a pooled feature's, or a pixel's
    except ConfigError:
        if any(m.fits_in_one_pass for m in wanted):
            raise
        dim = None  # a classifier the statistics head cannot solve: DP-SGD modes only
    if stats_share is not None:
        z1, dp = _after_statistics(dp, epsilon * stats_share)
    else:
        z1 = release_noise(dp, "feature statistics")[0]
    if stats_dim is not None and dim is not None and stats_dim > dim:
        raise ConfigError(f"stats_dim must be at most the base's feature dimension {dim}, got {stats_dim}",
                          field="stats_dim", got=stats_dim)
    best_dim = None if dim is None else recommend_stats_dim(z1, dim, units, sites)
    if not wanted:
        wanted = [parse_mode(m.name if not m.arg else f"{m.name}:{stats_dim or best_dim}") for m in registered()
                  if m.arg and m.fits_in_one_pass and dim is not None or not m.arg and not m.fits_in_one_pass]
    plans, bodies = [], []  # bodies: the DP-SGD modes that train the features, not the head alone
    for mode in wanted:
        if mode.fits_in_one_pass and dim is not None:
            plans.append(_stats_plan(str(mode), z1, units, spec.num_classes, dim, min(mode.k, dim)))
            continue
        net = create_module(spec)
        total = plan_steps(FinetuneConfig(train=str(mode), dp=dp, steps=steps))[0]
        z = noise_and_limit(dp, total)[0]
        trained, _ = mode.prepare(net, spec.task)
        d = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        plans.append(ModePlan(str(mode), z, total, d, z * math.sqrt(d) / (sample_rate * units),
                              {"step": z * clip * math.sqrt(d)}))
        if mode.trains_features:
            bodies.append(plans[-1])
    best = min(plans, key=lambda p: p.noise_to_signal)
    warnings = [] if best.noise_to_signal <= 1 else [
        f"even {best.mode}'s noise exceeds its signal ({best.noise_to_signal:.2g}×): more units or a larger ε"]
    body = min(bodies, key=lambda p: p.noise_to_signal, default=None)
    then, ratio = None, None  # the second stage's mode and its step ratio
    if body is not None and best.mode.startswith(f"{StatsHead.name}:") and spec.task == "classification":
        ratio = body.noise_to_signal
        if stats_share is None:  # the second stage runs at what the statistics leave of ε
            second = _after_statistics(dp, epsilon * STAGE_SHARE)[1]
            ratio *= noise_and_limit(second, body.steps)[0] / body.noise_multiplier
        then, ratio = (body.mode, ratio) if ratio <= MAX_STEP_RATIO else (None, None)
    return DPPlan(units, epsilon, delta, clip, sample_rate, plans, best.mode, best_dim, warnings, stats_share,
                  then, ratio)


def _after_statistics(dp: DPConfig, epsilon: float) -> tuple[float, DPConfig]:
    """The statistics release's noise multiplier at `epsilon`, and `dp` for DP-SGD at what that release leaves of
    its target (calibrated so that both compose to it)."""
    from taskvec.privacy.mechanisms.gaussian_sum import release_noise

    z = release_noise(replace(dp, target_epsilon=epsilon), "feature statistics")[0]
    return z, replace(dp, prior=((z, 1.0, 1),))


def moment_ratio(z: float, dim: int, p: int, units: int, sites: int = 1) -> float:
    """ρ(p) = √(2p)·σ_M·d / (√K·N) (see the module docstring)."""
    return math.sqrt(2 * p) * noise_bound(z, dim, p)["moments"] * dim / (math.sqrt(sites) * units)


def recommend_stats_dim(z: float, dim: int, units: int, sites: int = 1) -> int:
    """The largest P of `STATS_DIMS` (capped at the feature dimension) with ρ(P) ≤ `MAX_MOMENT_RATIO`, else the
    smallest."""
    dims = sorted({min(p, dim) for p in STATS_DIMS})
    fit = [p for p in dims if moment_ratio(z, dim, p, units, sites) <= MAX_MOMENT_RATIO]
    return fit[-1] if fit else dims[0]


def _stats_plan(mode: str, z: float, units: int, k: int, dim: int, p: int) -> ModePlan:
    sd = noise_bound(z, dim, p)
    norms = {"sums": math.sqrt(k * p) * sd["sums"], "counts": math.sqrt(k) * sd["counts"], "moments": p * sd["moments"],
             "log_norms": sd["log_norms"]}
    ratio = sd["sums"] * math.sqrt(p) / (units / k * clip_bound(dim, p))  # σ_S·√p / ((N/k)·b)
    return ModePlan(mode, z, 1, k * p + k + p * p + 1, ratio, norms)
