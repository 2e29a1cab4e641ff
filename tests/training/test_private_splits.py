"""A site's guarantee holds for the data set it hands to `finetune`: the validation split moves only the unit
added or removed, the run folder records which units trained (`split.json`, never in a released file), and
DP model and vector headers of neighbouring data sets differ only where the release itself differs."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from synthetic_data import blob_image, image_folder

from taskvec.errors import ConfigError, MismatchError
from taskvec.io.files import read_header
from taskvec.merging.export import export_vector
from taskvec.models.spec import ModelSpec
from taskvec.privacy.dpsgd import DPConfig
from taskvec.training.data import hold_out, load_data
from taskvec.training.loop import FinetuneConfig, finetune


def _spec() -> ModelSpec:
    return ModelSpec(arch="test_efficientnet", task="classification", num_classes=2, in_chans=1, img_size=28,
                     labels=["0", "1"])


def _patients_csv(root: Path, patients: list[int], per_patient: int = 2) -> Path:
    """A CSV of `per_patient` rows per patient id `p<i>`, each its own image file."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for p in patients:
        for k in range(per_patient):
            Image.fromarray(blob_image(rng, 28, (p + k) % 2 == 1)[0]).save(root / "img" / f"{p}-{k}.png")
            rows.append(f"img/{p}-{k}.png,{(p + k) % 2},p{p}")
    path = root / "data.csv"
    path.write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    return path


def _npz(path: Path, images: np.ndarray) -> Path:
    labels = (np.arange(len(images)) % 2).astype(np.uint8)
    np.savez(path, train_images=images, train_labels=labels)
    return path


def _digests(ds: Any) -> set[str]:
    return {hashlib.sha256(ds.array[int(s)].tobytes()).hexdigest() for s in ds.sources}


@pytest.mark.parametrize("n", [40, 100, 200])
def test_adding_one_patient_moves_that_patient_alone(tmp_path: Path, n: int) -> None:
    """The drawn split reshuffled 9, 17 and 25 patients at these sizes; the keyed split moves none."""
    a = load_data(_patients_csv(tmp_path / "a", list(range(n))), _spec(), val_fraction=0.1, seed=0)
    b = load_data(_patients_csv(tmp_path / "b", list(range(n + 1))), _spec(), val_fraction=0.1, seed=0)
    assert a.val is not None and b.val is not None
    assert set(b.train.groups) ^ set(a.train.groups) <= {f"p{n}"}
    assert set(b.val.groups) ^ set(a.val.groups) <= {f"p{n}"}
    assert not set(a.train.groups) & set(a.val.groups)  # a patient's images stay on one side
    assert 0.02 * n <= len(set(a.val.groups)) <= 0.25 * n  # about the fraction asked for
    for g in set(a.val.groups):  # each side decided by the patient's own key
        assert len([x for x in a.val.groups if x == g]) == 2


def test_adding_or_removing_an_image_moves_that_image_alone(tmp_path: Path) -> None:
    """Images as the unit, from an npz: a row inserted or removed anywhere (which renumbers the rows after
    it) changes the training set by that image only."""
    rng = np.random.default_rng(1)
    images = np.stack([blob_image(rng, 28, i % 2 == 1)[0] for i in range(301)])
    full = load_data(_npz(tmp_path / "301.npz", images), _spec(), val_fraction=0.1, seed=0)
    fewer = load_data(_npz(tmp_path / "300.npz", np.delete(images, 150, axis=0)), _spec(), val_fraction=0.1, seed=0)
    moved = hashlib.sha256(images[150].tobytes()).hexdigest()
    assert full.val is not None and fewer.val is not None
    assert _digests(full.train) ^ _digests(fewer.train) <= {moved}
    assert _digests(full.val) ^ _digests(fewer.val) <= {moved}
    assert len(full.train) + len(full.val) == 301 and 10 <= len(full.val) <= 60
    other = load_data(tmp_path / "301.npz", _spec(), val_fraction=0.1, seed=1)
    assert _digests(other.val) != _digests(full.val)  # the seed keys the hash


