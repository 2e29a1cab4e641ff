"""Real pretrained backbones: DP-ready conversion that keeps BatchNorm statistics, smp segmentation models,
`taskvec init --weights` with the shared tf_efficientnet_lite0 checkpoint (skipped without ../shared)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from grad_samples import per_sample_grads_match
from torch import nn

from taskvec.errors import FileFormatError
from taskvec.models.dp_ready import FrozenBatchNorm2d, dp_problems, make_dp_compatible
from taskvec.models.spec import build_base, load_model, model_spec, save_model

SHARED_WEIGHTS = Path(os.environ.get("TASKVEC_SHARED_WEIGHTS", Path(__file__).resolve().parents[3] / "shared"
                                     / "weights" / "tf_efficientnet_lite0.in1k.safetensors"))


def lite0_weights() -> Path:
    if not SHARED_WEIGHTS.exists():
        pytest.skip(f"shared weights not available at {SHARED_WEIGHTS}")
    return SHARED_WEIGHTS


def _trained_bn_stats(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_frozen_batchnorm_keeps_statistics_keys_and_eval_output() -> None:
    module, _ = build_base("test_efficientnet", num_classes=2, img_size=32)
    _trained_bn_stats(module)
    x = torch.randn(3, 3, 32, 32)
    before_state = module.state_dict()
    before = module.eval()(x)
    counts = make_dp_compatible(module, norm="frozen-batchnorm")
    assert counts["batchnorm"] > 0 and not dp_problems(module)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in module.modules())
    after_state = module.state_dict()
    assert list(after_state) == list(before_state)  # same layout as the pretrained base
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    module.train()  # frozen statistics: train and eval mode compute the same map
    assert torch.allclose(module(x), before, atol=1e-5)


def test_frozen_batchnorm_per_sample_gradients_are_exact() -> None:
    module, _ = build_base("test_efficientnet", num_classes=3, img_size=32)
    _trained_bn_stats(module)
    make_dp_compatible(module, norm="frozen-batchnorm")
    for n, p in module.named_parameters():  # norms and the head: keeps the manual loop fast
        p.requires_grad_(isinstance(module.get_submodule(n.rsplit(".", 1)[0]), FrozenBatchNorm2d)
                         or n.startswith("classifier"))
    g = torch.Generator().manual_seed(0)
    checked = per_sample_grads_match(module.train(), torch.randn(4, 3, 32, 32, generator=g),
                                     torch.randint(0, 3, (4,), generator=g))
    assert checked > 4


def test_dp_norm_default_follows_pretraining(tmp_path: Path) -> None:
    _, scratch = build_base("test_resnet", num_classes=2, img_size=32, dp_compatible=True)
    assert scratch.dp_compatible == {"norm": "groupnorm", "max_groups": 32}
    module, spec = build_base("test_resnet", num_classes=2, img_size=32, dp_compatible=True,
                              dp_norm="frozen-batchnorm")
    save_model(module, spec, tmp_path / "b.safetensors")
    loaded = load_model(tmp_path / "b.safetensors")
    assert model_spec(tmp_path / "b.safetensors").dp_compatible["norm"] == "frozen-batchnorm"
    assert any(isinstance(m, FrozenBatchNorm2d) for m in loaded.modules())


@pytest.mark.parametrize("decoder", ["unet", "fpn"])
def test_smp_segmentation_round_trip(tmp_path: Path, decoder: str) -> None:
    torch.manual_seed(0)
    module, spec = build_base("test_efficientnet", "segmentation", 3, 1, 64, decoder=decoder)
    assert spec.decoder is not None and spec.decoder["arch"] == decoder
    assert any(k.startswith("encoder.model.") for k in module.state_dict())
    save_model(module, spec, tmp_path / "s.safetensors")
    loaded = load_model(tmp_path / "s.safetensors")
    x = torch.rand(2, 1, 64, 64)
    assert torch.equal(module.eval()(x), loaded.eval()(x))
    assert loaded(x).shape == (2, 3, 64, 64)


def test_old_segmentation_file_is_refused_with_how_to_rebuild(tmp_path: Path) -> None:
    module, spec = build_base("test_efficientnet", "segmentation", 2, 3, 32)
    spec.decoder = {"channels": 64}  # the former hand-written FPN decoder's record
    path = tmp_path / "old.safetensors"
    save_model(module, spec, path)
    with pytest.raises(FileFormatError, match="taskvec init --task segmentation") as e:
        load_model(path)
    assert str(path) in str(e.value)


def test_seeded_base_is_reproducible_and_leaves_the_global_random_state() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    a = build_base("test_efficientnet", "segmentation", 2, 3, 32, seed=1)[0].state_dict()
    assert torch.equal(torch.rand(3), expected)  # the seed did not leak into (or draw from) the global state
    b = build_base("test_efficientnet", "segmentation", 2, 3, 32, seed=1)[0].state_dict()
    c = build_base("test_efficientnet", "segmentation", 2, 3, 32, seed=2)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize(("task", "in_chans"), [("classification", 1), ("classification", 3),
                                                ("segmentation", 1), ("segmentation", 3)])
def test_init_with_shared_lite0_weights(tmp_path: Path, task: str, in_chans: int) -> None:
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    weights = lite0_weights()
    out = tmp_path / "base.safetensors"
    args = ["init", "--arch", "tf_efficientnet_lite0", "--weights", str(weights), "--task", task,
            "--num-classes", "2", "--in-chans", str(in_chans), "--img-size", "64", "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    ref, got = load_file(str(weights)), load_file(str(out))
    prefix = "encoder.model." if task == "segmentation" else ""
    for k in ("blocks.5.0.conv_pw.weight", "blocks.2.1.bn2.running_var", "bn1.weight"):
        assert torch.equal(got[prefix + k], ref[k]), k
    stem = got[prefix + "conv_stem.weight"]
    assert stem.shape[1] == in_chans  # timm adapts the stem: a grayscale stem sums the RGB filters
    want = ref["conv_stem.weight"].sum(1, keepdim=True) if in_chans == 1 else ref["conv_stem.weight"]
    assert torch.allclose(stem, want, atol=1e-6)
    spec = model_spec(out)
    assert spec.arch == "tf_efficientnet_lite0" and spec.in_chans == in_chans
    y = load_model(out)(torch.zeros(1, in_chans, 64, 64))
    assert y.shape == ((1, 2) if task == "classification" else (1, 2, 64, 64))


def test_segmentation_publishes_an_smp_loadable_config(tmp_path: Path) -> None:
    import segmentation_models_pytorch as smp

    from taskvec.registry.publish import smp_config

    torch.manual_seed(0)
    module, spec = build_base("test_efficientnet", "segmentation", 2, 3, 64, dp_compatible=True,
                              dp_norm="frozen-batchnorm")
    _trained_bn_stats(module)
    repo = tmp_path / "repo"
    repo.mkdir()
    save_model(module, spec, repo / "model.safetensors")  # publish uploads the model file itself
    smp_config(repo / "model.safetensors", repo)
    loaded = smp.from_pretrained(str(repo))
    x = torch.rand(2, 3, 64, 64)
    assert torch.allclose(loaded.eval()(x), module.eval()(x), atol=1e-5)
