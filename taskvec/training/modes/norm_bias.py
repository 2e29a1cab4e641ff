"""`norm-bias`: every normalisation weight and bias and every bias (BitFit; Zaken et al. 2022), plus the head,
which is new for the site's classes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskvec.training.modes.base import TrainMode, head_prefixes, register

if TYPE_CHECKING:
    from torch import nn


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: torch's, taskvec's frozen BatchNorm, or any `...Norm2d`."""
    from torch import nn

    from taskvec.models.dp_ready import FrozenBatchNorm2d

    types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    return isinstance(module, (*types, FrozenBatchNorm2d)) or type(module).__name__.endswith("Norm2d")


@register
class NormBias(TrainMode):
    name = "norm-bias"
    help = "BitFit"
    lr = 3e-3  # BitFit's paper: 1e-3 and above
    default_for = "pretrained"

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        head, modules = head_prefixes(net, task), dict(net.named_modules())
        return [n for n, _ in net.named_parameters()
                if n.startswith(head) or n.endswith(".bias") or is_norm(modules[n.rpartition(".")[0]])]