def test_hold_out_refuses_an_empty_training_set_and_tolerates_an_empty_validation(tmp_path: Path) -> None:
    ds = load_data(_patients_csv(tmp_path, [0, 1, 2]), _spec(), val_fraction=0).train
    with pytest.raises(Exception, match="fell in the validation share"):
        hold_out(ds, 0.999999, seed=0)
    train, val = hold_out(ds, 1e-9, seed=0)
    assert val is None and len(train) == len(ds)


def _interrupt(_record: Any) -> None:
    raise KeyboardInterrupt


def test_split_json_records_the_units_and_stays_at_the_site(tmp_path: Path, dp_base: Path) -> None:
    data = _patients_csv(tmp_path / "d", list(range(30)))
    cfg = FinetuneConfig(steps=2, device="cpu", train="norm-bias", augment=False,
                         dp=DPConfig(1.0, 1e-5, noise_multiplier=1.0))
    r = finetune(dp_base, data, tmp_path / "run", cfg)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    s = load_data(data, _spec(), val_fraction=0.1, seed=0)
    assert split == {"unit": "patient", "train": sorted(set(s.train.groups)), "val": sorted(set(s.val.groups))}
    assert sorted(split["train"] + split["val"]) == sorted(f"p{i}" for i in range(30))
    header = json.dumps(read_header(r.model_path).meta)
    vec = export_vector(r.model_path, dp_base, tmp_path / "v.safetensors")
    assert not any(f'"{p}"' in header or f'"{p}"' in json.dumps(read_header(vec.path).meta)
                   for p in split["train"] + split["val"])

    image_run = finetune(dp_base, image_folder(tmp_path / "f", n_per_class=2, size=28), tmp_path / "images",
                         FinetuneConfig(steps=1, device="cpu", train="head", augment=False, val_fraction=0.5))
    split = json.loads((image_run.run_dir / "split.json").read_text())
    assert split["unit"] == "image" and sorted(split["train"] + split["val"]) == ["0/0.png", "0/1.png", "1/0.png",
                                                                                   "1/1.png"]


def test_a_run_resumed_on_changed_data_is_refused(tmp_path: Path, dp_base: Path) -> None:
    cfg = FinetuneConfig(epochs=2, device="cpu", train="head", augment=False)
    data = _patients_csv(tmp_path / "d", list(range(20)))
    with pytest.raises(KeyboardInterrupt):
        finetune(dp_base, data, tmp_path / "run", cfg, on_epoch=_interrupt)
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
    grown = _patients_csv(tmp_path / "d", list(range(20)) + [99])
    with pytest.raises(MismatchError, match="the data changed since the run started .* split.json"):
        finetune(dp_base, grown, tmp_path / "run", FinetuneConfig(epochs=2, device="cpu", train="head",
                                                                  augment=False, resume=True))
    same = _patients_csv(tmp_path / "d", list(range(20)))
    r = finetune(dp_base, same, tmp_path / "run", FinetuneConfig(epochs=2, device="cpu", train="head",
                                                                 augment=False, resume=True))
    assert r.resumed_from_epoch == 1


def test_dp_sgd_refuses_a_batch_size(tmp_path: Path) -> None:
    dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="^batch_size does not apply to DP-SGD") as e:
        FinetuneConfig(batch_size=8, dp=dp).check()
    assert e.value.field == "batch_size"
    FinetuneConfig(batch_size=8, dp=dp, train="class-means").check()  # paces the one pass only
    with pytest.raises(ConfigError, match="sample_rate"):
        DPConfig(1.0, 1e-5, noise_multiplier=1.0, sample_rate=0.0).check()


# ------------------------------------------------------------------------------------ neighbouring headers


