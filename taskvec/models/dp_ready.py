"""DP-ready bases: the architecture changes DP-SGD needs, made once in the shared base.

Per-example gradients (Opacus) need every layer to treat examples independently and no module output to
be modified in place. timm models break both: BatchNorm (including timm's `BatchNormAct2d`, which
Opacus's validator does not see) mixes examples, and ResNets use `ReLU(inplace=True)` and
`x += shortcut`. `make_dp_compatible` switches in-place activations off, swaps timm's residual blocks for
subclasses that add the shortcut out of place, and replaces every BatchNorm by one of:

- `frozen-batchnorm` (the default for pretrained bases): the same BatchNorm with its pretrained running
  statistics frozen, i.e. the per-channel affine map `weight·(x − mean)/√(var + eps) + bias`. It treats
  examples independently, so per-example clipping is exact, and keeps what pretraining learned. Its keys
  are the BatchNorm's, so a converted base has the same layout as the pretrained one.
- `groupnorm`: GroupNorm with the BatchNorm's affine weight and bias (statistics are discarded); for bases
  without pretrained statistics.

The conversion is recorded in the model spec, so `load_model` rebuilds the same module. ViT and ConvNeXt
(LayerNorm) need no change.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.conv import compute_conv_grad_sample
from timm.layers import Conv2dSame, pad_same
from timm.models.resnet import BasicBlock, Bottleneck
from torch import nn

from taskvec.errors import ConfigError, TaskvecError

MAX_GROUPS = 32
NORMS = ("frozen-batchnorm", "groupnorm")


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


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with frozen running statistics (a per-channel affine map; per-example safe), followed by the
    activation of timm's `BatchNormAct2d` when it replaces one (Identity otherwise). Trainable: `weight` and
    `bias`, with the exact per-example gradients of `frozen_batchnorm_grad_sample`."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        c = bn.num_features
        self.eps = bn.eps
        self.weight = nn.Parameter(bn.weight.detach().clone() if bn.affine else torch.ones(c))
        self.bias = nn.Parameter(bn.bias.detach().clone() if bn.affine else torch.zeros(c))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            ref = getattr(bn, name, None)
            default = torch.zeros(c) if name == "running_mean" else torch.ones(c)
            self.register_buffer(name, ref.detach().clone() if ref is not None else default)
        if not isinstance(getattr(bn, "drop", nn.Identity()), nn.Identity):
            raise TaskvecError("a BatchNorm with dropout inside cannot be frozen exactly; use dp_norm='groupnorm'")
        self.act: nn.Module = getattr(bn, "act", None) or nn.Identity()

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.running_mean.view(1, -1, 1, 1)) * torch.rsqrt(self.running_var + self.eps).view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.normalized(x) * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1))  # type: ignore[no-any-return]


@register_grad_sampler(FrozenBatchNorm2d)
def frozen_batchnorm_grad_sample(
    layer: FrozenBatchNorm2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradients of weight and bias: Σ over pixels of g·x̂ and of g, where g is the gradient before
    the activation (recomputed from the saved input: Opacus hands over the gradient after it)."""
    x_hat = layer.normalized(activations[0].detach())
    g = backprops
    if not isinstance(layer.act, nn.Identity):
        with torch.enable_grad():
            pre = (x_hat * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)).detach().requires_grad_()
            (g,) = torch.autograd.grad(layer.act(pre), pre, backprops)
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = (g * x_hat).sum((2, 3))
    if layer.bias.requires_grad:
        out[layer.bias] = g.sum((2, 3))
    return out


def padded_input(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The input as `layer` pads it before convolving: timm's `Conv2dSame` pads like TensorFlow's SAME (by the
    input's size), nn.Conv2d by its `padding` (numbers, "same" or "valid") and `padding_mode`."""
    if isinstance(layer, Conv2dSame):
        return pad_same(x, list(layer.kernel_size), list(layer.stride), list(layer.dilation))
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return nn.functional.pad(x, layer._reversed_padding_repeated_twice, mode=mode)


@register_grad_sampler([nn.Conv2d, Conv2dSame])
def conv2d_grad_sample(
    layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Exact per-example gradients of a 2-D convolution, for any padding (timm's `Conv2dSame` too, which Opacus
    would differentiate whole with vmap, and `padding_mode`, which Opacus's sampler ignores).

    Depthwise (groups = input = output channels): example b's weight gradient of channel c is
    Σ_{h,w} x_pad[b, c, h·s + i·d, w·s + j·d] · g[b, c, h, w], the correlation of the padded input with the
    output gradient, computed as one convolution with b × c groups (stride and dilation swapped). Other
    convolutions: the unfolded input times the output gradient, group by group (Opacus's sampler multiplies
    every pair of groups and keeps the diagonal: `groups` times the work). A plain zero-padded convolution without
    groups is Opacus's (its strided unfold copies less)."""
    if type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)  # type: ignore[no-any-return]
    x = padded_input(layer, activations[0].detach().to(backprops.dtype))
    n, c = x.shape[:2]
    out = {}
    if layer.weight.requires_grad and layer.groups == c == layer.out_channels and n > 0:
        kh, kw = layer.kernel_size
        g = backprops.reshape(n * c, 1, *backprops.shape[2:])
        corr = nn.functional.conv2d(x.reshape(1, n * c, *x.shape[2:]), g, stride=layer.dilation,
                                    dilation=layer.stride, groups=n * c)
        out[layer.weight] = corr[0, :, :kh, :kw].reshape(n, *layer.weight.shape)
    elif layer.weight.requires_grad:
        cols = nn.functional.unfold(x, layer.kernel_size, dilation=layer.dilation, stride=layer.stride)
        cols = cols.reshape(n, layer.groups, cols.shape[1] // layer.groups, cols.shape[-1])
        g = backprops.reshape(n, layer.groups, layer.out_channels // layer.groups, cols.shape[-1])
        out[layer.weight] = torch.einsum("ngol,ngpl->ngop", g, cols).reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum((2, 3))
    return out


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


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"dp_norm must be one of {', '.join(NORMS)}, got {norm!r}", field="dp_norm", got=norm)


def make_dp_compatible(module: nn.Module, norm: str = "groupnorm", max_groups: int = MAX_GROUPS) -> dict[str, int]:
    """Convert `module` in place for DP-SGD; return how many layers of each kind were changed."""
    check_norm(norm)
    counts = {"batchnorm": 0, "inplace": 0, "residual_blocks": 0}
    blocks = RESIDUAL_BLOCKS
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = FrozenBatchNorm2d(child) if norm == "frozen-batchnorm" else _group_norm(child, max_groups)
                setattr(parent, name, new)
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


def dp_spec(norm: str = "groupnorm", max_groups: int = MAX_GROUPS) -> dict[str, Any]:
    """What a model spec records of the conversion (enough for `create_module` to redo it)."""
    check_norm(norm)
    return {"norm": norm, "max_groups": max_groups}
