"""`class-means`: the classifier alone, set in closed form from the class means of the base's features with no
gradient step (`taskvec.training.class_means`; classification only, one process). With `dp` its one release is a
`gaussian-sum`, not DP-SGD."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from taskvec.training.modes.base import OnePassHead, register

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

    from taskvec.models.spec import ModelSpec
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.progress import Track
    from taskvec.training.data import ImageDataset


@register
class ClassMeans(OnePassHead):
    name = "class-means"
    help = ("the head in closed form from the class means of the base's features: one pass, no gradient step; "
            "with DP one Gaussian release, far less noise than DP-SGD on small data")
    pass_name = "class means"

    def fit(self, net: nn.Module, spec: ModelSpec, data: ImageDataset, *, device: torch.device, batch_size: int,
            dp: DPConfig | None, run_id: str, track: Track[Any], run_dir: Path) -> list[dict[str, Any]]:
        """Set the head to the class-means head; its `gaussian-sum` entry under `dp`."""
        import torch

        from taskvec.errors import ConfigError
        from taskvec.training.class_means import class_means_head

        if not isinstance(net.get_classifier(), torch.nn.Linear):  # type: ignore[operator]
            raise ConfigError(f"train {self.name} needs a linear classifier; {spec.arch}'s is "
                              f"{type(net.get_classifier()).__name__}", field="train", got=self.name)  # type: ignore[operator]

        weight, bias, entry = class_means_head(net, spec, data, device=device, batch_size=batch_size, dp=dp,
                                               run_id=run_id, track=track)
        head: Any = net.get_classifier()  # type: ignore[operator]
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
        return [entry] if entry is not None else []
