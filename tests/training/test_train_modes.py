"""Training modes: what each trains, vectors that hold only that (subset or exact LoRA factors), merges that
expand them, per-example gradients of LoRA adapters under Opacus, and the small-data schedule defaults."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import torch
from grad_samples import per_sample_grads_match
from safetensors.torch import load_file
from synthetic_data import npz_file

from taskvec.errors import ConfigError
from taskvec.io.files import read_header
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import build_base, save_model
from taskvec.training.loop import FinetuneConfig, StepState, finetune
from taskvec.training.modes import VectorLayout, parse_mode, registered
from taskvec.training.modes.lora import factorize
from taskvec.training.schedule import DP_STEPS, MIN_DP_STEPS, MIN_STEPS, default_batch, plan_steps


def test_parse_mode() -> None:
    assert str(parse_mode("lora:8")) == "lora:8" and parse_mode("last:2").k == 2
    for bad in ("lora", "lora:0", "last:x", "bitfit", "head:2"):
        with pytest.raises(ConfigError, match="^train must be one of") as e:
            parse_mode(bad)
        assert e.value.field == "train"


def test_what_each_mode_trains() -> None:
    net, _ = build_base("test_efficientnet", num_classes=2, img_size=32, dp_compatible=True,
                        dp_norm="frozen-batchnorm")
    names = [n for n, _ in net.named_parameters()]
    head = parse_mode("head").trainable_names(net, "classification")
    assert head == ["classifier.weight", "classifier.bias"]
    nb = set(parse_mode("norm-bias").trainable_names(net, "classification"))
    assert {"bn1.weight", "bn1.bias", "classifier.weight", "classifier.bias"} <= nb
    assert not any(n.endswith("conv_stem.weight") or n.endswith("conv_pw.weight") for n in nb)
    last = parse_mode("last:1").trainable_names(net, "classification")
    assert last[-2:] == ["classifier.weight", "classifier.bias"] and "conv_stem.weight" not in last
    assert set(last) == set(names[names.index(last[0]):])
    assert len(parse_mode("all").trainable_names(net, "classification")) == len(names)
    with pytest.raises(ConfigError, match="more stages"):
        parse_mode("last:99").trainable_names(net, "classification")


def test_lora_per_sample_gradients_are_exact_under_opacus() -> None:
    """peft adapters (on 1x1 convolutions) with Opacus hooks: per-example gradients equal a loop of single-
    example backward passes (guards against the known silent corruption of DP-LoRA)."""
    net, _ = build_base("test_efficientnet", num_classes=3, img_size=32, dp_compatible=True,
                        dp_norm="frozen-batchnorm")
    net, layout = parse_mode("lora:2").prepare(net, "classification")
    assert layout.factored and all(r == 2 for r in layout.factored.values())
    for n, p in net.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; make A's gradients non-trivial too
            torch.nn.init.normal_(p, std=0.1)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable) and set(layout.trained) < set(trainable)
    g = torch.Generator().manual_seed(0)
    assert per_sample_grads_match(net.train(), torch.randn(4, 3, 32, 32, generator=g),
                                  torch.randint(0, 3, (4,), generator=g)) == len(trainable)


def test_factorize_is_exact_for_low_rank_deltas() -> None:
    g = torch.Generator().manual_seed(0)
    delta = (torch.randn(24, 3, generator=g) @ torch.randn(3, 16, generator=g)).reshape(24, 16, 1, 1)
    a, b = factorize(delta, 3)
    assert a.shape == (3, 16) and b.shape == (24, 3)
    assert torch.allclose((b @ a).reshape(delta.shape), delta, atol=1e-5)


def _vector(tmp_path: Path, base: Path, mode: str, seed: int = 0) -> tuple[Path, Path]:
    data = npz_file(tmp_path / "d.npz", n=32)
    cfg = FinetuneConfig(steps=3, batch_size=8, device="cpu", seed=seed, train=mode)
    run = finetune(base, data, tmp_path / f"run-{mode}-{seed}", cfg)
    vec = tmp_path / f"{mode}-{seed}.safetensors"
    export_vector(run.model_path, base, vec)
    return run.model_path, vec


@pytest.mark.parametrize("mode", ["norm-bias", "head", "lora:2"])
def test_vector_holds_only_what_was_trained_and_merge_rebuilds_the_model(
    tmp_path: Path, dp_base: Path, mode: str
) -> None:
    model, vec = _vector(tmp_path, dp_base, mode)
    base_sd, ft_sd = load_file(str(dp_base)), load_file(str(model))
    assert list(ft_sd) == list(base_sd)  # adapters are merged: the model file has the base's layout
    changed = {k for k in base_sd if not torch.equal(base_sd[k], ft_sd[k])}
    h = read_header(vec)
    record = read_header(model).meta["training"]["train"]
    assert h.meta["subset"] is True and h.meta["train"] == mode and record["mode"] == mode
    carried = {k.split("@")[0] for k in h.tensors}
    assert changed <= carried <= set(record["trained"]) | set(record["lora"])
    assert len(h.tensors) < len(base_sd) / 2
    if mode.startswith("lora"):
        assert h.meta["factors"] and all(k + "@lora_A" in h.tensors for k in h.meta["factors"])
        assert set(h.meta["factors"]) & changed  # adapted weights did change, and travel as factors
    merged = tmp_path / "merged.safetensors"
    merge_vectors([vec], dp_base, merged, method="sum")
    m_sd = load_file(str(merged))
    for k in base_sd:
        assert torch.allclose(m_sd[k].float(), ft_sd[k].float(), atol=1e-5), k


def test_ties_merges_subset_and_factored_vectors(tmp_path: Path, dp_base: Path) -> None:
    (_, va), (_, vb) = _vector(tmp_path, dp_base, "lora:2"), _vector(tmp_path, dp_base, "norm-bias", seed=1)
    out = tmp_path / "ties.safetensors"
    merge_vectors([va, vb], dp_base, out, method="ties")
    assert set(load_file(str(out))) == set(load_file(str(dp_base)))


def test_dp_lora_and_norm_bias_finetune_with_augmult_and_ema(tmp_path: Path, dp_base: Path) -> None:
    from taskvec.privacy.dpsgd import DPConfig

    for mode in ("norm-bias", "lora:2"):
        dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0, augmult=2)
        cfg = FinetuneConfig(steps=2, device="cpu", seed=0, train=mode, dp=dp)
        r = finetune(dp_base, npz_file(tmp_path / "d.npz", n=32), tmp_path / f"dp-{mode}", cfg)
        meta = read_header(r.model_path).meta
        assert meta["privacy"][0]["steps"] == 2 and meta["training"]["ema"] == 0.99


def test_physical_batches_make_the_same_dp_steps(tmp_path: Path, dp_base: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchMemoryManager: logical batches of 16 in physical batches of at most 5 images (each clipped, summed,
    noised once per logical batch) give the same model and the same number of DP-SGD steps as whole batches."""
    from taskvec.privacy import dpsgd
    from taskvec.privacy.dpsgd import DPConfig

    sizes: list[int] = []
    forward = dpsgd.EmptyBatchSafe.forward
    monkeypatch.setattr(dpsgd.EmptyBatchSafe, "forward", lambda self, x: sizes.append(len(x)) or forward(self, x))
    data = npz_file(tmp_path / "d.npz", n=48)
    states = []
    for physical in (64, 5):
        sizes.clear()
        dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0, augmult=2, max_physical_batch=physical,
                      sample_rate=1 / 3)
        cfg = FinetuneConfig(steps=4, device="cpu", seed=0, train="norm-bias", dp=dp, augment=False,
                             val_fraction=0.0)
        r = finetune(dp_base, data, tmp_path / f"p{physical}", cfg)
        assert read_header(r.model_path).meta["privacy"][0]["steps"] == 4 and r.steps == 4
        states.append(load_file(str(r.model_path)))
        assert max(sizes) <= 2 * physical and (physical > 16 or len(sizes) > 4)  # 2: augmentation multiplicity
    moved = max(float((states[0][k] - load_file(str(dp_base))[k]).abs().max()) for k in states[0])
    assert moved > 1e-3
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-5)


