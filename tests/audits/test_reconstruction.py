"""Reconstruction audit: the simulated local training is taskvec's own, one image after one step is rebuilt,
export noise at ε = 1 stops it, and the JSON records the attack's assumptions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from taskvec.audits.reconstruction import (
    GRID_FILE,
    JSON_FILE,
    AttackConfig,
    LocalTraining,
    SiteAssumptions,
    audit_reconstruction,
    best_matches,
    symmetries,
)
from taskvec.errors import ConfigError, MismatchError
from taskvec.training.data import ImageDataset

SIZE = 32
ITERATIONS = 120
# Measured on this project's CPU for image seed 0, attack seed 0, 120 iterations: rebuilt at 17.6-17.8 dB where
# uniform noise scores 8.75 dB against the same image; after export noise at ε = 1, 12.3-12.8 dB over 3 draws of the
# noise (the TV prior alone makes a smooth image, which is closer to a smooth target than noise is).
MARGIN_DB = 6.0


@pytest.fixture(autouse=True)
def _one_thread():
    """The attack's many small ops run ~10× slower on 2 threads of a loaded 2-core machine than on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, seed: int) -> np.ndarray:
    """Low-frequency grayscale images (uint8 n×S×S): what a TV prior can rebuild in a few iterations."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 4, 4, generator=g)
    return (nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
            .clamp(0, 1)[:, 0] * 255).round().numpy().astype(np.uint8)


def dataset(n: int, seed: int = 0, task: str = "classification") -> ImageDataset:
    return ImageDataset(task, 1, SIZE, 2, list(range(n)), [i % 2 for i in range(n)], array=smooth_images(n, seed))


def sgd_step(base: Path, ds: ImageDataset, lr: float, out: Path) -> Path:
    """A site's own script: one plain SGD step on the whole set, saved as a taskvec model of the base."""
    from taskvec.io.files import read_kind
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.training.data import Normalizer

    spec = model_spec(base)
    model = load_model(base).train()
    x = Normalizer(spec, "cpu")(torch.stack([ds[i][0] for i in range(len(ds))]))
    nn.functional.cross_entropy(model(x), torch.tensor(ds.targets)).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    save_model(model, spec, out, extra={"parent": read_kind(base, "model").meta["identity"]})
    return out


def one_image(make_base, tmp_path: Path) -> tuple[Path, Path, ImageDataset]:
    base = make_base("test_convnext", num_classes=2, in_chans=1, img_size=SIZE)
    ds = dataset(1)
    return base, sgd_step(base, ds, 0.01, tmp_path / "ft.safetensors"), ds


SGD_ONE = {"samples": 1, "batch_size": 1, "lr": 0.01, "steps": 1, "optimizer": "sgd"}


