"""`taskvec finetune` and `taskvec evaluate`: defaults, warnings, refusals and the run record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_app import invoke
from synthetic_data import image_folder


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return image_folder(tmp_path / "data", n_per_class=4, size=32)


def _base(tmp_path: Path, name: str, weights: bool) -> Path:
    """A 2-class test_vit base made by `taskvec init`, from a local timm checkpoint or from random weights."""
    extra: list[object] = []
    if weights:
        import timm
        from safetensors.torch import save_file

        torch.manual_seed(0)
        ckpt = tmp_path / "timm.safetensors"
        save_file(timm.create_model("test_vit", img_size=32).state_dict(), str(ckpt))
        extra = ["--weights", ckpt]
    code, _, err = invoke("init", "--arch", "test_vit", "--num-classes", "2", "--img-size", "32", "--out",
                          tmp_path / name, *extra)
    assert code == 0, err
    return tmp_path / name


@pytest.mark.parametrize(("weights", "given", "trained"), [(True, None, "norm-bias"), (False, None, "all"),
                                                           (True, "all", "all")])
def test_train_default_follows_the_bases_weights(weights: bool, given: str | None, trained: str, data: Path,
                                                 tmp_path: Path) -> None:
    from taskvec.io.files import read_kind

    base = _base(tmp_path, "base.safetensors", weights)
    run = tmp_path / "run"
    code, _, err = invoke("finetune", "--base", base, "--data", data, "--out", run, "--steps", "1", "--device", "cpu",
                          *(["--train", given] if given else []))
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["config"]["train"] == trained
    assert read_kind(run / "model.safetensors", "model").meta["training"]["train"]["mode"] == trained


def test_warnings_come_first_as_one_line_each(dp_base: Path, tmp_path: Path) -> None:
    """DP-SGD of every parameter for too few steps: the warning is printed before the first epoch's line (the
    console script, stdout and stderr in one stream) as one `warning: ...` line, and nothing else (Opacus's,
    PyTorch's) is printed as a Python warning with a source path."""
    import subprocess
    import sys

    data = image_folder(tmp_path / "data", n_per_class=4, size=28)
    p = subprocess.run([sys.executable, "-m", "taskvec", "finetune", "--base", str(dp_base), "--data", str(data),
                        "--out", str(tmp_path / "run"), "--dp", "--noise-multiplier", "1", "--steps", "2", "--train",
                        "all", "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout
    lines = p.stdout.splitlines()
    short = next(i for i, line in enumerate(lines) if "only 2 optimiser steps" in line)
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1:"))
    assert short < first_epoch, p.stdout
    assert lines[short].startswith("warning: ") and "--steps >= " in lines[short]
    assert "Warning:" not in p.stdout and ".py:" not in p.stdout, p.stdout


@pytest.mark.parametrize(("refused", "message"), [
    (["--img-size", "40"], "--img-size 40 does not fit"),  # found once the base is loaded
    (["--dp", "--target-epsilon", "3", "--batch-size", "4"], "--batch-size does not apply to DP-SGD"),
    (["--train", "lora:0"], "--train must be one of"),
])
@pytest.mark.parametrize("existed", [False, True])
def test_a_refused_run_leaves_the_folder_as_it_was(refused: list[str], message: str, existed: bool, make_base,
                                                   data: Path, tmp_path: Path) -> None:
    base = make_base("test_vit", num_classes=2, img_size=32)
    run = tmp_path / "run"
    if existed:
        run.mkdir()
    args = ["finetune", "--base", base, "--data", data, "--out", run, "--steps", "1", "--device", "cpu"]
    code, _, err = invoke(*args, *refused)
    assert code != 0 and message in err, err
    assert (list(run.iterdir()) == []) if existed else not run.exists()
    code, _, err = invoke(*args)  # the corrected command: no --resume needed, nothing left to clash with
    assert code == 0 and (run / "model.safetensors").exists(), err


def test_a_segmentation_base_refuses_a_classification_mode_and_leaves_nothing(make_base, tmp_path: Path) -> None:
    from synthetic_data import seg_folder

    base = make_base("test_convnext", task="segmentation", num_classes=2)
    data = seg_folder(tmp_path / "seg", n=6, size=32)
    args = ["finetune", "--base", base, "--data", data, "--out", tmp_path / "run", "--device", "cpu"]
    code, _, err = invoke(*args, "--train", "class-means")
    assert code != 0 and "is for classification, not segmentation" in err and not (tmp_path / "run").exists(), err
    code, _, err = invoke(*args, "--steps", "1")
    assert code == 0, err
