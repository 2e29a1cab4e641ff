"""`finetune` with DP-SGD: stops at the target ε, ledger from model to vector, patient unit, refusals."""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from dp_reference import dp_sgd_steps
from dp_reference import pld_epsilon as reference_epsilon
from PIL import Image
from synthetic_data import blob_image, image_folder

from taskvec.errors import PrivacyError
from taskvec.io.files import read_kind
from taskvec.io.inspection import inspect_file
from taskvec.merging.export import export_vector
from taskvec.privacy.dpsgd import DPConfig, max_steps
from taskvec.training.loop import FinetuneConfig, finetune

pytestmark = pytest.mark.filterwarnings("ignore")


def pld_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    return reference_epsilon(dp_sgd_steps(z, q, steps), delta, interval=1e-3)


def cfg(dp: DPConfig, **kw: object) -> FinetuneConfig:
    base = {"epochs": 30, "lr": 1e-3, "device": "cpu", "val_fraction": 0.25, "augment": False}
    return FinetuneConfig(**{**base, **kw}, dp=dp)  # type: ignore[arg-type]


def test_dp_finetune_stops_at_target_and_ledger_travels(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=16, size=32)
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=3.0, noise_multiplier=1.5)
    r = finetune(base, data, tmp_path / "run", cfg(dp))
    model = read_kind(r.model_path, "model").meta
    (entry,) = model["privacy"]
    assert entry["mechanism"] == "dp-sgd" and entry["unit"] == "image" and entry["run_id"] == r.run_id
    assert entry["noise_multiplier"] == 1.5 and entry["max_grad_norm"] == 1.0 and entry["delta"] == 1e-5
    q = entry["sample_rate"]
    assert entry["steps"] == r.steps == max_steps(1.5, q, 1e-5, 3.0) < 30 / q  # stopped early, at the target
    assert entry["epsilon"] <= 3.0 < pld_epsilon(1.5, q, entry["steps"] + 1, 1e-5) * 1.02
    assert entry["epsilon"] == pytest.approx(pld_epsilon(1.5, q, entry["steps"], 1e-5), rel=0.02)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["privacy"] == [entry]
    assert [h["privacy"][0]["epsilon"] for h in r.history][-1] == pytest.approx(entry["epsilon"])

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val_metrics"] and metrics["samples"]["train"] > 0  # kept locally
    for private in ("samples", "val_samples", "val_metrics"):  # computed on private data outside the guarantee
        assert private not in model["training"]

    v = export_vector(tmp_path / "run", base, tmp_path / "v.safetensors")
    assert inspect_file(v.path).privacy == [entry]
    assert read_kind(v.path, "vector").meta["samples"] is None  # not declared public


def test_patient_ids_make_the_patient_the_unit(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_vit", num_classes=2)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(36):  # 12 patients with 3 tiles each
        img, _ = blob_image(rng, 32, i % 2 == 1)
        Image.fromarray(img).save(tmp_path / f"t{i}.png")
        rows.append({"path": f"t{i}.png", "label": i % 2, "patient_id": f"p{i // 3}"})
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "label", "patient_id"])
        w.writeheader()
        w.writerows(rows)
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, noise_multiplier=2.0, sample_rate=1 / 6)
    r = finetune(base, tmp_path / "data.csv", tmp_path / "run", cfg(dp, epochs=1, val_fraction=0.0))
    (entry,) = read_kind(r.model_path, "model").meta["privacy"]
    assert entry["unit"] == "patient"
    assert entry["sample_rate"] == 1 / 6 and entry["steps"] == 6  # the given rate; an epoch of 1/q steps
    assert entry["epsilon"] == pytest.approx(pld_epsilon(2.0, 1 / 6, entry["steps"], 1e-5), rel=0.02)


