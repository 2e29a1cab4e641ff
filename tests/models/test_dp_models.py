"""DP-ready bases: BatchNorm → GroupNorm (timm's BatchNormAct2d too), in-place ops, spec round trip."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from taskvec.models.dp_ready import dp_problems, group_count, make_dp_compatible
from taskvec.models.spec import build_base, load_model, model_spec, save_model


def _opacus_step(model: nn.Module) -> None:
    """One Opacus DP-SGD step with hooks (raises if the model is not DP-ready)."""
    from opacus import PrivacyEngine

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 2, (8,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=torch.utils.data.DataLoader(data, batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
        )
        x, y = next(iter(loader))
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_group_count_divides() -> None:
    for c in (1, 3, 24, 32, 48, 64, 96, 100, 2048):
        g = group_count(c)
        assert c % g == 0 and g <= 32
        assert not any(c % h == 0 for h in range(g + 1, 33))


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
def test_conversion_makes_cnns_trainable_with_opacus(arch: str) -> None:
    from timm.layers import BatchNormAct2d

    module, _ = build_base(arch, num_classes=2, img_size=32)
    kinds = {type(m) for m in module.modules()}
    assert nn.BatchNorm2d in kinds or BatchNormAct2d in kinds
    assert dp_problems(module)
    bns = {n: (m.weight.detach().clone(), m.bias.detach().clone()) for n, m in module.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    counts = make_dp_compatible(module)
    assert counts["batchnorm"] == len(bns)
    assert dp_problems(module) == []
    mods = dict(module.named_modules())
    for name, (w, b) in bns.items():  # same place, GroupNorm, the BatchNorm's affine parameters kept
        assert isinstance(mods[name], nn.GroupNorm)
        assert torch.equal(mods[name].weight, w) and torch.equal(mods[name].bias, b)
    _opacus_step(module)


def test_unconverted_resnet_fails_under_opacus() -> None:
    """The facts the conversion exists for: BN refused, and in-place ops break per-sample hooks."""
    from opacus.validators import ModuleValidator

    module, _ = build_base("test_resnet", num_classes=2, img_size=32)
    with pytest.raises(Exception):  # noqa: B017 - opacus raises its own validation errors
        _opacus_step(module)
    fixed = ModuleValidator.fix(module)  # BN → GN only: the in-place residual add still breaks
    with pytest.raises(RuntimeError):
        _opacus_step(fixed)


def test_residual_block_output_unchanged() -> None:
    """Swapping timm's blocks for the out-of-place ones computes the same function."""
    module, _ = build_base("test_resnet", num_classes=2, img_size=32)
    module.eval()
    x = torch.randn(2, 3, 32, 32)
    ref = module(x)
    from taskvec.models.dp_ready import RESIDUAL_BLOCKS

    for m in module.modules():
        if type(m) in RESIDUAL_BLOCKS:
            m.__class__ = RESIDUAL_BLOCKS[type(m)]
    assert torch.allclose(module(x), ref, atol=1e-6)


def test_vit_and_convnext_need_no_change() -> None:
    for arch in ("test_vit", "test_convnext"):
        module, _ = build_base(arch, num_classes=2, img_size=32)
        assert dp_problems(module) == []


def test_spec_records_conversion_and_load_rebuilds_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module, spec = build_base("test_resnet", num_classes=2, img_size=32, dp_compatible=True)
    assert spec.dp_compatible == {"norm": "groupnorm", "max_groups": 32}
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    path = tmp_path / "base.safetensors"
    save_model(module, spec, path)
    assert model_spec(path).dp_compatible == spec.dp_compatible
    loaded = load_model(path)
    assert dp_problems(loaded) == []
    x = torch.randn(2, 3, 32, 32)
    module.eval()
    loaded.eval()
    assert torch.equal(module(x), loaded(x))