def _differences(a: Any, b: Any, path: str = "") -> set[str]:
    """Dotted paths where two JSON values differ (list items as [*])."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in set(a) | set(b):
            out |= _differences(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return {d for x, y in zip(a, b) for d in _differences(x, y, f"{path}[*]")}
    return set() if a == b else {path}


RUN_FIELDS = {"identity", "run_id", "created", "privacy[*].run_id", "privacy[*].model"}
VECTOR_FIELDS = {"sha256", "created", "source.run_id", "source.identity", "privacy[*].run_id", "privacy[*].model",
                 "norm.pre_clip", "norm.post_clip"}


def _released_norm(path: Path) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in load_file(str(path)).values()))


@pytest.mark.parametrize("mode,unit", [("norm-bias", "image"), ("class-means", "patient")])
def test_neighbouring_data_sets_give_headers_that_differ_only_in_the_release(tmp_path: Path, dp_base: Path,
                                                                             mode: str, unit: str) -> None:
    """Two DP runs on n and n + 1 units, same seed and options: model and vector headers differ only in identity
    and hash fields, run ids, timestamps and what the noised tensors determine (their norm)."""
    rng = np.random.default_rng(2)
    images = np.stack([blob_image(rng, 28, i % 2 == 1)[0] for i in range(26)])
    datasets = [_npz(tmp_path / "25.npz", images[:25]), _npz(tmp_path / "26.npz", images)]  # n // 2: 12, 13
    if unit == "patient":
        datasets = [_patients_csv(tmp_path / "p25", list(range(25))), _patients_csv(tmp_path / "p26", list(range(26)))]
    dp = DPConfig(1.0, 1e-5, target_epsilon=8.0)
    cfg = FinetuneConfig(train=mode, device="cpu", augment=False, dp=dp, val_fraction=0.0)
    if mode != "class-means":
        cfg = FinetuneConfig(steps=3, train=mode, device="cpu", augment=False, dp=dp, val_fraction=0.0)
    models, vectors = [], []
    for i, data in enumerate(datasets):
        r = finetune(dp_base, data, tmp_path / f"run{i}", cfg)
        models.append(read_header(r.model_path).meta)
        v = export_vector(r.model_path, dp_base, tmp_path / f"v{i}.safetensors")
        vectors.append(read_header(v.path).meta)
        assert vectors[-1]["norm"]["pre_clip"] == pytest.approx(_released_norm(v.path), rel=1e-5)
    assert models[0]["privacy"] and models[0]["privacy"][0]["unit"] == unit
    assert _differences(*models) <= RUN_FIELDS, _differences(*models)
    assert _differences(*vectors) <= VECTOR_FIELDS, _differences(*vectors)
    assert "samples" not in models[0]["training"] and vectors[0]["samples"] is None
    if mode != "class-means":
        assert models[0]["training"]["batch_size"] is None
        assert models[0]["privacy"][0]["sample_rate"] == dp.sample_rate


def test_the_update_is_the_noisy_sum_whatever_the_data_size() -> None:
    """Without noise, one step's gradient is the sum of the clipped unit gradients: not divided by q·n."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from taskvec.privacy.dpsgd import make_private

    torch.manual_seed(0)
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = nn.Linear(5, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cfg = DPConfig(1e3, 1e-5, noise_multiplier=1e-12, seed=0, sample_rate=0.5)
    wrapped, opt, loader, _ = make_private(model, opt, DataLoader(TensorDataset(x, y), batch_size=7), cfg, steps=1)
    xb, yb = next(iter(loader))
    opt.zero_grad()
    nn.functional.cross_entropy(wrapped(xb), yb).backward()
    opt.step()
    got = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])
    model.zero_grad()
    nn.functional.cross_entropy(model(xb), yb, reduction="sum").backward()
    want = torch.cat([model.weight.grad.flatten(), model.bias.grad.flatten()])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_patient_batches_are_cut_into_physical_batches_of_whole_patients() -> None:
    from taskvec.privacy.dpsgd import PatientPoissonSampler

    ids = [f"p{i // 3}" for i in range(300)]  # 100 patients of 3 images
    sampler = PatientPoissonSampler(ids, 0.5, torch.Generator().manual_seed(0), max_physical=10)
    batches = list(sampler)
    chunks = list(sampler.queue)
    assert len(batches) == len(chunks) and sum(c.last for c in chunks) == 2  # ⌊1/q⌋ logical batches
    for b, c in zip(batches, chunks):
        assert 0 < len(b) <= 9 and len(c.owner) == len(b)
        per_patient = {}
        for i, o in zip(b, c.owner.tolist()):
            per_patient.setdefault(o, set()).add(ids[i])
        assert all(len(v) == 1 for v in per_patient.values())
        assert all(sum(ids[j] == ids[i] for j in b) == 3 for i in b)  # whole patients per physical batch
    start = 0
    for end in [i + 1 for i, c in enumerate(chunks) if c.last]:  # a logical batch: about q of the patients
        patients = {ids[i] for b in batches[start:end] for i in b}
        assert 30 <= len(patients) <= 70
        start = end


