"""Fine-tuning: loss goes down, files are written for `export`, resume after kill -9 reaches the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import shared_data
from safetensors.torch import load_file
from synthetic_data import image_folder, npz_file, seg_folder

from taskvec.errors import FileFormatError, MismatchError, OutputExistsError, TaskvecError
from taskvec.io.files import read_header
from taskvec.training.evaluate import Evaluation, evaluate_model
from taskvec.training.loop import EpochRecord, FinetuneConfig, finetune, lr_at


def cfg(**kw: object) -> FinetuneConfig:
    base = {"epochs": 3, "batch_size": 16, "lr": 2e-3, "device": "cpu", "seed": 0}
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_classification_run_writes_model_for_export(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=64)
    r = finetune(base, data, tmp_path / "run", cfg(epochs=4, contributor="siteA"))
    losses = [h["train_loss"] for h in r.history]
    assert len(losses) == 4 and losses[-1] < losses[0]
    meta = read_header(r.model_path).meta
    assert meta["kind"] == "model" and meta["parent"] == read_header(base).meta["identity"]
    assert meta["run_id"] == r.run_id and len(r.run_id) == 32 and meta["privacy"] == []
    t = meta["training"]
    assert (t["samples"], t["contributor"], t["epochs"], t["steps"], t["batch_size"]) == (64, "siteA", 4, 16, 16)
    assert t["val_metrics"]["auroc"] == r.history[-1]["val"]["auroc"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["train_loss"] for h in metrics["history"]] == losses and metrics["identity"] == r.identity
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    # the saved weights are what evaluation and export see
    assert evaluate_model(tmp_path / "run", data, "val", device="cpu").metrics["auroc"] == pytest.approx(
        r.val_metrics["auroc"])
    from taskvec.merging.export import export_vector

    v = export_vector(tmp_path / "run", base, tmp_path / "v.safetensors")
    vm = read_header(v.path).meta
    assert vm["samples"] == 64 and vm["contributor"] == "siteA"


def test_segmentation_loss_goes_down(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_convnext", task="segmentation", num_classes=2)
    data = seg_folder(tmp_path / "seg", n=16, size=40)
    r = finetune(base, data, tmp_path / "run", cfg(epochs=5, batch_size=4, val_fraction=0.25))
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < losses[0]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert r.samples == len(split["train"]) < 16 and len(split["train"]) + len(split["val"]) == 16
    assert r.val_metrics["mean_over"].startswith("foreground")
    assert r.val_metrics["dice"] is not None


def test_steps_and_schedule(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=40)
    r = finetune(base, data, tmp_path / "run", cfg(epochs=None, steps=5, val_fraction=0))
    assert (r.steps, r.epochs, [h["steps"] for h in r.history]) == (5, 3, [2, 4, 5])
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1) and lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5) and lr_at(100, 100, 1.0, 10) == pytest.approx(0.0)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = image_folder(tmp_path / "d", n_per_class=16)
    full = finetune(base, data, tmp_path / "full", cfg())

    class Killed(Exception):
        pass

    def die_after_two(rec: EpochRecord) -> None:
        if rec.epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        finetune(base, data, tmp_path / "cut", cfg(), on_epoch=die_after_two)
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    with pytest.raises(OutputExistsError, match="pass `resume`"):
        finetune(base, data, tmp_path / "cut", cfg())
    with pytest.raises(MismatchError, match="lr 0.002 \\(now 0.001\\)"):
        finetune(base, data, tmp_path / "cut", cfg(lr=1e-3, resume=True))
    other = make_base("test_vit", num_classes=2, in_chans=1, img_size=48, name="other.safetensors")
    with pytest.raises(MismatchError, match="was started from base"):
        finetune(other, data, tmp_path / "cut", cfg(resume=True))
    resumed = finetune(base, data, tmp_path / "cut", cfg(resume=True))
    assert resumed.resumed_from_epoch == 2 and len(resumed.history) == 3
    assert resumed.identity == full.identity
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]
    again = finetune(base, data, tmp_path / "cut", cfg(resume=True))  # finished: nothing to do
    assert again.identity == full.identity and again.warnings
    with pytest.raises(MismatchError, match="was started from base"):  # a finished run is another base's too
        finetune(other, data, tmp_path / "cut", cfg(resume=True))
    with pytest.raises(MismatchError, match="lr 0.002 \\(now 0.001\\)"):  # or was trained otherwise
        finetune(base, data, tmp_path / "cut", cfg(lr=1e-3, resume=True))
    with pytest.raises(MismatchError, match="the data changed"):  # or on other images
        finetune(base, image_folder(tmp_path / "d2", n_per_class=12), tmp_path / "cut", cfg(resume=True))


def test_kill_9_then_resume(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=96)
    opts = ["--epochs", "12", "--batch-size", "16", "--lr", "0.002", "--device", "cpu", "--seed", "3"]
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "taskvec.cli.app", "finetune", "--base", str(base), "--data", str(data),
           "--out", str(run), *opts]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    done = json.loads(json.dumps(read_header(ckpt).meta["epoch"]))
    assert done >= 1
    torch.set_num_threads(1)
    try:
        c = cfg(epochs=12, lr=0.002, seed=3, resume=True)
        resumed = finetune(base, data, run, c)
        full = finetune(base, data, tmp_path / "full", cfg(epochs=12, lr=0.002, seed=3))
    finally:
        torch.set_num_threads(2)
    assert resumed.resumed_from_epoch >= done
    assert resumed.identity == full.identity


def test_bad_input(tmp_path: Path, make_base: Callable[..., Path], make_finetuned: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=16)
    with pytest.raises(TaskvecError, match="epochs and `steps` exclude each other"):
        finetune(base, data, tmp_path / "r", cfg(steps=3))
    fixed = make_base("vit_tiny_patch16_224", num_classes=2, in_chans=1, name="vit.safetensors")
    with pytest.raises(TaskvecError, match="img_size 48 does not fit vit_tiny_patch16_224"):
        finetune(fixed, data, tmp_path / "r", cfg(img_size=48))
    from taskvec.merging.export import export_vector

    vec = export_vector(make_finetuned(base, 1), base, tmp_path / "v.safetensors").path
    with pytest.raises(FileFormatError, match="expected a taskvec model file, got a taskvec vector"):
        finetune(vec, data, tmp_path / "r2", cfg())
    three = make_base("test_vit", num_classes=3, in_chans=1, name="b3.safetensors")
    seg = seg_folder(tmp_path / "seg", n=2)
    with pytest.raises(TaskvecError, match="base is a classifier"):
        finetune(three, seg, tmp_path / "r3", cfg())
    assert not (tmp_path / "r3").exists()  # bad data leaves no run folder behind


def test_cli_finetune_and_evaluate(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=32)
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "run"),
                            "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--contributor", "x"])
    assert r.exit_code == 0, r.output
    assert "epoch 2: train loss" in r.output and "taskvec export" in r.output
    r = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(data), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["split"] == "test" and out["samples"] == 16 and 0 <= out["auroc"] <= 1


def _short_run(tmp_path: Path, base: Path, data: Path, **kw: object) -> tuple[Evaluation, Evaluation]:
    r = finetune(base, data, tmp_path / "run", cfg(**kw))
    before = evaluate_model(base, data, "test", device="cpu")
    after = evaluate_model(r.model_path, data, "test", device="cpu")
    return before, after


def test_breastmnist_finetune_beats_base(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    data = shared_data("breastmnist") / "breastmnist.npz"
    base = make_base("test_convnext", num_classes=2, in_chans=1, labels=["malignant", "benign"])
    before, after = _short_run(tmp_path, base, data, epochs=2, batch_size=32, lr=3e-3)
    assert after.samples == 156
    assert after.metrics["auroc"] > before.metrics["auroc"] + 0.05  # measured: 0.55 -> 0.67


def test_monuseg_finetune_beats_base(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    data = shared_data("monuseg_256")
    base = make_base("test_efficientnet", task="segmentation", num_classes=2, img_size=64)
    before, after = _short_run(tmp_path, base, data, epochs=10, batch_size=2, lr=3e-3, val_fraction=0)
    assert after.samples == 14
    assert after.metrics["dice"] > before.metrics["dice"] + 0.05  # measured: 0.35 -> 0.46


def test_state_dict_keys_are_plain(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    """The saved model is the base's own architecture: same keys and shapes."""
    base = make_base("test_convnext", task="segmentation", num_classes=2)
    r = finetune(base, seg_folder(tmp_path / "s", n=4), tmp_path / "run", cfg(epochs=1, val_fraction=0))
    a, b = load_file(str(base)), load_file(str(r.model_path))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_a_run_failing_in_its_first_epoch_leaves_no_folder(tmp_path: Path, make_base: Callable[..., Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to resume before the first checkpoint: the corrected command must not meet "run folder exists"."""
    import taskvec.training.loop as loop

    base = make_base("test_vit", num_classes=2, in_chans=1)
    data = npz_file(tmp_path / "d.npz", n=32)

    def fail(*args: object, **kwargs: object) -> None:
        raise MemoryError("out of memory in the first validation")

    with monkeypatch.context() as m:
        m.setattr(loop, "evaluate_module", fail)  # the first epoch ends with validation, then its checkpoint
        with pytest.raises(MemoryError):
            finetune(base, data, tmp_path / "run", cfg(epochs=2))
    assert not (tmp_path / "run").exists()
    assert finetune(base, data, tmp_path / "run", cfg(epochs=2)).epochs == 2
