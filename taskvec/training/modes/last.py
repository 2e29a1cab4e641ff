"""`last:K`: the last K feature stages of the backbone and everything after them (head included)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskvec.errors import ConfigError
from taskvec.training.modes.base import TrainMode, head_prefixes, register

if TYPE_CHECKING:
    from torch import nn


def stages(net: nn.Module, task: str) -> list[str]:
    """Module names of the backbone's feature stages, shallow to deep (timm's `feature_info`)."""
    owner: Any = net.get_submodule("encoder.model") if task == "segmentation" else net
    prefix = "encoder.model." if task == "segmentation" else ""
    info = owner.feature_info
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else info
    return [prefix + d["module"] for d in dicts]


@register
class Last(TrainMode):
    name = "last"
    arg = "K"
    help = "stages"
    lr = 3e-4

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        names, head, found = [n for n, _ in net.named_parameters()], head_prefixes(net, task), stages(net, task)
        if self.k > len(found):
            raise ConfigError(f"train {self} asks for more stages than the backbone has ({len(found)})",
                              field="train", got=str(self))
        first = found[-self.k]
        start = next(i for i, n in enumerate(names) if n.startswith(first + "."))
        return names[start:] + [n for n in names[:start] if n.startswith(head)]
