"""`finetune --train class-means`: the head against an independent nearest-class-mean computation, its DP release
(a `gaussian-sum` entry checked against dp-accounting, noise present, patient units, composed with DP-SGD in a
budget), a vector of the head alone, and the settings it refuses."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import pytest
import torch
from dp_reference import dp_sgd_test_entry as _dp_sgd
from dp_reference import pld_epsilon
from headers import vector_header
from safetensors.torch import load_file
from stats_reference import pooled_features
from synthetic_data import npz_file

from taskvec.errors import ConfigError, PrivacyConfigError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.models.spec import ModelSpec, build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.privacy.ledger import PrivacyBudget, check_merge_budget, dp_sgd_epsilon, verify_ledger
from taskvec.training.class_means import unit_vectors, unit_weights
from taskvec.training.data import load_data
from taskvec.training.loop import FinetuneConfig, finetune

HEAD = ("classifier.weight", "classifier.bias")


@pytest.fixture
def setup(make_base: Any, tmp_path: Path) -> tuple[Path, Path]:
    base = make_base("test_efficientnet", num_classes=2, in_chans=1)
    return base, npz_file(tmp_path / "d.npz", n=48)


def _run(base: Path, data: Path, out: Path, dp: DPConfig | None = None, **kw: Any) -> dict[str, torch.Tensor]:
    cfg = FinetuneConfig(train="class-means", val_fraction=0.0, device="cpu", dp=dp, **kw)
    return load_file(str(finetune(base, data, out, cfg).model_path))


def _reference_head(base: Path, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest class mean on unit-length pooled features, computed image by image."""
    feats, labels = pooled_features(base, data)
    f = torch.from_numpy(feats)
    unit = f / f.norm(dim=1, keepdim=True)
    means = torch.stack([unit[torch.from_numpy(labels == k)].mean(0) for k in range(2)])
    nu = math.exp(f.norm(dim=1).log().mean().item())
    return (means / nu).float(), (-0.5 * means.pow(2).sum(1)).float()


