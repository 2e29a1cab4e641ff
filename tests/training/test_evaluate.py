"""`evaluate_model` against an independent forward pass and the metric definitions."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from synthetic_data import npz_file, seg_folder

from taskvec.errors import TaskvecError
from taskvec.models.spec import load_model, model_spec
from taskvec.training.evaluate import evaluate_model
from taskvec.training.metrics import auroc


def _inputs(images: np.ndarray, arch: str) -> torch.Tensor:
    """Images as the model sees them, built here from timm's config rather than taskvec's Normalizer."""
    cfg = timm.get_pretrained_cfg(arch)
    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", antialias=True, align_corners=False)
    return (x - float(np.mean(cfg.mean))) / float(np.mean(cfg.std))


def test_classification_matches_independent_forward(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=16)
    r = evaluate_model(base, data, "test", device="cpu")
    z = np.load(data)
    model = load_model(base).eval()
    with torch.no_grad():
        probs = model(_inputs(z["test_images"], "test_vit")).softmax(1).numpy()
    y = z["test_labels"]
    assert r.samples == len(y) and r.split == "test" and r.identity
    assert r.metrics["accuracy"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    # PIL's bilinear resize and torch's differ by rounding, so AUROC is compared within a tolerance of ties
    assert r.metrics["auroc"] == pytest.approx(auroc(y, probs[:, 1]), abs=0.1)
    assert r.to_dict() == {**{k: v for k, v in vars(r).items() if k != "metrics"}, **r.metrics}


def test_segmentation_counts_every_pixel(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_convnext", task="segmentation", num_classes=2)
    data = seg_folder(tmp_path / "s", n=3, size=32)
    e = evaluate_model(base, data, "all", device="cpu", batch_size=2)
    r = e.metrics
    assert r["pixels"] == 3 * 32 * 32 and e.samples == 3
    fg = sum(int((np.asarray(Image.open(p)) > 0).sum()) for p in (data / "masks").iterdir())
    assert r["per_class"]["1"]["pixels"] == fg
    assert r["dice"] == r["per_class"]["1"]["dice"]


def test_errors_and_cli_json(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base = make_base("test_convnext", task="segmentation", num_classes=2)
    data = seg_folder(tmp_path / "s", n=2, size=32)
    with pytest.raises(TaskvecError, match="no test split"):
        evaluate_model(base, data, "test", device="cpu")
    assert model_spec(base).task == "segmentation"
    r = CliRunner().invoke(app, ["evaluate", str(base), "--data", str(data), "--split", "all", "--json",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["mean_over"].startswith("foreground") and out["pixels"] == 2 * 32 * 32
    r = CliRunner().invoke(app, ["evaluate", str(base), "--data", str(data), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output  # no test split: the default is every sample
    assert json.loads(r.output)["split"] == "all" and json.loads(r.output)["samples"] == 2


def test_no_test_split_scores_all_and_says_the_training_images_are_in_it(tmp_path: Path,
                                                                         make_base: Callable[..., Path]) -> None:
    base = make_base("test_convnext", task="segmentation", num_classes=2)
    seg_folder(tmp_path / "d" / "train", n=3, size=32)
    seg_folder(tmp_path / "d" / "val", n=2, size=32, seed=1)
    e = evaluate_model(base, tmp_path / "d", device="cpu")
    assert e.split == "all" and e.samples == 5
    assert any("no test split; scored on all of it, its train and val split included" in w for w in e.warnings)
    assert not any("no test split" in w for w in evaluate_model(base, tmp_path / "d", "all", device="cpu").warnings)
    single = evaluate_model(base, tmp_path / "d" / "train", device="cpu")  # no splits of its own: nothing to say
    assert single.samples == 3 and not any("no test split" in w for w in single.warnings)
