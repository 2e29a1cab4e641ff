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