def test_dp_refuses_a_base_that_is_not_dp_ready(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    base = make_base("test_resnet", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    with warnings.catch_warnings(), pytest.raises(PrivacyError, match="`dp_compatible`"):
        finetune(base, data, tmp_path / "run", cfg(DPConfig(1.0, 1e-5, noise_multiplier=1.0)))
    assert not (tmp_path / "run").exists()  # refused before anything is written
    with pytest.raises(PrivacyError, match="without noise"):
        finetune(base, data, tmp_path / "run", cfg(DPConfig(1.0, 1e-5, noise_multiplier=0.0)))


def test_an_unreachable_target_is_refused_before_the_run_folder(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    """DP-SGD's noise depends on public parameters alone (q, steps, δ, target): a target out of reach is refused
    before anything is written, so the corrected command does not meet "run folder exists"."""
    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    with pytest.raises(PrivacyError, match="out of reach in 3 steps at rate 0.25: it needs a noise multiplier above"):
        finetune(base, data, tmp_path / "run", cfg(DPConfig(1.0, 1e-5, target_epsilon=1e-4), epochs=None, steps=3))
    with pytest.raises(PrivacyError, match="even one step at noise multiplier 0.5 exceeds"):
        finetune(base, data, tmp_path / "run", cfg(DPConfig(1.0, 1e-5, target_epsilon=0.1, noise_multiplier=0.5)))
    assert not (tmp_path / "run").exists()


def test_a_noised_export_of_a_dp_sgd_model_does_not_carry_its_identity(tmp_path: Path,
                                                                        make_base: Callable[..., Path]) -> None:
    """The DP-SGD model's content identity is covered by its training's ε alone: its ledger names the model by a
    random name, which every vector of it carries (so a merge counts the training once), and a vector exported
    from it with noise (whose guarantee may be the smaller export ε) carries nothing that identifies its weights."""
    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    runs = [finetune(base, data, tmp_path / f"run{i}", cfg(DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0),
                                                            epochs=None, steps=2, seed=0)) for i in range(2)]
    model = read_kind(runs[0].model_path, "model").meta
    (entry,) = model["privacy"]
    assert runs[0].identity == runs[1].identity == model["identity"]  # seeded: the same weights twice
    names = [read_kind(r.model_path, "model").meta["privacy"][0]["model"] for r in runs]
    assert names[0] != names[1] and model["identity"] not in names and len(names[0]) == 64
    v = export_vector(tmp_path / "run0", base, tmp_path / "v.safetensors", clip=1.0, noise_multiplier=0.5, delta=1e-5)
    meta = read_kind(v.path, "vector").meta
    assert meta["privacy"][0] == entry and model["identity"] not in json.dumps(meta)


def test_dp_from_a_fine_tuned_model_warns_before_training(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    """A fine-tuned model's weights, and the identity a vector from it would name, depend on the data it was
    fine-tuned on, which a DP run from it does not cover: said before training (a base pretrained on public data
    is such a model too). A DP run from the base, or a run without DP from the fine-tuned model, says nothing."""
    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    first = finetune(base, data, tmp_path / "m0", FinetuneConfig(steps=1, epochs=None, device="cpu", augment=False))
    dp = DPConfig(1.0, 1e-5, target_epsilon=8.0)
    said: list[str] = []
    finetune(first.model_path, data, tmp_path / "m1", cfg(dp, epochs=None, steps=1), on_warning=said.append)
    assert any(f"is a fine-tuned model (run {first.run_id}): this run's DP guarantee does not cover" in w
               for w in said)
    for start, run_cfg in ((first.model_path, FinetuneConfig(steps=1, epochs=None, device="cpu")),
                           (base, cfg(dp, epochs=None, steps=1))):
        said.clear()
        finetune(start, data, tmp_path / f"run{len(list(tmp_path.iterdir()))}", run_cfg, on_warning=said.append)
        assert not any("fine-tuned model" in w for w in said)


def test_an_image_listed_twice_is_refused_under_dp_per_image(tmp_path: Path, make_base: Callable[..., Path]) -> None:
    """Each row is sampled and clipped as its own unit: an image listed twice (by a repeated row, or by a link
    to it) would be two units of a per-image guarantee that then does not hold for it."""
    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    rows = [f"{f},{f.split('/')[0]}" for f in files]
    (data / "twice.csv").write_text("path,label\n" + "\n".join([*rows, rows[0]]) + "\n")
    dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0)
    with pytest.raises(PrivacyError, match=f"image {files[0]} is listed more than once"):
        finetune(base, data / "twice.csv", tmp_path / "run", cfg(dp, epochs=1, val_fraction=0.0))
    patients = [f"{r},p{i}" for i, r in enumerate(rows)]
    (data / "patients.csv").write_text("path,label,patient_id\n" + "\n".join([*patients, f"{rows[0]},p0"]) + "\n")
    run = finetune(base, data / "patients.csv", tmp_path / "p", cfg(dp, epochs=1, val_fraction=0.0))
    assert run.model_path.exists()  # twice in one patient's unit: covered by the guarantee per patient
    (data / "patients.csv").write_text("path,label,patient_id\n" + "\n".join([*patients, f"{rows[0]},p9"]) + "\n")
    with pytest.raises(PrivacyError, match=f"image {files[0]} is listed under two patient ids"):
        finetune(base, data / "patients.csv", tmp_path / "run", cfg(dp, epochs=1, val_fraction=0.0))
    for link in ("symlink_to", "hardlink_to"):  # the same image under a second name, in the same class
        (data / files[1]).unlink()
        getattr(data / files[1], link)((data / files[0]).resolve())
        with pytest.raises(PrivacyError, match=rf"image {files[0]} \(also as {files[1]}\) is listed more than once"):
            finetune(base, data, tmp_path / "run", cfg(dp, epochs=1, val_fraction=0.0))
    assert not (tmp_path / "run").exists()
    finetune(base, data, tmp_path / "plain", cfg(None, epochs=1, val_fraction=0.0))  # without DP: no unit to count


def _killed_dp_run(tmp_path: Path, make_base: Callable[..., Path]) -> tuple[Path, Path, DPConfig, Path]:
    """A DP run of 3 epochs killed after its first: (base, data, its DP config, its checkpoint)."""
    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=8, size=32)
    dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, sample_rate=0.25)

    class Killed(Exception):
        pass

    def die(rec: object) -> None:
        raise Killed

    with pytest.raises(Killed):
        finetune(base, data, tmp_path / "run", cfg(dp, epochs=3, val_fraction=0.0), on_epoch=die)
    return base, data, dp, tmp_path / "run" / "checkpoint.safetensors"


