"""`lora:R`: rank-R adapters (Hu et al. 2022, through `peft`) on every 1×1 convolution and linear layer of the
backbone, plus the head. After training the adapters are merged into the weights, so the model file has the
base's layout; the vector stores each adapted weight's delta as rank-R factors (exact: the delta of a merged
adapter has rank ≤ R), which the merge expands tensor by tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from taskvec.io.layout import factor_names
from taskvec.training.modes.base import TrainMode, VectorLayout, head_names, head_prefixes, register

if TYPE_CHECKING:
    import torch
    from torch import nn


def lora_targets(net: nn.Module, task: str) -> list[str]:
    """Modules that get adapters: every 1×1 convolution (not grouped) and linear layer outside the head."""
    from torch import nn

    head = head_prefixes(net, task)
    return [n for n, m in net.named_modules() if not (n + ".").startswith(head) and (
        isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1))]


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with `B @ A == delta.reshape(out, -1)` up to rounding, for a delta of rank ≤ `rank` (truncated SVD,
    the singular values split evenly between the factors)."""
    import torch

    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).float(), (u[:, :r] * root[None, :]).float()


@register
class LoRA(TrainMode):
    name = "lora"
    arg = "R"
    help = "rank-R adapters"
    lr = 1e-3  # the LoRA paper: 1e-3 and above

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        return head_names(net, task)  # the adapters come on top

    def prepare(self, net: nn.Module, task: str, keep_head: bool = False) -> tuple[nn.Module, VectorLayout]:
        """Adapters on `lora_targets`, trained with the head; the vector factors each adapted weight's delta."""
        from peft import LoraConfig, inject_adapter_in_model

        net, layout = super().prepare(net, task, keep_head)
        targets = lora_targets(net, task)
        config = LoraConfig(r=self.k, lora_alpha=self.k, target_modules=targets, lora_dropout=0.0, bias="none")
        net = inject_adapter_in_model(config, net)
        for n, p in net.named_parameters():  # peft freezes everything but its adapters; the head trains too
            if n in layout.trained:
                p.requires_grad_(True)
        return net, VectorLayout(layout.mode, layout.trained, {f"{t}.weight": self.k for t in targets})

    def finish(self, net: nn.Module) -> nn.Module:
        """Fold every adapter into its base layer and put the base layer back: the base's layout again."""
        from peft.tuners.lora import LoraLayer

        for name, module in list(net.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
        for p in net.parameters():
            p.requires_grad_(True)
        return net

    def prox_anchor(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        """B factors toward 0 (the adapter's delta B·A is then 0); A factors (a random projection) not at all."""
        import torch

        if ".lora_A." in name:
            return None
        return torch.zeros_like(p) if ".lora_B." in name else super().prox_anchor(name, p)

    def encode(self, key: str, delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
        """A merged adapter's delta has rank ≤ R: its exact factors `KEY@lora_A`, `KEY@lora_B`."""
        return dict(zip(factor_names(key), factorize(delta, rank)))
