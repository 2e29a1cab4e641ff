"""The class-means head (`finetune --train class-means`): a classifier set in closed form from the base's frozen
features in one pass over the data, with no gradient step: the nearest class mean (Mensink et al. 2013), a
strong differentially private baseline for transfer from a pretrained backbone on few images (Tobaben et al.
2023), where DP-SGD's noise grows with the square root of the trained dimension and swamps a small site.

Each image's pooled feature f (timm's `forward_head(..., pre_logits=True)`) is scaled to unit length. The nearest
class mean on unit features scores class c by μ_c·f/‖f‖ − ‖μ_c‖²/2, μ_c the mean of its images' unit features.
The model applies its head to the raw features, so the head is W_c = μ_c/ν, b_c = −‖μ_c‖²/2 with ν the
geometric mean of the feature norms: exact for an image of typical norm, and the ranking of images by a class's
score (AUROC) is that of cosine similarity to the means.

Under DP every unit (an image, or a patient: the mean over their images) contributes one vector of L2 norm at most
`max_grad_norm` C: in its class's row its unit feature and a count of 1, both scaled by Cα, and its log feature
norm (clamped to ±`LOG_NORM_RANGE`, scaled by Cβ/`LOG_NORM_RANGE`), α² + α² + β² = 1. The sums get Gaussian noise
N(0, (zC)²) per coordinate, once: a `gaussian-sum` release, one DP-SGD step at sampling rate 1 for the accountants
(add-remove); a given noise multiplier whose ε passes a target ε is refused before the pass. Means, counts, ν
and the noise's expected share of ‖μ_c‖² (subtracted) come from the noisy sums: post-processing. A class with
too few images to tell from the noise (without DP: none) is put at the mean of all images, where it takes no
side; merging then averages each site's rows μ_c/ν and biases, a site without a class adding a neutral row.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import nn

from taskvec.errors import TaskvecError
from taskvec.models.spec import ModelSpec
from taskvec.privacy.dpsgd import DPConfig, secret_generator
from taskvec.privacy.mechanisms.gaussian_sum import GaussianSum, release_noise
from taskvec.progress import Track, no_track
from taskvec.training.data import ImageDataset, Normalizer, make_loader
from taskvec.training.sufficient import LOG_NORM_RANGE  # log feature norms are clamped to ±10

NORM_SHARE = 0.25  # β: the share of each unit's vector (L2) that carries its log feature norm
ALPHA = math.sqrt((1 - NORM_SHARE**2) / 2)  # α: the unit feature's and the count's (2α² + β² = 1)


def class_means_head(
    net: nn.Module, spec: ModelSpec, data: ImageDataset, *, device: torch.device, batch_size: int,
    dp: DPConfig | None = None, run_id: str | None = None, track: Track[Any] = no_track,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    """(weight, bias) of the class-means head of `net` (a timm classifier) on `data`, and the `gaussian-sum`
    ledger entry of its release under `dp` (None without DP). Patient ids in `data` make the unit a patient."""
    timm_net: Any = net.eval()  # timm's feature API (the mode checked that its classifier is linear)
    if len(data) == 0:
        raise TaskvecError("train class-means: no training images")
    z, entry = 0.0, None
    if dp is not None:  # the mechanism first: an over-budget release is refused before the pass
        z, entry = _release(dp, run_id, unit="patient" if data.groups is not None else "image")
    groups = data.groups if dp is not None else None
    weights = unit_weights(groups, len(data))
    clip = dp.max_grad_norm if dp is not None else 1.0
    norm = Normalizer(spec, device)
    k, d = spec.num_classes, timm_net.get_classifier().in_features
    table = torch.zeros(k, d + 1, dtype=torch.float64, device=device)  # per class: Σ unit features, count
    log_norms = torch.zeros(1, dtype=torch.float64, device=device)
    seen = 0
    with torch.no_grad():
        for x, y in track(make_loader(data, batch_size, device), "class means", math.ceil(len(data) / batch_size)):
            feats = timm_net.forward_head(timm_net.forward_features(norm(x.to(device))), pre_logits=True).double()
            if not feats.isfinite().all():
                raise TaskvecError("train class-means: the base's features of a training image are not finite")
            rows = unit_vectors(feats, clip) * weights[seen:seen + len(y)].to(device)[:, None]
            table.index_add_(0, y.to(device).long(), rows[:, :-1])
            log_norms += rows[:, -1].sum()
            seen += len(y)
    if dp is not None:  # one draw for every released coordinate
        noise = torch.randn(table.numel() + 1, generator=secret_generator("cpu", dp.seed), dtype=torch.float64)
        noise = noise.to(device) * z * clip
        table += noise[:-1].view_as(table)
        log_norms += noise[-1]
    weight, bias = head_from_sums(table, log_norms[0], clip, z)
    return weight, bias, entry


def unit_vectors(feats: torch.Tensor, clip: float) -> torch.Tensor:
    """Each image's vector in the released sums, of L2 norm at most `clip`: its unit feature and a count of 1
    (each ×`clip`·α; summed into its class's row) and its clamped log feature norm (×`clip`·β/`LOG_NORM_RANGE`,
    summed over all classes), one row per image."""
    length = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    log_norm = length.log().clamp(-LOG_NORM_RANGE, LOG_NORM_RANGE) / LOG_NORM_RANGE * NORM_SHARE
    return torch.cat([feats / length * ALPHA, torch.full_like(length, ALPHA), log_norm], 1) * clip


def _release(dp: DPConfig, run_id: str | None, unit: str) -> tuple[float, dict[str, Any]]:
    """The noise multiplier and the `gaussian-sum` ledger entry."""
    z, eps, accountant = release_noise(dp, "class means")
    return z, GaussianSum.entry(epsilon=eps, delta=dp.delta, accountant=accountant, noise_multiplier=z,
                                sample_rate=1.0, steps=1, max_grad_norm=dp.max_grad_norm, unit=unit, run_id=run_id,
                                seeded=dp.seed is not None)


def head_from_sums(table: torch.Tensor, log_norms: torch.Tensor, clip: float, z: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The head from the (noisy) sums of `unit_vectors` per class (`table`, k × (d + 1)) and of their log norms
    (noise multiplier z; 0 without noise), by post-processing: class means and counts, ν, the head. A class
    with too few images to tell from the noise (a noisy count below 3 sd of the count's noise; without noise, no
    image) is put at the mean of all images, where it takes no side, in this model or in a merge."""
    counts = table[:, -1] / (clip * ALPHA)  # images (noisy)
    total = counts.sum().clamp_min(1)
    pooled = table[:, :-1].sum(0) / (clip * ALPHA * total)
    sd = z / ALPHA  # the count noise's sd, in images
    known = counts >= max(3 * sd, 1e-9)
    means = torch.where(known[:, None], table[:, :-1] / (clip * ALPHA * counts.clamp_min(1))[:, None], pooled)
    noise_share = means.shape[1] * (sd / counts.clamp_min(1)) ** 2 * known  # E‖noise‖² of a known class mean
    square = (means.pow(2).sum(1) - noise_share).clamp_min(0)
    mean_log = (log_norms / (clip * NORM_SHARE) / total * LOG_NORM_RANGE).clamp(-LOG_NORM_RANGE, LOG_NORM_RANGE)
    return (means / mean_log.exp()).float(), (-0.5 * square).float()


def unit_weights(groups: list[str] | None, n: int) -> torch.Tensor:
    """Each image's weight: 1, or 1/(its patient's images) so that a patient's vectors sum to norm ≤ `clip`."""
    if groups is None:
        return torch.ones(n, dtype=torch.float64)
    count = Counter(groups)
    return torch.tensor([1.0 / count[g] for g in groups], dtype=torch.float64)
