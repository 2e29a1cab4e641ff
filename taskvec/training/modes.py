"""What a site trains: `all`, `head`, `norm-bias`, `last:K`, `lora:R` or `class-means`, and what its vector
then carries.

- `all`: every parameter.
- `head`: the classifier (segmentation: the decoder and segmentation head), everything else frozen.
- `norm-bias`: every normalisation weight and bias and every bias (BitFit; Zaken et al. 2022), plus the head,
  which is new for the site's classes.
- `last:K`: the last K feature stages of the backbone and everything after them (head included).
- `lora:R`: rank-R adapters (Hu et al. 2022, through `peft`) on every 1×1 convolution and linear layer of
  the backbone, plus the head. After training the adapters are merged into the weights, so the model file has
  the base's layout; the vector stores each adapted weight's delta as rank-R factors (exact: the delta of a
  merged adapter has rank ≤ R), which the merge expands tensor by tensor.
- `class-means`: the classifier alone, set in closed form from the class means of the base's features with no
  gradient step (`taskvec.training.class_means`; classification only).

Frozen parameters get no gradient, so DP-SGD computes per-example gradients only for what is trained: the
modes other than `all` avoid the slow per-example gradients of depthwise convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from taskvec.errors import ConfigError

MODES = ("all", "head", "norm-bias", "last:K", "lora:R", "class-means")
# Peak learning rates (AdamW): fewer trained parameters take larger steps (BitFit and LoRA papers use 1e-3
# and above, full fine-tuning 1e-4 and below); DP-SGD uses the same values. class-means takes no gradient step.
DEFAULT_LR = {"all": 1e-4, "last": 3e-4, "head": 3e-3, "norm-bias": 3e-3, "lora": 1e-3, "class-means": 0.0}
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class TrainMode:
    kind: str  # all | head | norm-bias | last | lora | class-means
    k: int = 0  # stages for `last`, rank for `lora`

    def __str__(self) -> str:
        return f"{self.kind}:{self.k}" if self.kind in ("last", "lora") else self.kind

    @property
    def lr(self) -> float:
        return DEFAULT_LR[self.kind]


def parse_mode(text: str) -> TrainMode:
    """`all`, `head`, `norm-bias`, `last:K`, `lora:R` (K, R ≥ 1) or `class-means`."""
    kind, _, arg = text.strip().partition(":")
    if kind in ("all", "head", "norm-bias", "class-means") and not arg:
        return TrainMode(kind)
    if kind in ("last", "lora") and arg.isdigit() and int(arg) >= 1:
        return TrainMode(kind, int(arg))
    raise ConfigError(f"train must be one of {', '.join(MODES)} (K, R >= 1), got {text!r}", field="train", got=text)


def _is_norm(module: nn.Module) -> bool:
    from taskvec.models.dp_ready import FrozenBatchNorm2d

    return isinstance(module, (*NORM_TYPES, FrozenBatchNorm2d)) or type(module).__name__.endswith("Norm2d")


def head_prefixes(net: nn.Module, task: str) -> tuple[str, ...]:
    """Parameter-name prefixes of the head: timm's classifier, or smp's decoder and segmentation head."""
    if task == "segmentation":
        return ("decoder.", "segmentation_head.")
    name = getattr(net, "pretrained_cfg", {}).get("classifier", "head")
    names = name if isinstance(name, (list, tuple)) else [name]
    return tuple(f"{n}." for n in names)


def _stages(net: nn.Module, task: str) -> list[str]:
    """Module names of the backbone's feature stages, shallow to deep (timm's `feature_info`)."""
    owner: Any = net.get_submodule("encoder.model") if task == "segmentation" else net
    prefix = "encoder.model." if task == "segmentation" else ""
    info = owner.feature_info
    dicts = info.get_dicts() if hasattr(info, "get_dicts") else info
    return [prefix + d["module"] for d in dicts]


def trainable_names(net: nn.Module, task: str, mode: TrainMode) -> list[str]:
    """Names of the parameters `mode` trains (for `lora`, the head only: the adapters come on top)."""
    names = [n for n, _ in net.named_parameters()]
    head = head_prefixes(net, task)
    if mode.kind == "all":
        return names
    if mode.kind in ("head", "lora", "class-means"):
        return [n for n in names if n.startswith(head)]
    if mode.kind == "norm-bias":
        modules = dict(net.named_modules())
        return [n for n in names if n.startswith(head) or n.endswith(".bias") or _is_norm(modules[n.rsplit(".", 1)[0]])]
    stages = _stages(net, task)
    if mode.k > len(stages):
        raise ConfigError(f"train last:{mode.k} asks for more stages than the backbone has ({len(stages)})",
                          field="train", got=str(mode))
    first = stages[-mode.k]
    start = next(i for i, n in enumerate(names) if n.startswith(first + "."))
    return names[start:] + [n for n in names[:start] if n.startswith(head)]


def lora_targets(net: nn.Module, task: str) -> list[str]:
    """Modules that get adapters: every 1×1 convolution (not grouped) and linear layer outside the head."""
    head = head_prefixes(net, task)
    return [n for n, m in net.named_modules() if not (n + ".").startswith(head) and (
        isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1))]


def prepare(net: nn.Module, task: str, mode: TrainMode,
            keep_head: bool = False) -> tuple[nn.Module, list[str], dict[str, int]]:
    """Freeze what `mode` does not train (and the head with `keep_head`) and add LoRA adapters for `lora`.
    Returns the module to train, the base keys trained as full deltas, and the adapted base keys with their rank."""
    train = set(trainable_names(net, task, mode))
    if keep_head:
        train = {n for n in train if not n.startswith(head_prefixes(net, task))}
    for n, p in net.named_parameters():
        p.requires_grad_(n in train)
    if mode.kind != "lora":
        return net, sorted(train), {}
    from peft import LoraConfig, inject_adapter_in_model

    targets = lora_targets(net, task)
    config = LoraConfig(r=mode.k, lora_alpha=mode.k, target_modules=targets, lora_dropout=0.0, bias="none")
    net = inject_adapter_in_model(config, net)
    for n, p in net.named_parameters():  # peft freezes everything but its adapters; the head trains too
        if n in train:
            p.requires_grad_(True)
    return net, sorted(train), {f"{t}.weight": mode.k for t in targets}


def merge_adapters(net: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back: the base's layout again."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(net.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    for p in net.parameters():
        p.requires_grad_(True)
    return net


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with `B @ A == delta.reshape(out, -1)` up to rounding, for a delta of rank ≤ `rank` (truncated SVD,
    the singular values split evenly between the factors)."""
    u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return (root[:, None] * vh[:r]).float(), (u[:, :r] * root[None, :]).float()


def mode_record(mode: TrainMode, trained: list[str], lora: dict[str, int]) -> dict[str, Any]:
    """What a fine-tuned model file records of its training mode (read by export)."""
    return {"mode": str(mode), "trained": trained, "lora": lora}
