"""`all`: every parameter; the vector holds every floating tensor's delta."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskvec.training.modes.base import TrainMode, register

if TYPE_CHECKING:
    from torch import nn


@register
class Full(TrainMode):
    name = "all"
    lr = 1e-4  # full fine-tuning: 1e-4 and below
    default_for = "scratch"
    carries_all = True

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        return [n for n, _ in net.named_parameters()]