def test_simulation_is_taskvecs_finetune(make_base, tmp_path: Path) -> None:
    """The attacker's simulation of AdamW (warm-up, cosine, decay groups) gives finetune's exact update."""
    from taskvec.models.spec import load_model, model_spec
    from taskvec.training.loop import FinetuneConfig, finetune

    base = make_base("test_convnext", num_classes=2, in_chans=1, img_size=SIZE)
    ds = dataset(4)
    config = FinetuneConfig(steps=3, batch_size=4, lr=1e-3, augment=False, val_fraction=0.0, device="cpu")
    run = finetune(base, ds, tmp_path / "run", config)
    ft, b = load_model(run.model_path).state_dict(), load_model(base).state_dict()
    model = load_model(base)
    names = [k for k, _ in model.named_parameters()]
    site = SiteAssumptions(4, 4, 1e-3, 3, SIZE, "adamw")
    x = torch.stack([ds[i][0] for i in range(4)]).float() / 255
    y = nn.functional.one_hot(torch.tensor(ds.targets), 2).float()
    sim = LocalTraining(model, model_spec(base), names, site, torch.device("cpu"))
    for k, d in zip(names, sim.update(x, y)):
        torch.testing.assert_close(d.detach(), ft[k] - b[k], rtol=1e-3, atol=2e-6, msg=k)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB for images in [0, 1], computed here independently of torchmetrics."""
    return float(10 * torch.log10(1 / (a - b).pow(2).mean()))


def test_one_image_one_step_is_rebuilt_and_export_noise_stops_it(make_base, tmp_path: Path) -> None:
    from taskvec.merging.export import export_vector

    base, ft, ds = one_image(make_base, tmp_path)
    real = ds[0][0].float()[None] / 255
    noise = torch.rand(real.shape, generator=torch.Generator().manual_seed(1))
    attack = AttackConfig(iterations=ITERATIONS, tv=0.1)
    r = audit_reconstruction(ft, base, ds, tmp_path / "audit", assume=SGD_ONE, attack=attack)
    (m,) = r["reconstructions"]
    assert m["index"] == 0 and m["psnr"] > psnr(noise, real) + MARGIN_DB
    assert r["summary"]["psnr_max"] > r["baselines"]["uniform_noise"]["psnr_max"] + MARGIN_DB

    vec = tmp_path / "dp.safetensors"
    export_vector(ft, base, vec, clip=1.0, epsilon=1.0, delta=1e-5)
    dp = audit_reconstruction(vec, base, ds, tmp_path / "audit_dp", assume=SGD_ONE, attack=attack)
    assert dp["reconstructions"][0]["psnr"] < psnr(noise, real) + MARGIN_DB
    assert dp["privacy"][-1]["mechanism"] == "gaussian-output" and "no reconstruction" in dp["verdict"]


def test_matching_finds_the_flipped_image_and_scores_like_torchmetrics() -> None:
    ds = dataset(5, seed=3)
    real = torch.stack([ds[i][0] for i in range(5)]).float() / 255
    query = torch.stack([symmetries(real[2:3])[5][0], real[4].clamp(0.1, 0.9)])
    m = best_matches(query, ds)
    assert (m[0].index, m[0].symmetry, m[0].psnr) == (2, 5, pytest.approx(float("inf")))
    assert m[1].index == 4 and m[1].symmetry == 0 and m[1].psnr == pytest.approx(psnr(query[1], real[4]), rel=1e-4)
    assert m[0].ssim == pytest.approx(1.0) and 0 < m[1].ssim < 1


def test_json_records_assumptions_and_cli(make_base, tmp_path: Path, monkeypatch, capsys) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base, ft, ds = one_image(make_base, tmp_path)
    np.savez(tmp_path / "site.npz", train_images=ds.array, train_labels=np.array(ds.targets))
    args = ["audit-reconstruction", str(ft), "--base", str(base), "--data", str(tmp_path / "site.npz"),
            "--out", str(tmp_path / "out"), "--samples", "1", "--batch-size", "1", "--lr", "0.01", "--steps", "1",
            "--optimizer", "sgd", "--labels-unknown", "--iterations", "3", "--tv", "0.05", "--seed", "4"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / JSON_FILE).read_text())
    assert record["assumptions"] == {"samples": 1, "batch_size": 1, "lr": 0.01, "steps": 1, "img_size": SIZE,
                                     "optimizer": "sgd", "weight_decay": 0.05, "labels_known": False}
    assert record["data"] == str(tmp_path / "site.npz") and record["target"] == str(ft)
    assert record["attack"]["iterations"] == 3 and record["attack"]["tv"] == 0.05 and record["attack"]["seed"] == 4
    assert len(record["reconstructions"]) == 1 and record["reconstructions"][0]["label"] in (0, 1)
    assert record["verdict"] in " ".join(res.stdout.split())  # rich wraps lines
    with Image.open(tmp_path / "out" / GRID_FILE) as im:
        assert im.format == "PNG"

    def main(argv: list[str]) -> tuple[int, str]:
        """The console script's exit code and stderr."""
        from taskvec.cli.app import main

        monkeypatch.setattr(sys, "argv", ["taskvec", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        return int(e.value.code or 0), capsys.readouterr().err

    assert main(args) == (1, f"error: {tmp_path / 'out' / JSON_FILE}: exists; pass --force to overwrite it\n")
    code, err = main(args[:6] + ["--out", str(tmp_path / "o2")])  # a script's model records no training
    assert code == 2 and err.startswith("error: --samples is not recorded") and not (tmp_path / "o2").exists()


def test_assumptions_default_to_the_record_and_bad_input_is_refused(make_base, tmp_path: Path) -> None:
    from taskvec.io.files import read_kind
    from taskvec.training.loop import FinetuneConfig, finetune

    base = make_base("test_convnext", num_classes=2, in_chans=1, img_size=SIZE)
    ds = dataset(2)
    run = finetune(base, ds, tmp_path / "run",
                   FinetuneConfig(steps=1, batch_size=2, lr=1e-3, val_fraction=0.0, device="cpu"))
    r = audit_reconstruction(run.run_dir, base, ds, tmp_path / "a", attack=AttackConfig(iterations=2))
    assert r["assumptions"] | {"weight_decay": 0} == {"samples": 2, "batch_size": 2, "lr": 1e-3, "steps": 1,
                                                      "img_size": SIZE, "optimizer": "adamw", "weight_decay": 0,
                                                      "labels_known": True}
    assert read_kind(run.model_path, "model").meta["training"]["steps"] == 1
    with pytest.raises(ConfigError, match="^labels_known: the data holds 3 images"):
        audit_reconstruction(run.run_dir, base, dataset(3), tmp_path / "b", attack=AttackConfig(iterations=1))
    with pytest.raises(ConfigError, match="^steps × batch_size"):
        audit_reconstruction(run.run_dir, base, ds, tmp_path / "c", assume={"steps": 5000})
    with pytest.raises(ConfigError, match="^lr must be"):
        audit_reconstruction(run.run_dir, base, ds, tmp_path / "d", assume={"lr": -1.0})
    with pytest.raises(ConfigError, match="^img_size must be at most 4096, got 40000"):  # 153 GB of images
        audit_reconstruction(run.run_dir, base, ds, tmp_path / "e", assume={"img_size": 40_000})
    assert not any((tmp_path / n).exists() for n in "bcde")
    other = make_base("test_convnext", num_classes=2, in_chans=1, img_size=SIZE, name="other.safetensors")
    with torch.no_grad():
        from taskvec.models.spec import load_model, model_spec, save_model

        m = load_model(other)
        next(m.parameters()).add_(1.0)
        save_model(m, model_spec(other), tmp_path / "other2.safetensors")
    with pytest.raises(MismatchError, match="parent is"):
        audit_reconstruction(run.run_dir, tmp_path / "other2.safetensors", ds, tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in "bcde")


def test_segmentation_with_estimated_masks_runs(make_base, tmp_path: Path) -> None:
    base = make_base("test_convnext", task="segmentation", num_classes=2, in_chans=1, img_size=SIZE)
    ds = dataset(2, task="segmentation")
    masks = tmp_path / "masks"
    masks.mkdir()
    targets = []
    for i, img in enumerate(ds.array):  # type: ignore[union-attr]
        Image.fromarray(((img > 128) * 255).astype(np.uint8)).save(masks / f"{i}.png")
        targets.append(str(masks / f"{i}.png"))
    ds.targets, ds.binary_masks = targets, [True, True]
    from taskvec.io.files import read_kind
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.training.data import Normalizer
    from taskvec.training.losses import SegmentationLoss

    model, spec = load_model(base).train(), model_spec(base)
    x = Normalizer(spec, "cpu")(torch.stack([ds[i][0] for i in range(2)]))
    SegmentationLoss()(model(x), torch.stack([ds[i][1] for i in range(2)])).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad
    save_model(model, spec, tmp_path / "ft.safetensors", extra={"parent": read_kind(base, "model").meta["identity"]})
    assume = SGD_ONE | {"samples": 2, "batch_size": 2, "labels_known": False}
    r = audit_reconstruction(tmp_path / "ft.safetensors", base, ds, tmp_path / "out", assume=assume,
                             attack=AttackConfig(iterations=3))
    assert r["task"] == "segmentation" and len(r["reconstructions"]) == 2
    assert all(0 <= m["index"] < 2 and np.isfinite(m["ssim"]) for m in r["reconstructions"])
