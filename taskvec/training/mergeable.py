"""Training options that keep a site's vector mergeable under label skew: a proximal pull toward the base and
a head strategy.

**Proximal term** (`prox` μ; FedProx's local objective, Li et al. 2020: L(θ) + μ/2·‖θ − θ_base‖²). Applied as
a decoupled proximal step after every optimiser step: θ ← θ_base + (θ − θ_base) / (1 + η_t·μ), with η_t the
step's learning rate. With plain SGD this is proximal gradient descent on exactly that objective (the
closed-form proximal operator of the quadratic, stable for any μ; μ → ∞ leaves θ at the base); with AdamW,
taskvec's optimiser, it is the decoupled form, as AdamW decouples weight decay (Loshchilov & Hutter 2019), so
Adam's per-coordinate scaling does not weaken the pull. Only trained parameters are pulled, each toward the
anchor its training mode names (`TrainMode.prox_anchor`: its base value, or for an adapter's factors a zero
delta). Under DP-SGD the step runs on the parameters after the private update: it reads no data, so it is
post-processing and leaves the guarantee and the ledger unchanged.

**Head strategies** (`head`; classification only):
- `train`: the head trains with the rest (the default).
- `frozen`: keep the base's head and learn only features (FedBABU, Oh et al. 2022): every site's features
  adapt to one shared classifier, and the vector carries no head.
- `balanced`: cross-entropy weighted by the inverse frequency of each class in the site's training labels
  (weights normalised to mean 1 over the site's examples). Refused with DP-SGD: the weights come from the
  site's private label counts, and adding or removing one image changes every example's weight, which the
  DP-SGD guarantee does not cover.
- `lp-ft`: linear probe, then fine-tune (Kumar et al. 2022): for the first LP_FRACTION of the steps only the
  head is updated, then everything the training mode trains. Under DP-SGD every step is the same private
  step; during the probe the private update of the non-head parameters is discarded (post-processing), so the
  ledger is that of the same number of DP-SGD steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from taskvec.training.modes import TrainMode

LP_FRACTION = 0.5  # lp-ft: share of the steps that train the head alone


def class_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse class frequencies of `targets`, scaled to mean 1 over the examples (absent classes: weight 0)."""
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.long), minlength=num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


class WeightedCrossEntropy(nn.Module):
    """Mean over the batch of per-example cross-entropy times its class weight."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_example = nn.functional.cross_entropy(logits, target, reduction="none")
        return (per_example * self.weights[target]).mean()  # type: ignore[index]


def prox_anchors(net: nn.Module, mode: TrainMode) -> dict[str, torch.Tensor]:
    """What each trained parameter of `net`, prepared by `mode`, is pulled toward. Call before any training
    step (and before a checkpoint is loaded)."""
    anchors = {name: mode.prox_anchor(name, p) for name, p in net.named_parameters() if p.requires_grad}
    return {name: a for name, a in anchors.items() if a is not None}


class SiteSteps:
    """Hooks on the (inner, non-private) optimiser that run after the private update of each step: before it,
    the linear-probe phase drops the non-head gradients; after it, the proximal step pulls toward the anchors.
    The training loop sets `step` (the global step index) before each optimiser step."""

    def __init__(self, net: nn.Module, *, prox: float = 0.0, anchors: dict[str, torch.Tensor] | None = None,
                 head: Sequence[str] = (), probe_steps: int = 0) -> None:
        params = dict(net.named_parameters())
        self.prox = prox
        self.pull = [(params[n], a) for n, a in (anchors or {}).items()]
        self.features = [p for n, p in params.items() if p.requires_grad and not n.startswith(tuple(head))]
        self.probe_steps = probe_steps
        self.step = 0

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Register the hooks on `optimizer` (before DP-SGD wraps it: the wrapper calls it after privatising)."""
        if self.probe_steps:
            optimizer.register_step_pre_hook(self._probe)
        if self.prox:
            optimizer.register_step_post_hook(self._pull)

    def _probe(self, _optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        if self.step < self.probe_steps:
            for p in self.features:
                p.grad = None  # the optimiser skips a parameter without gradient (no update, no weight decay)

    @torch.no_grad()
    def _pull(self, optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        for p, anchor in self.pull:
            p.sub_(anchor).div_(1 + lr[id(p)] * self.prox).add_(anchor)
