"""The decoded-image cache: the same images and masks as the files, rebuilt when a file changes, nothing partial
left by a failed build, and the same fine-tuned model with and without it."""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_data import image_folder, seg_folder

from taskvec.errors import TaskvecError
from taskvec.models.spec import ModelSpec
from taskvec.training.data import cache as cache_mod
from taskvec.training.data import load_data
from taskvec.training.data.cache import OFF, cache_root, cached, cached_splits


def spec(task: str = "classification", chans: int = 3, size: int = 24) -> ModelSpec:
    return ModelSpec("test_vit", task, 2, chans, size, ["0", "1"])


def items(ds) -> list[tuple[np.ndarray, np.ndarray]]:  # type: ignore[no-untyped-def]
    return [(x.numpy(), np.asarray(y)) for x, y in (ds[i] for i in range(len(ds)))]


def same(a: list, b: list) -> bool:  # type: ignore[type-arg]
    return len(a) == len(b) and all(np.array_equal(x, u) and np.array_equal(y, v) for (x, y), (u, v) in zip(a, b))


def test_classification_images_equal_the_files_and_entry_is_private(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", n_per_class=5)
    Image.fromarray((np.arange(30 * 20, dtype=np.uint16) * 100).reshape(30, 20)).save(root / "1" / "wide16.png")
    direct = load_data(root, spec(chans=3), val_fraction=0).train
    assert direct is not None and direct.decoded is None
    fast = cached(direct, tmp_path / "cache")
    assert fast.decoded is not None and set(fast.decoded.rows) == set(direct.sources)
    assert same(items(fast), items(direct))
    assert stat.S_IMODE(os.stat(tmp_path / "cache").st_mode) == 0o700
    sub = fast.subset([7, 2])  # a site's share reads the same entry
    assert sub.decoded is fast.decoded and same(items(sub), [items(direct)[7], items(direct)[2]])
    assert cached(fast, tmp_path / "cache") is fast  # already cached: nothing rebuilt


def test_segmentation_masks_binary_and_class_index(tmp_path: Path) -> None:
    root = seg_folder(tmp_path / "s", n=6, size=30)
    classes = np.zeros((30, 30), np.uint8)
    classes[5:20, 10:25] = 1  # a class-index mask (not 0/255) next to the binary ones
    Image.fromarray(classes).save(root / "masks" / "s0.png")
    direct = load_data(root, spec("segmentation"), val_fraction=0).train
    assert direct is not None
    fast = cached(direct, tmp_path / "cache")
    assert fast.decoded is not None and fast.decoded.masks is not None
    assert same(items(fast), items(direct))
    assert {int(v) for x, y in items(fast) for v in np.unique(y)} == {0, 1}


def test_a_changed_file_is_never_read_from_the_old_entry(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", n_per_class=3)
    first = cached(load_data(root, spec(), val_fraction=0).train, tmp_path / "cache")  # type: ignore[arg-type]
    target = root / "0" / "1.png"
    Image.fromarray(np.full((36, 36), 77, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))  # a new mtime even on coarse clocks
    again = load_data(root, spec(), val_fraction=0).train
    assert again is not None
    second = cached(again, tmp_path / "cache")
    assert second.decoded is not None and first.decoded is not None
    assert second.decoded.folder != first.decoded.folder
    row = second.sources.index(str(target))
    assert (second[row][0] == 77).all() and not (first[row][0] == 77).all()


def test_failed_build_leaves_nothing_and_full_disk_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "d", n_per_class=4)
    ds = load_data(root, spec(), val_fraction=0).train
    assert ds is not None
    calls = {"n": 0}
    real = cache_mod.ImageDataset.__getitem__

    def flaky(self, i):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise TaskvecError("disk read failed")
        return real(self, i)

    monkeypatch.setattr(cache_mod.ImageDataset, "__getitem__", flaky)
    with pytest.raises(TaskvecError, match="disk read failed"):
        cached(ds, tmp_path / "cache")
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    killed = tmp_path / "cache" / f".{cache_mod.entry_key(ds)}-x1y2"  # a build killed by SIGKILL
    killed.mkdir()
    assert cached(ds, tmp_path / "cache").decoded is not None and not killed.exists()
    monkeypatch.setattr(cache_mod, "SPARE_BYTES", 1 << 62)
    assert cached(ds, tmp_path / "cache2").decoded is None


def test_pickles_as_its_folder_and_off_means_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "d", n_per_class=20, size=64)
    ds = load_data(root, spec(size=64), val_fraction=0).train
    assert ds is not None
    fast = cached(ds, tmp_path / "cache")
    blob = pickle.dumps(fast)
    assert len(blob) < 40 * 64 * 64 * 3 // 4  # the images are not in the pickle
    assert same(items(pickle.loads(blob)), items(ds))
    splits = load_data(root, spec(size=64))
    assert cached_splits(splits, OFF) is splits
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "env"))
    assert cache_root("auto") == tmp_path / "env"
    both = cached_splits(splits, "auto")
    assert both.train is not None and both.val is not None and both.val.decoded is not None
    assert same(items(both.val), items(splits.val))


