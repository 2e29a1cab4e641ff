"""`head`: the classifier (segmentation: the decoder and segmentation head), everything else frozen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskvec.training.modes.base import TrainMode, head_names, register

if TYPE_CHECKING:
    from torch import nn


@register
class Head(TrainMode):
    name = "head"
    lr = 3e-3
    trains_features = False

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        return head_names(net, task)