def test_progress_advances_once_per_dp_step(tmp_path: Path, dp_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Logical batches of 16 in physical batches of at most 5: the progress bar, whose total is in optimizer
    steps, advances once per step, not per physical batch."""
    from taskvec.privacy import dpsgd
    from taskvec.privacy.dpsgd import DPConfig

    forwards = []
    forward = dpsgd.EmptyBatchSafe.forward
    monkeypatch.setattr(dpsgd.EmptyBatchSafe, "forward", lambda self, x: forwards.append(len(x)) or forward(self, x))
    totals, advanced = [], []

    def track(it: Iterable[StepState], description: str, total: int) -> Iterator[StepState]:
        totals.append(total)
        for st in it:
            yield st
            advanced.append(st.step)

    dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0, max_physical_batch=5, sample_rate=1 / 3)
    cfg = FinetuneConfig(steps=4, device="cpu", seed=0, train="norm-bias", dp=dp, augment=False,
                         val_fraction=0.0)
    r = finetune(dp_base, npz_file(tmp_path / "d.npz", n=48), tmp_path / "run", cfg, track=track)
    assert r.steps == 4 and read_header(r.model_path).meta["privacy"][0]["steps"] == 4
    assert totals == [4] and advanced == [0, 1, 2, 3] and len(forwards) > 4


def test_frozen_head_refuses_a_zero_head_before_any_file(tmp_path: Path) -> None:
    """A pretrained base's new head starts at zero; kept frozen it would never let the features learn."""
    base = tmp_path / "base.safetensors"
    save_model(*build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=28, zero_head=True), base)
    assert not any(v.any() for k, v in load_file(str(base)).items() if k.startswith("classifier."))
    with pytest.raises(ConfigError, match="^head frozen would keep the base's all-zero classifier") as e:
        finetune(base, npz_file(tmp_path / "d.npz", n=16), tmp_path / "run",
                 FinetuneConfig(steps=1, device="cpu", head="frozen"))
    assert e.value.field == "head" and not (tmp_path / "run").exists()