def test_finetune_gives_the_same_model_with_and_without_cache(tmp_path: Path, make_base) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    from taskvec.training.loop import FinetuneConfig, finetune

    base = make_base(arch="test_vit", num_classes=2, img_size=32)
    root = image_folder(tmp_path / "d", n_per_class=8)
    models = {}
    for setting in ("off", str(tmp_path / "cache")):
        cfg = FinetuneConfig(steps=3, batch_size=4, device="cpu", image_cache=setting, train="all")
        models[setting] = load_file(str(finetune(base, root, tmp_path / f"run-{len(models)}", cfg).model_path))
    a, b = models.values()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("damage", ["rows", "dtype", "sources", "deep"])
def test_a_damaged_entry_is_rebuilt(tmp_path: Path, damage: str) -> None:
    root = image_folder(tmp_path / "d", n_per_class=3)
    ds = load_data(root, spec(), val_fraction=0).train
    assert ds is not None
    entry = cached(ds, tmp_path / "cache").decoded
    assert entry is not None
    images, sources = entry.folder / "images.npy", entry.folder / "sources.json"
    if damage == "rows":
        np.save(images, np.zeros((2, 24, 24, 3), np.uint8))
    elif damage == "dtype":  # the same shape, other values: read as they are, they would train on garbage
        np.save(images, np.full(np.load(images).shape, 1e9))
    elif damage == "sources":
        sources.write_text(json.dumps([[i] for i in range(len(ds))]))
    else:
        sources.write_text("[" * 100_000 + "]" * 100_000)
    again = cached(ds, tmp_path / "cache")
    assert same(items(again), items(ds))


def _build_in_child(args: tuple[Path, Path]) -> str:
    root, cache = args
    ds = load_data(root, spec(), val_fraction=0).train
    assert ds is not None
    entry = cached(ds, cache).decoded
    assert entry is not None
    return str(entry.folder)


def test_processes_building_at_once_share_one_entry(tmp_path: Path) -> None:
    import multiprocessing

    root = image_folder(tmp_path / "d", n_per_class=30)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        folders = pool.map(_build_in_child, [(root, tmp_path / "cache")] * 2)
    assert folders[0] == folders[1]
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == [Path(folders[0]).name]


def test_cli_image_cache_folder_and_off(tmp_path: Path, make_base) -> None:  # type: ignore[no-untyped-def]
    from cli_app import invoke

    base = make_base(arch="test_vit", num_classes=2, img_size=32)
    root = image_folder(tmp_path / "d", n_per_class=4)
    common = ("finetune", "--base", base, "--data", root, "--steps", "1", "--device", "cpu")
    code, _, err = invoke(*common, "--out", tmp_path / "r1", "--image-cache", tmp_path / "mine")
    assert code == 0, err
    assert len([p for p in (tmp_path / "mine").iterdir() if not p.name.startswith(".")]) == 2  # train and val
    code, _, err = invoke(*common, "--out", tmp_path / "r2", "--image-cache", "off")
    assert code == 0, err
    assert len(list((tmp_path / "mine").iterdir())) == 4  # nothing new (two entries, two lock files)


def test_unpickled_where_the_entry_is_not_it_reads_the_files(tmp_path: Path) -> None:
    import shutil

    root = image_folder(tmp_path / "d", n_per_class=3)
    ds = load_data(root, spec(), val_fraction=0).train
    assert ds is not None
    fast = cached(ds, tmp_path / "cache")
    blob = pickle.dumps(fast)
    assert fast.decoded is not None
    shutil.rmtree(fast.decoded.folder)  # another machine: the folder is not there
    elsewhere = pickle.loads(blob)
    assert elsewhere.decoded is None and same(items(elsewhere), items(ds))


def test_simulation_decodes_each_image_once_and_gives_the_same_rows(tmp_path: Path) -> None:
    from dataclasses import replace

    from taskvec.simulation.simulate import SimulationConfig, simulate

    root = image_folder(tmp_path / "d", n_per_class=30, size=32)
    cfg = SimulationConfig(data=str(root), out=str(tmp_path / "off"), sites=2, arch="test_convnext", img_size=32,
                           epochs=1, base_epochs=1, methods=["mean"], calibrate=False, batch_size=8,
                           image_cache="off")
    rows = [(r["name"], r["value"]) for r in simulate(cfg).rows]
    on = replace(cfg, out=str(tmp_path / "on"), image_cache=str(tmp_path / "cache"))
    assert [(r["name"], r["value"]) for r in simulate(on).rows] == rows
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 2  # the pool (every site's share and the centralised union read it) and the test split
