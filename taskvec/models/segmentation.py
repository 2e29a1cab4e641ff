"""A small FPN-style decoder on a timm `features_only` encoder.

Why our own and not segmentation-models-pytorch: it works on every timm encoder with `features_only`
(ViT's single-stride features included), uses GroupNorm and no in-place ops (ready for DP-SGD), keeps
state_dict keys stable for merging (`encoder.*` exactly timm's, `decoder.*` ours), and adds no dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationModel(nn.Module):
    """timm encoder → 1×1 laterals to `channels` → upsample to the finest level and sum → conv → classes."""

    def __init__(self, encoder: nn.Module, num_classes: int, channels: int = 64, groups: int = 8) -> None:
        super().__init__()
        self.encoder = encoder
        in_chs = encoder.feature_info.channels()  # type: ignore[union-attr, operator]
        self.decoder = nn.ModuleDict(
            {
                "lateral": nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_chs),
                "fuse": nn.Sequential(
                    nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                    nn.GroupNorm(groups, channels),
                    nn.ReLU(),
                ),
                "head": nn.Conv2d(channels, num_classes, 1),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        size = max((f.shape[-2:] for f in feats), key=lambda s: s[0] * s[1])
        y = torch.stack(
            [
                F.interpolate(lat(f), size=size, mode="bilinear", align_corners=False)
                for lat, f in zip(self.decoder["lateral"], feats)  # type: ignore[call-overload]
            ]
        ).sum(0)
        y = self.decoder["head"](self.decoder["fuse"](y))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