def test_head_is_the_nearest_class_mean_and_the_vector_holds_it_alone(setup: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    base, data = setup
    tensors = _run(base, data, tmp_path / "run")
    weight, bias = _reference_head(base, data)
    # fp32 features batched vs one by one differ in the last bits: an absolute tolerance at the tensor's scale
    for key, want in (("classifier.weight", weight), ("classifier.bias", bias)):
        torch.testing.assert_close(tensors[key], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    before = load_file(str(base))
    assert all(torch.equal(v, before[k]) for k, v in tensors.items() if k not in HEAD)
    header = read_kind(tmp_path / "run" / "model.safetensors", "model").meta
    assert header["privacy"] == [] and header["training"]["train"]["trained"] == sorted(HEAD)
    vec = export_vector(tmp_path / "run" / "model.safetensors", base, tmp_path / "v.safetensors")
    assert set(load_file(str(vec.path))) == set(HEAD)


def test_dp_release_is_one_gaussian_sum(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    clear = _run(base, data, tmp_path / "clear")
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0, seed=3)
    noisy = _run(base, data, tmp_path / "a", dp)
    again = _run(base, data, tmp_path / "b", dp)
    assert torch.equal(noisy["classifier.weight"], again["classifier.weight"])  # seeded noise: reproducible
    assert not torch.allclose(noisy["classifier.weight"], clear["classifier.weight"], rtol=0.05)
    header = read_kind(tmp_path / "a" / "model.safetensors", "model").meta
    (entry,) = header["privacy"]
    # nothing from the private data outside the release: no counts, no metrics, a batch not derived from n
    assert "samples" not in header["training"] and header["training"]["batch_size"] == 64
    assert (entry["mechanism"], entry["unit"], entry["relation"]) == ("gaussian-sum", "image", "add-remove")
    assert (entry["sample_rate"], entry["steps"], entry["noise_multiplier"]) == (1.0, 1, 1.0)
    assert entry["epsilon"] == pytest.approx(pld_epsilon(dpa.GaussianDpEvent(1.0), 1e-5), rel=0.02)
    verify_ledger([entry], "model")
    target = DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=8.0)
    (calibrated,) = read_kind(finetune(base, data, tmp_path / "t", FinetuneConfig(
        train="class-means", val_fraction=0.0, device="cpu", dp=target)).model_path, "model").meta["privacy"]
    assert 7.9 <= calibrated["epsilon"] <= 8.0


def test_patients_are_the_unit_when_the_data_names_them(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    splits = load_data(data, spec, val_fraction=0.0)
    assert splits.train is not None
    splits.train.groups = [f"p{i // 4}" for i in range(len(splits.train))]
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=2.0, seed=0)
    res = finetune(base, splits, tmp_path / "run", FinetuneConfig(train="class-means", device="cpu", dp=dp))
    assert read_kind(res.model_path, "model").meta["privacy"][0]["unit"] == "patient"


def test_gaussian_sum_composes_with_dp_sgd_in_a_budget() -> None:
    eps, accountant = dp_sgd_epsilon([(1.0, 1.0, 1)], 1e-5)
    means = _dp_sgd("image", accountant, z=1.0, q=1.0, steps=1) | {"mechanism": "gaussian-sum", "run_id": "r1"}
    sgd = _dp_sgd("image", accountant) | {"run_id": "r2"}
    assert means["epsilon"] == pytest.approx(eps)
    rec = check_merge_budget([vector_header("m", contributor="a", run="r1", privacy=[means]),
                              vector_header("s", contributor="a", run="r2", privacy=[sgd])],
                             PrivacyBudget(50.0, "image"))["contributors"]["a"]
    event = dpa.ComposedDpEvent([dpa.GaussianDpEvent(1.0), dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(0.05, dpa.GaussianDpEvent(1.1)), 120)])
    assert rec["runs"] == 2 and rec["epsilon"] == pytest.approx(pld_epsilon(event, 1e-5), rel=0.03)
    assert rec["epsilon"] < means["epsilon"] + sgd["epsilon"]


@pytest.mark.parametrize("field, value", [("steps", 5), ("epochs", 2), ("lr", 1e-3), ("prox", 0.1),
                                          ("head", "balanced")])
def test_settings_of_gradient_steps_are_refused(field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=f"^{field} does not apply to `train` class-means") as err:
        FinetuneConfig(train="class-means", **{field: value}).check()
    assert err.value.field == field


def test_segmentation_is_refused_before_the_run_folder(tmp_path: Path) -> None:
    from synthetic_data import seg_folder

    net, spec = build_base("test_efficientnet", task="segmentation", num_classes=2, img_size=32, seed=0)
    save_model(net, spec, tmp_path / "seg.safetensors")
    with pytest.raises(ConfigError, match="class-means is for classification"):
        finetune(tmp_path / "seg.safetensors", seg_folder(tmp_path / "data"), tmp_path / "run",
                 FinetuneConfig(train="class-means", device="cpu"))
    assert not (tmp_path / "run").exists()