def test_patient_physical_batches_make_the_same_dp_steps(tmp_path: Path, dp_base: Path) -> None:
    """Logical batches of whole patients cut into physical batches of at most 5 images give the same model as
    one physical batch per step (each patient clipped once, noise added once per logical batch)."""
    data = _patients_csv(tmp_path / "d", list(range(16)), per_patient=3)
    states = []
    for physical in (64, 5):
        dp = DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=0, max_physical_batch=physical, sample_rate=0.5)
        cfg = FinetuneConfig(steps=3, device="cpu", seed=0, train="norm-bias", dp=dp, augment=False, val_fraction=0)
        r = finetune(dp_base, data, tmp_path / f"p{physical}", cfg)
        assert read_header(r.model_path).meta["privacy"][0]["steps"] == 3
        states.append(load_file(str(r.model_path)))
    base = load_file(str(dp_base))
    assert max(float((states[0][k] - base[k]).abs().max()) for k in states[0]) > 1e-3
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-4, atol=1e-5)


def test_a_csv_row_without_its_patient_id_is_refused(tmp_path: Path) -> None:
    """An id-less row's unit would be a guess (a row number moves when an earlier row is removed, and the image
    may belong to a known patient): refused, naming the line."""
    csv = _patients_csv(tmp_path, list(range(4)))
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ", "
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=r"data.csv:4: no patient_id; give every row its patient's id") as e:
        load_data(csv, _spec())
    assert e.value.field == "patient_id"


def test_dp_sgd_draws_augmentation_and_dropout_from_a_secret_key() -> None:
    """From the public seed, an image's augmentation (drawn by its position in the batch) would depend on which
    other units were sampled before it, and one unit would move the others' clipped gradients."""
    from taskvec.training.loop import randomness_key

    assert randomness_key(FinetuneConfig(seed=7)) == 7  # without DP: reproducible from --seed
    private = FinetuneConfig(seed=7, dp=DPConfig(1.0, 1e-5, noise_multiplier=1.0))
    keys = {randomness_key(private) for _ in range(3)}
    assert len(keys) == 3 and 7 not in keys
    assert randomness_key(FinetuneConfig(seed=7, dp=DPConfig(1.0, 1e-5, noise_multiplier=1.0, seed=3))) == 3


@pytest.mark.parametrize(("first", "second"), [("7", "7.0"), ("0012", "12"), ("P3", "p3")])
def test_one_patient_id_written_two_ways_is_refused(tmp_path: Path, first: str, second: str) -> None:
    """A spreadsheet that rewrote some ids (`7` as `7.0`) would make one patient two units: refused, naming both
    lines. Ids that differ as numbers or as text stay distinct patients."""
    csv = _patients_csv(tmp_path, [4, 5, 6])
    rows = csv.read_text().splitlines()
    rows[1], rows[2] = (r.rsplit(",", 1)[0] + "," + pid for r, pid in zip(rows[1:3], (first, second)))
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(Exception, match=rf"data.csv:3: patient_id '{second}' reads as '{first}' \(line 2\) written"):
        load_data(csv, _spec())
    rows[2] = rows[2].rsplit(",", 1)[0] + f",{second}1"  # 71, 121, p31: another patient
    csv.write_text("\n".join(rows) + "\n")
    assert sorted(set(load_data(csv, _spec(), val_fraction=0).train.groups or [])) == sorted(
        {first, f"{second}1", "p5", "p6"})
