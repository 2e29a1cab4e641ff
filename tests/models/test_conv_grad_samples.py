"""Per-example gradients of convolutions (taskvec's depthwise sampler, Opacus's for the rest, timm's SAME-padded
Conv2dSame) against single-example backward passes."""

from __future__ import annotations

import pytest
import torch
from grad_samples import per_sample_grads_match
from timm.layers import Conv2dSame
from torch import nn

from taskvec.models.dp_ready import FrozenBatchNorm2d
from taskvec.models.spec import build_base

CONVS = {
    "depthwise k3 stride 2 pad 1": lambda: nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6),
    "depthwise k5 stride 2 pad 2, odd input": lambda: nn.Conv2d(6, 6, 5, stride=2, padding=2, groups=6, bias=False),
    "depthwise k3 dilation 2 stride (1, 2)": lambda: nn.Conv2d(6, 6, 3, stride=(1, 2), padding=(2, 1), dilation=2,
                                                                groups=6),
    "depthwise padding same": lambda: nn.Conv2d(6, 6, 4, padding="same", groups=6),
    "depthwise reflect padding": lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6, padding_mode="reflect"),
    "depthwise Conv2dSame stride 2": lambda: Conv2dSame(6, 6, 5, stride=2, groups=6),
    "Conv2dSame stride 2": lambda: Conv2dSame(6, 4, 3, stride=2),
    "grouped (not depthwise)": lambda: nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2),
    "depthwise multiplier 2": lambda: nn.Conv2d(6, 12, 3, padding=1, groups=6),
    "dense": lambda: nn.Conv2d(6, 4, 3, padding=1),
}


@pytest.mark.parametrize("name", CONVS)
def test_convolution_per_sample_gradients_are_exact(name: str) -> None:
    torch.manual_seed(0)
    conv = CONVS[name]()
    size = 11  # odd: stride 2 leaves the last row out, SAME padding is asymmetric
    out_channels = conv(torch.zeros(1, 6, size, size)).flatten(1).shape[1]
    model = nn.Sequential(nn.Conv2d(3, 6, 1), conv, nn.Tanh(), nn.Flatten(), nn.Linear(out_channels, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, size, size, generator=g), torch.randint(0, 3, (5,), generator=g)
    assert per_sample_grads_match(model, x, y) == (6 if conv.bias is not None else 5)


def test_lite0_blocks_per_sample_gradients_are_exact() -> None:
    """Every parameter of tf_efficientnet_lite0's block types (random weights, frozen BatchNorm with non-trivial
    statistics): SAME-padded stride-2 stem and depthwise convolutions, 3×3 and 5×5 depthwise, pointwise, head."""
    module, _ = build_base("tf_efficientnet_lite0", num_classes=3, img_size=32, dp_compatible=True,
                           dp_norm="frozen-batchnorm", seed=0)
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)
    depthwise = [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 16 and sum(isinstance(m, Conv2dSame) for m in depthwise) == 4
    x = torch.randn(3, 3, 32, 32, generator=g)
    y = torch.randint(0, 3, (3,), generator=g)
    assert per_sample_grads_match(module.train(), x, y) == sum(1 for _ in module.parameters())
