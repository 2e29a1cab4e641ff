"""The training losses: cross-entropy (classification), cross-entropy plus soft Dice (segmentation), and the
class-weighted cross-entropy of the `balanced` head (`taskvec.training.mergeable`)."""

from __future__ import annotations

import torch
from torch import nn

from taskvec.models.spec import ModelSpec
from taskvec.training.data import ImageDataset
from taskvec.training.mergeable import WeightedCrossEntropy, class_weights


def criterion(spec: ModelSpec, train: ImageDataset, head: str) -> nn.Module:
    """Per-pixel cross-entropy plus Dice, cross-entropy, or (head balanced) class-weighted cross-entropy."""
    if spec.task == "segmentation":
        return SegmentationLoss()
    if head == "balanced":
        return WeightedCrossEntropy(class_weights(train.targets, spec.num_classes))
    return nn.CrossEntropyLoss()


class SegmentationLoss(nn.Module):
    """Cross-entropy plus soft Dice over the foreground classes, both per image then averaged over the batch
    (so the loss is a mean of per-example terms, as DP-SGD's per-example gradients need); no in-place ops.
    Dice counters the dominance of background pixels that traps cross-entropy alone at "all background".
    `target` is a class-index mask (B×H×W) or per-pixel class probabilities (B×K×H×W, soft masks)."""

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        probs = logits.softmax(1)[:, 1:]
        if target.is_floating_point():
            onehot = target[:, 1:]
        else:
            onehot = nn.functional.one_hot(target, k).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        inter = (probs * onehot).sum((2, 3))
        dice = (2 * inter + self.smooth) / (probs.sum((2, 3)) + onehot.sum((2, 3)) + self.smooth)
        return self.ce(logits, target) + (1 - dice).mean()