@pytest.mark.parametrize("change", [{"setup": {}}, {"epoch": 10**6}, {"history": []}, {"step": 1},
                                    {"setup": {"dp_steps": 0, "noise_multiplier": 1.0, "sample_rate": 0.25}}])
def test_a_checkpoint_whose_counts_do_not_add_up_is_refused(tmp_path: Path, make_base: Callable[..., Path],
                                                            change: dict) -> None:
    """Resumed from an edited checkpoint, DP-SGD would count its steps from another number than it took."""
    from safetensors.torch import load_file, save_file

    from taskvec.errors import FileFormatError
    from taskvec.io.files import read_header

    base, data, dp, ckpt = _killed_dp_run(tmp_path, make_base)
    meta = read_header(ckpt).meta
    assert meta["setup"]["dp_steps"] == meta["step"] > 1  # as written: the counts agree
    save_file(load_file(str(ckpt)), str(ckpt), metadata={"format": "pt", "taskvec": json.dumps({**meta, **change})})
    with pytest.raises(FileFormatError, match="checkpoint.safetensors: its epoch, step, history or DP step count"):
        finetune(base, data, tmp_path / "run", cfg(dp, epochs=3, val_fraction=0.0, resume=True))


@pytest.mark.parametrize("edit", ["drop model", "reshape model", "drop ema", "optimizer scalars"])
def test_a_checkpoint_whose_tensors_do_not_fit_is_refused_in_one_line(tmp_path: Path, make_base: Callable[..., Path],
                                                                     edit: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from taskvec.errors import FileFormatError
    from taskvec.io.files import read_header

    base, data, dp, ckpt = _killed_dp_run(tmp_path, make_base)
    meta, tensors = read_header(ckpt).meta, load_file(str(ckpt))
    model = sorted(k for k in tensors if k.startswith("model/"))[0]
    if edit == "drop model":
        del tensors[model]
    elif edit == "reshape model":
        tensors[model] = torch.zeros(3, 1, 7)
    elif edit == "drop ema":
        for k in [k for k in tensors if k.startswith("ema/")]:
            del tensors[k]
    else:
        meta["optimizer"]["scalars"] = {"0": 5}
    save_file(tensors, str(ckpt), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    with pytest.raises(FileFormatError, match=r"checkpoint.safetensors: does not fit this run \(.+\); delete it"):
        finetune(base, data, tmp_path / "run", cfg(dp, epochs=3, val_fraction=0.0, resume=True))
