"""Augmentation by the 8 flips/90° rotations of the square, the same for image and mask; no colour changes."""

from __future__ import annotations

import torch

from taskvec.training.distributed import Group, augment_bits


def augment(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
            group: Group = Group()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one of the 8 symmetries of the square per sample (random transpose, then random flips of each
    axis: together every rotation by 90° and every mirror), the same to a sample's mask."""
    b = x.shape[0]
    bits = augment_bits((3, b), gen, group).bool().to(x.device)

    def apply(t: torch.Tensor) -> torch.Tensor:
        shape = (b,) + (1,) * (t.dim() - 1)
        t = torch.where(bits[0].view(shape), t.transpose(-2, -1), t)
        t = torch.where(bits[1].view(shape), t.flip(-1), t)
        return torch.where(bits[2].view(shape), t.flip(-2), t)

    return apply(x), (apply(y) if y is not None else None)