def test_small_data_defaults() -> None:
    from taskvec.privacy.dpsgd import DPConfig

    assert default_batch(27) == 4 and default_batch(546) == 32
    steps, warn = plan_steps(FinetuneConfig(), per_epoch=6)
    assert steps == MIN_STEPS and not warn
    steps, warn = plan_steps(FinetuneConfig(epochs=2), per_epoch=6)
    assert steps == 12 and "only 12 optimiser steps" in warn[0]
    dp = DPConfig(1.0, 1e-5, target_epsilon=8.0)
    assert plan_steps(FinetuneConfig(dp=dp), per_epoch=4) == (DP_STEPS, [])  # a constant, whatever the data
    assert plan_steps(FinetuneConfig(dp=dp, epochs=2), per_epoch=4)[0] == 8 < MIN_DP_STEPS
    assert plan_steps(FinetuneConfig(steps=500), per_epoch=6) == (500, [])


def test_a_mode_is_one_registered_class() -> None:
    """Registering a `TrainMode` subclass is all it takes for `--train` to accept it; the CLI's help names
    every registered mode and each gradient mode's default learning rate, from the declarations."""
    from taskvec.cli.train import LR_HELP, TRAIN_HELP
    from taskvec.training.modes import base

    for m in registered():
        assert m.usage() in TRAIN_HELP
        assert m.fits_in_one_pass or f"{m.name} {m.lr:.0e}".replace("e-0", "e-") in LR_HELP

    @base.register
    class Probe(base.TrainMode):
        name, lr, arg = "probe-test", 1e-2, "N"

    try:
        mode = parse_mode("probe-test:3")
        assert isinstance(mode, Probe) and str(mode) == "probe-test:3" and mode.lr == 1e-2
    finally:
        del base.MODES["probe-test"]


def test_a_model_file_without_a_training_record_carries_everything() -> None:
    layout = VectorLayout.from_record(None)
    assert not layout.subset and layout.carries("any.weight") and layout.encode("k", torch.ones(2))["k"].sum() == 2
    lora = VectorLayout.from_record({"mode": "lora:2", "trained": ["h.weight"], "lora": {"c.weight": 2}})
    assert lora.subset and lora.carries("c.weight") and not lora.carries("x.weight")
    assert set(lora.encode("c.weight", torch.ones(4, 3))) == {"c.weight@lora_A", "c.weight@lora_B"}