def test_cli_reports_the_release_and_refuses_step_options(setup: tuple[Path, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base, data = setup
    r = CliRunner().invoke(app, ["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--train", "class-means", "--device", "cpu", "--dp", "--target-epsilon", "4"])
    assert r.exit_code == 0, r.output
    (entry,) = read_kind(tmp_path / "run" / "model.safetensors", "model").meta["privacy"]
    assert f"gaussian-sum ε {entry['epsilon']:.3g}" in r.stdout and "class means" in r.stdout
    r = CliRunner().invoke(app, ["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "r2"),
                                 "--train", "class-means", "--epochs", "3"])
    assert isinstance(r.exception, ConfigError) and r.exception.field == "epochs"  # the console script: exit 2
    assert not (tmp_path / "r2").exists()


def _released(feats: torch.Tensor, labels: list[int], groups: list[str] | None, keep: list[bool], k: int = 3,
              clip: float = 0.7) -> torch.Tensor:
    """The sums a release adds noise to (per class: unit features and counts; then the log norms), over the
    images kept, weighted per patient as `class_means_head` weighs them."""
    w = unit_weights([g for g, on in zip(groups, keep) if on] if groups else None, sum(keep))
    rows = unit_vectors(feats[torch.tensor(keep)], clip) * w[:, None]
    table = torch.zeros(k, feats.shape[1] + 1, dtype=torch.float64)
    table.index_add_(0, torch.tensor([c for c, on in zip(labels, keep) if on]), rows[:, :-1])
    return torch.cat([table.flatten(), rows[:, -1].sum()[None]])


@pytest.mark.parametrize("unit", ["image", "patient"])
def test_one_unit_moves_the_released_sums_by_at_most_the_clip(unit: str) -> None:
    """The sensitivity the ledger's ε assumes: removing one image (or one patient, whose images span classes and
    feature norms from 1e-6 to 1e6) changes the released sums by at most `clip` in L2 norm."""
    gen = torch.Generator().manual_seed(0)
    n = 24
    scales = torch.logspace(-6, 6, n, dtype=torch.float64)[:, None]
    feats = torch.rand(n, 16, generator=gen, dtype=torch.float64) * scales
    labels = [i % 3 for i in range(n)]
    groups = [f"p{i // 5}" for i in range(n)] if unit == "patient" else None
    full = _released(feats, labels, groups, [True] * n)
    units = sorted(set(groups)) if groups else list(range(n))
    for u in units:
        keep = [(g != u) if groups else (i != u) for i, g in enumerate(groups or range(n))]
        assert torch.linalg.norm(full - _released(feats, labels, groups, keep)) <= 0.7 * (1 + 1e-9)
    at_bound = torch.full((1, 16), math.exp(10) / 4, dtype=torch.float64)  # norm e^10: the log-norm clamp
    assert torch.linalg.norm(unit_vectors(at_bound, 0.7)) == pytest.approx(0.7)  # the whole budget, no more


def test_a_multiplier_over_the_target_is_refused_before_the_run(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0, noise_multiplier=0.3)
    with pytest.raises(PrivacyConfigError, match="above target_epsilon 1"):
        finetune(base, data, tmp_path / "run", FinetuneConfig(train="class-means", device="cpu", dp=dp))
    assert not (tmp_path / "run").exists()


def test_a_class_without_images_takes_no_side(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    train = load_data(data, spec, val_fraction=0.0).train
    assert train is not None
    ones = train.subset([i for i, y in enumerate(train.targets) if y == 1])
    tensors = load_file(str(finetune(base, ones, tmp_path / "run", FinetuneConfig(
        train="class-means", val_fraction=0.0, device="cpu")).model_path))
    w, b = tensors["classifier.weight"], tensors["classifier.bias"]
    assert torch.equal(w[0], w[1]) and torch.equal(b[0], b[1]) and w.abs().sum() > 0


def test_an_interrupted_run_resumes_with_its_head_and_one_release(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Killed after its checkpoint: the resumed run keeps the checkpoint's head and ledger (a second noisy
    release would cost ε again)."""
    base, data = setup
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=1.0)  # secret noise: a redraw would differ

    def crash(record: Any) -> None:
        raise KeyboardInterrupt

    cfg = FinetuneConfig(train="class-means", val_fraction=0.0, device="cpu", dp=dp)
    with pytest.raises(KeyboardInterrupt):
        finetune(base, data, tmp_path / "run", cfg, on_epoch=crash)
    checkpoint = load_file(str(tmp_path / "run" / "checkpoint.safetensors"))
    res = finetune(base, data, tmp_path / "run", FinetuneConfig(**{**cfg.__dict__, "resume": True}))
    assert res.resumed_from_epoch == 1
    final = load_file(str(res.model_path))
    assert torch.equal(final["classifier.weight"], checkpoint["model/classifier.weight"])
    assert len(read_kind(res.model_path, "model").meta["privacy"]) == 1
