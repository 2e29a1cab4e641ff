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
(add-remove). Means, counts (at least one image's worth), ν and the noise's expected share of ‖μ_c‖²,
subtracted, come from the noisy sums: post-processing.
"""

from __future__ import annotations

import math
import secrets
from collections import Counter
from typing import Any

import torch
from torch import nn

from taskvec.models.spec import ModelSpec
from taskvec.privacy.dpsgd import DPConfig, calibrate_noise
from taskvec.privacy.ledger import dp_sgd_entry, dp_sgd_epsilon
from taskvec.progress import Track, no_track
from taskvec.training.data import ImageDataset, Normalizer, make_loader

NORM_SHARE = 0.25  # β: the share of each unit's vector (L2) that carries its log feature norm
LOG_NORM_RANGE = 10.0  # log feature norms are clamped to ±10 (norms from 4.5e-5 to 2.2e4)


def class_means_head(
    net: nn.Module, spec: ModelSpec, data: ImageDataset, *, device: torch.device, batch_size: int,
    dp: DPConfig | None = None, run_id: str | None = None, track: Track[Any] = no_track,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any] | None]:
    """(weight, bias) of the class-means head of `net` (a timm classifier) on `data`, and the `gaussian-sum`
    ledger entry of its release under `dp` (None without DP). Patient ids in `data` make the unit a patient."""
    k = spec.num_classes
    groups = data.groups if dp is not None else None
    weights = _unit_weights(groups, len(data))
    clip = dp.max_grad_norm if dp is not None else 1.0
    alpha = math.sqrt((1 - NORM_SHARE**2) / 2)
    norm = Normalizer(spec, device)
    timm_net: Any = net.eval()  # timm's feature API
    sums: torch.Tensor | None = None
    log_norms = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    with torch.no_grad():
        for x, y in track(make_loader(data, batch_size, device), "class means", math.ceil(len(data) / batch_size)):
            feats = timm_net.forward_head(timm_net.forward_features(norm(x.to(device))), pre_logits=True).double()
            length = feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            w = weights[seen:seen + len(y)].to(device)[:, None] * clip
            seen += len(y)
            rows = torch.cat([feats / length, torch.ones_like(length)], 1) * w * alpha
            if sums is None:
                sums = torch.zeros(k, rows.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, y.to(device).long(), rows)
            log_norms += (length.log().clamp(-LOG_NORM_RANGE, LOG_NORM_RANGE) / LOG_NORM_RANGE * w).sum() * NORM_SHARE
    assert sums is not None, "no training images"
    entry, z = None, 0.0
    if dp is not None:
        z = dp.noise_multiplier or calibrate_noise(float(dp.target_epsilon or 0), dp.delta, 1.0, 1)
        gen = torch.Generator(device="cpu").manual_seed(dp.seed if dp.seed is not None else secrets.randbits(63))
        noise = torch.randn(sums.numel() + 1, generator=gen, dtype=torch.float64).to(device) * z * clip
        sums += noise[:-1].view_as(sums)
        log_norms += noise[-1]
        eps, accountant = dp_sgd_epsilon([(z, 1.0, 1)], dp.delta)
        entry = dp_sgd_entry(epsilon=eps, delta=dp.delta, accountant=accountant, noise_multiplier=z, sample_rate=1.0,
                             steps=1, max_grad_norm=clip, unit="patient" if groups is not None else "image",
                             run_id=run_id, mechanism="gaussian-sum")
    counts = sums[:, -1:].clamp_min(clip * alpha)  # × Cα
    means = sums[:, :-1] / counts
    square = (means.pow(2).sum(1) - means.shape[1] * (z * clip / counts[:, 0]) ** 2).clamp_min(0)
    mean_log = log_norms / (NORM_SHARE * counts.sum() / alpha) * LOG_NORM_RANGE
    return (means / mean_log.exp()).float(), (-0.5 * square).float(), entry


def _unit_weights(groups: list[str] | None, n: int) -> torch.Tensor:
    """Each image's weight: 1, or 1/(its patient's images) so that a patient's vectors sum to norm ≤ 1."""
    if groups is None:
        return torch.ones(n, dtype=torch.float64)
    count = Counter(groups)
    return torch.tensor([1.0 / count[g] for g in groups], dtype=torch.float64)
