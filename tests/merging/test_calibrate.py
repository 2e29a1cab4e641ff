"""Merge-time calibration: λ chosen on validation data, BatchNorm re-estimated, nothing changes without it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import image_folder

from taskvec.errors import MismatchError
from taskvec.io.files import read_header
from taskvec.merging.calibrate import Calibrator
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.models.spec import load_model, model_spec
from taskvec.training.data import Normalizer, load_data
from taskvec.training.evaluate import evaluate_model
from taskvec.training.loop import FinetuneConfig, finetune

GRID = (0.0, 0.5, 1.0, 1.5)


@pytest.fixture(scope="module")
def two_vectors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    """A BatchNorm base (test_efficientnet), two short fine-tunes of it, their vectors, and validation data."""
    from taskvec.models.spec import build_base, save_model

    tmp_path = tmp_path_factory.mktemp("calibrate")
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    save_model(*build_base("test_efficientnet", "classification", 2, 3, 32), base)
    val = image_folder(tmp_path / "val", n_per_class=12, seed=9)
    vecs = []
    for seed in (1, 2):
        data = image_folder(tmp_path / f"site{seed}", n_per_class=12, seed=seed)
        cfg = FinetuneConfig(epochs=2, batch_size=8, lr=3e-3, device="cpu", seed=seed, val_fraction=0)
        r = finetune(base, data, tmp_path / f"run{seed}", cfg)
        vecs.append(export_vector(r.run_dir, base, tmp_path / f"v{seed}.safetensors").path)
    return base, vecs, val


def test_calibration_picks_the_best_lambda_and_reestimates_bn(tmp_path: Path, two_vectors: tuple) -> None:
    base, vecs, val = two_vectors
    cal = Calibrator(val, grid=GRID, device="cpu")
    out = tmp_path / "merged.safetensors"
    r = merge_vectors(vecs, base, out, method="mean", calibrate=cal)
    rec = read_header(out).meta["merge"]["calibration"]
    assert [row["scale"] for row in rec["grid"]] == list(GRID)
    best = max(row["value"] for row in rec["grid"])
    assert rec["chosen"] == r.scale and rec["metric"] == "auroc" and rec["batchnorm_reestimated"]
    assert [row for row in rec["grid"] if row["scale"] == rec["chosen"]][0]["value"] == best
    # weights: base + λ·mean(deltas) with the chosen λ
    b, m = load_file(str(base)), load_file(str(out))
    d1, d2 = load_file(str(vecs[0])), load_file(str(vecs[1]))
    key = "conv_stem.weight"
    assert torch.allclose(m[key], b[key] + r.scale * (d1[key] + d2[key]) / 2, atol=1e-6)
    # BatchNorm: the first BN's running mean is the mean of its inputs over the validation images
    model = load_model(out).eval()
    spec = model_spec(out)
    ds = load_data(val, spec, val_fraction=0).get("all")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        feats = model.conv_stem(Normalizer(spec, "cpu")(x))
    assert torch.allclose(model.bn1.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert not torch.allclose(m["bn1.running_mean"], b["bn1.running_mean"])
    # the recorded score is what evaluate reports for the chosen model on the same data
    assert evaluate_model(out, val, "all", device="cpu").metrics["auroc"] == pytest.approx(best)


def test_without_calibration_nothing_changes(tmp_path: Path, two_vectors: tuple) -> None:
    base, vecs, val = two_vectors
    plain = merge_vectors(vecs, base, tmp_path / "a.safetensors", method="mean", scale=0.7)
    again = merge_vectors(vecs, base, tmp_path / "b.safetensors", method="mean", scale=0.7, calibrate=None)
    assert plain.identity == again.identity and plain.scale == 0.7
    assert "calibration" not in read_header(plain.path).meta["merge"]
    # BN statistics are the mean of the vectors' statistics
    m, s1, s2 = (load_file(str(p)) for p in (plain.path, vecs[0], vecs[1]))
    assert np.allclose(m["bn1.running_var"].numpy(), ((s1["bn1.running_var"] + s2["bn1.running_var"]) / 2).numpy())


def test_cli_merge_calibrate_reports_grid(tmp_path: Path, two_vectors: tuple) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base, vecs, val = two_vectors
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(app, ["merge", *map(str, vecs), "--base", str(base), "--out", str(out),
                                 "--method", "mean", "--calibrate", str(val)])
    assert r.exit_code == 0, r.output
    assert "calibration on" in r.output and "chose λ=" in r.output and "1.25" in r.output
    chosen = read_header(out).meta["merge"]["calibration"]["chosen"]
    assert f"λ={chosen:g}" in r.output


def test_calibration_data_must_match_labels(tmp_path: Path, two_vectors: tuple) -> None:
    base, vecs, _ = two_vectors
    other = image_folder(tmp_path / "other", n_per_class=2, labels=("0", "5"))
    with pytest.raises(MismatchError, match="outside the base's classes"):
        merge_vectors(vecs, base, tmp_path / "x.safetensors", calibrate=Calibrator(other, device="cpu"))
    assert not (tmp_path / "x.safetensors").exists()


def test_calibration_never_uses_test_data() -> None:
    """Data with its own test split: λ is chosen on the rest; data that is all test is refused."""
    import numpy as np

    from taskvec.errors import ConfigError
    from taskvec.merging.calibrate import calibration_set
    from taskvec.training.data import DataSplits, ImageDataset

    def ds(n: int) -> ImageDataset:
        images = np.zeros((n, 8, 8, 3), dtype=np.uint8)
        return ImageDataset("classification", 2, 8, 3, list(range(n)), [0] * n, array=images)

    train, val, test = ds(5), ds(3), ds(7)
    assert calibration_set(DataSplits(train, val, test, "d")) is val
    assert calibration_set(DataSplits(train, None, test, "d")) is train
    assert len(calibration_set(DataSplits(train, None, None, "d"))) == 5
    with pytest.raises(ConfigError, match="^calibrate: d holds only a test split"):
        calibration_set(DataSplits(None, None, test, "d"))


def test_a_lambda_whose_model_overflows_is_never_chosen(tmp_path: Path, two_vectors: tuple) -> None:
    """NaN outputs rank as they fall (an AUROC of 1.0 is possible): such a λ is marked, never scored or chosen."""
    import json

    from safetensors.torch import save_file

    from taskvec.io.files import read_kind
    from taskvec.io.tensors import state_digest
    from taskvec.training.evaluate import NonFiniteOutputError, evaluate_module

    base, vecs, val = two_vectors
    state = load_file(str(vecs[0]))
    state["classifier.bias"] = torch.tensor([3e38, 0.0])  # finite in float32; 1.5 times it is not
    big = tmp_path / "big.safetensors"
    meta = dict(read_kind(vecs[0], "vector").meta, sha256=state_digest(state))
    save_file(state, str(big), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    out = tmp_path / "merged.safetensors"
    r = merge_vectors([vecs[1], big], base, out, method="sum", calibrate=Calibrator(val, grid=GRID, device="cpu"))
    grid = {row["scale"]: row for row in read_header(out).meta["merge"]["calibration"]["grid"]}
    assert grid[1.5]["value"] is None and grid[1.5]["non_finite"] and r.scale != 1.5
    assert all(torch.isfinite(t).all() for t in load_file(str(out)).values())

    model, spec = load_model(base), model_spec(base)
    with torch.no_grad():
        model.classifier.bias.fill_(float("inf"))
    ds = load_data(val, spec, val_fraction=0).get("all")
    with pytest.raises(NonFiniteOutputError, match="outputs are NaN or infinite"):
        evaluate_module(model, spec, ds)


def test_a_dp_merge_chosen_on_the_merger_data_says_that_data_is_not_covered(tmp_path: Path,
                                                                            two_vectors: tuple) -> None:
    """λ, the scores and re-estimated BatchNorm statistics come from the merger's data without noise: a merge of DP
    vectors that records them says its guarantees do not cover that data; a merge claiming no DP has nothing to
    qualify."""
    base, vecs, val = two_vectors
    plain = merge_vectors(vecs, base, tmp_path / "plain.safetensors", method="mean",
                          calibrate=Calibrator(val, grid=GRID, device="cpu"))
    assert not any("merger's data" in w for w in plain.warnings)
    noised = []
    for seed in (1, 2):
        data = image_folder(tmp_path / f"site{seed}", n_per_class=6, seed=seed)
        cfg = FinetuneConfig(epochs=1, batch_size=8, device="cpu", seed=seed, val_fraction=0)
        r = finetune(base, data, tmp_path / f"run{seed}", cfg)
        noised.append(export_vector(r.run_dir, base, tmp_path / f"n{seed}.safetensors", clip=1.0,
                                    noise_multiplier=1.0, delta=1e-5).path)
    cal = Calibrator(val, grid=GRID, device="cpu")
    dp = merge_vectors(noised, base, tmp_path / "dp.safetensors", method="mean", calibrate=cal, contributions=cal)
    (said,) = [w for w in dp.warnings if "merger's data" in w]
    assert said.startswith("the calibration and contributions recorded") and "not that data" in said
