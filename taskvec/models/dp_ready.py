"""DP-ready bases: the architecture changes DP-SGD needs, made once in the shared base.

Per-example gradients (Opacus) need every layer to treat examples independently and no module output to
be modified in place. timm models break both: BatchNorm (including timm's `BatchNormAct2d`, which
Opacus's validator does not see) mixes examples, and ResNets use `ReLU(inplace=True)` and
`x += shortcut`. `make_dp_compatible` replaces BatchNorm by GroupNorm (keeping the BatchNorm's affine
weight and bias; running statistics have no GroupNorm counterpart), switches in-place activations off and
swaps timm's residual blocks for subclasses that add the shortcut out of place. State-dict keys of
everything else are unchanged. The conversion is recorded in the model spec, so `load_model` rebuilds the
same module. ViT and ConvNeXt (LayerNorm) need no change.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from taskvec.errors import TaskvecError

MAX_GROUPS = 32
DEPTHWISE_WARNING = (
    "has {n} depthwise convolutions: per-example gradients of depthwise convolutions are slow in Opacus "
    "(efficientnet_b0 measured about 50x slower under DP-SGD); prefer ViT or ConvNeXt-free ResNet/GroupNorm "
    "backbones for DP (see benchmarks/dp_overhead.py)"
)


def group_count(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Largest divisor of `channels` that is at most `max_groups` (GroupNorm needs groups | channels)."""
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def _group_norm(bn: nn.modules.batchnorm._BatchNorm, max_groups: int) -> nn.Module:
    from timm.layers import BatchNormAct2d, GroupNormAct

    c = bn.num_features
    g = group_count(c, max_groups)
    gn: nn.GroupNorm
    if isinstance(bn, BatchNormAct2d):
        gn = GroupNormAct(c, num_groups=g, eps=bn.eps, affine=bn.affine, apply_act=False)
        gn.drop, gn.act = bn.drop, bn.act
    else:
        gn = nn.GroupNorm(g, c, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn.to(bn.weight.device if bn.affine else "cpu")


def _block_tail(block: Any, x: torch.Tensor) -> torch.Tensor:
    """Squeeze-excite and drop-path, the optional end of a timm residual branch."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    return x


class DPBasicBlock(BasicBlock):
    """timm `BasicBlock` with `x = x + shortcut` (Opacus's backward hooks forbid the in-place add)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b: Any = self  # timm types its optional layers as None
        shortcut = x if b.downsample is None else b.downsample(x)
        x = b.aa(b.act1(b.drop_block(b.bn1(b.conv1(x)))))
        x = b.bn2(b.conv2(x))
        return b.act2(_block_tail(b, x) + shortcut)  # type: ignore[no-any-return]


class DPBottleneck(Bottleneck):
    """timm `Bottleneck` with `x = x + shortcut`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b: Any = self
        shortcut = x if b.downsample is None else b.downsample(x)
        x = b.act1(b.bn1(b.conv1(x)))
        x = b.aa(b.act2(b.drop_block(b.bn2(b.conv2(x)))))
        x = b.bn3(b.conv3(x))
        return b.act3(_block_tail(b, x) + shortcut)  # type: ignore[no-any-return]


RESIDUAL_BLOCKS: dict[type, type] = {BasicBlock: DPBasicBlock, Bottleneck: DPBottleneck}


def make_dp_compatible(module: nn.Module, norm: str = "groupnorm", max_groups: int = MAX_GROUPS) -> dict[str, int]:
    """Convert `module` in place for DP-SGD; return how many layers of each kind were changed."""
    if norm != "groupnorm":
        raise TaskvecError(f"unknown DP-ready normalisation {norm!r}; this taskvec knows 'groupnorm'")
    counts = {"batchnorm": 0, "inplace": 0, "residual_blocks": 0}
    blocks = RESIDUAL_BLOCKS
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, _group_norm(child, max_groups))
                counts["batchnorm"] += 1
    for m in module.modules():
        if type(m) in blocks:
            m.__class__ = blocks[type(m)]
            counts["residual_blocks"] += 1
        if getattr(m, "inplace", False) is True:
            setattr(m, "inplace", False)  # noqa: B010 - an attribute nn.Module does not declare
            counts["inplace"] += 1
    return counts


def dp_problems(module: nn.Module) -> list[str]:
    """Why `module` cannot be trained with DP-SGD as it is (empty when it can)."""
    from opacus.validators import ModuleValidator

    problems = []
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    if bn:
        problems.append(f"{bn} BatchNorm layers (they mix examples of a batch)")
    inplace = sum(getattr(m, "inplace", False) is True for m in module.modules())
    if inplace:
        problems.append(f"{inplace} in-place activations")
    blocks = sum(type(m) in RESIDUAL_BLOCKS for m in module.modules())
    if blocks:
        problems.append(f"{blocks} residual blocks that add the shortcut in place")
    errors = {str(e).splitlines()[0] for e in ModuleValidator.validate(module, strict=False)}
    problems += sorted(e for e in errors if "BatchNorm" not in e and "training mode" not in e)
    return problems


def depthwise_convolutions(module: nn.Module) -> int:
    """Number of depthwise convolutions (groups = input channels > 1)."""
    return sum(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in module.modules()
    )


def dp_spec(max_groups: int = MAX_GROUPS) -> dict[str, Any]:
    """What a model spec records of the conversion (enough for `create_module` to redo it)."""
    return {"norm": "groupnorm", "max_groups": max_groups}
