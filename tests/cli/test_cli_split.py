"""`taskvec split`: sites that partition the training split, by the rule and seed simulate uses; by a CSV
column; each site readable by finetune; never over a non-empty folder, never a half site under its name."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from cli_app import invoke
from conftest import shared_data
from synthetic_data import image_folder, npz_file, seg_folder

from taskvec.models.spec import ModelSpec
from taskvec.simulation.splits import split_dirichlet, split_iid
from taskvec.training.data import load_data


def _ok(*args: object) -> str:
    code, out, err = invoke(*args)
    assert code == 0, f"{args}: {out} {err}"
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("rule", ["iid", "dirichlet:0.5"])
def test_sites_partition_the_data_as_simulate_splits_it(rule: str, tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", n_per_class=15, size=16, labels=("benign", "malignant"))
    _ok("split", data, "--sites", 3, "--split", rule, "--seed", 7, "--out", tmp_path / "sites")
    sites = [_rows(tmp_path / "sites" / f"site{k}.csv") for k in range(3)]
    got = [sorted(r["path"] for r in rows) for rows in sites]
    # independently: the files in ImageFolder order, cut by the splits module with the same seed
    files = [p.resolve().as_posix() for c in ("benign", "malignant") for p in sorted((data / c).glob("*.png"))]
    labels = [0] * 15 + [1] * 15
    parts = split_iid(30, 3, 7) if rule == "iid" else split_dirichlet(labels, 3, 0.5, 7)
    assert got == [sorted(files[i] for i in idx) for idx in parts]
    assert sorted(p for g in got for p in g) == sorted(files)  # a partition: every image once
    assert all(r["label"] == Path(r["path"]).parent.name for rows in sites for r in rows)
    record = json.loads((tmp_path / "sites" / "sites.json").read_text())
    assert record["samples"] == [len(idx) for idx in parts] and record["split"] == rule and record["seed"] == 7

    from taskvec.simulation.sites import site_indices  # the function simulate calls on its pool

    spec = ModelSpec("", "classification", 2, labels=["benign", "malignant"])
    pool = load_data(data, spec, val_fraction=0.0).train
    assert pool is not None
    assert [sorted(Path(str(pool.sources[i])).resolve().as_posix() for i in idx)
            for idx in site_indices(pool, rule, 3, 7)] == got


def test_split_by_a_csv_column_for_classification(tmp_path: Path) -> None:
    """A table like ../shared/data/wbc_2site/cells.csv: site,image,mask,label (image paths in an `image` column)."""
    image_folder(tmp_path / "img", n_per_class=6, size=16)
    table = tmp_path / "cells.csv"
    files = sorted((tmp_path / "img").glob("*/*.png"))
    hospital = {f: ("north" if i % 3 else "south") for i, f in enumerate(files)}
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["site", "image", "mask", "label"])
        for p in files:
            w.writerow([hospital[p], p.relative_to(tmp_path).as_posix(), "", p.parent.name])
    _ok("split", table, "--sites", 2, "--split", "by-group:site", "--out", tmp_path / "sites")
    got = [{r["path"] for r in _rows(tmp_path / "sites" / f"site{k}.csv")} for k in range(2)]
    north = {p.resolve().as_posix() for p in files if hospital[p] == "north"}
    south = {p.resolve().as_posix() for p in files if hospital[p] == "south"}
    assert got == [north, south]  # the larger group first
    code, _, err = invoke("split", table, "--sites", 2, "--split", "by-group:ward", "--out", tmp_path / "other")
    assert code != 0 and "no column 'ward'" in err and not (tmp_path / "other").exists()


def test_wbc_cells_split_by_site(tmp_path: Path) -> None:
    cells = shared_data("wbc_2site") / "cells.csv"
    _ok("split", cells, "--sites", 2, "--split", "by-group:site", "--out", tmp_path / "sites")
    sites = [_rows(tmp_path / "sites" / f"site{k}.csv") for k in range(2)]
    assert [len(s) for s in sites] == [300, 100]
    assert {Path(r["path"]).parts[-3] for r in sites[0]} == {"jiangxi_tecom"}
    assert {Path(r["path"]).parts[-3] for r in sites[1]} == {"cellavision_blog"}


def test_npz_and_segmentation_sites_are_data_finetune_reads(tmp_path: Path) -> None:
    npz = npz_file(tmp_path / "d.npz", n=40)
    _ok("split", npz, "--sites", 2, "--out", tmp_path / "npz-sites", "--seed", 1)
    with np.load(npz) as z:
        images, labels = z["train_images"], z["train_labels"]
    parts = split_iid(40, 2, 1)
    for k, idx in enumerate(parts):
        with np.load(tmp_path / "npz-sites" / f"site{k}.npz") as site:
            assert sorted(site.files) == ["train_images", "train_labels"]
            assert np.array_equal(site["train_images"], images[idx])
            assert np.array_equal(site["train_labels"], labels[idx])

    seg = seg_folder(tmp_path / "seg", n=6, size=16)
    _ok("split", seg, "--sites", 2, "--out", tmp_path / "seg-sites")
    spec = ModelSpec("", "segmentation", 2, labels=["0", "1"])
    names = []
    for k, idx in enumerate(split_iid(6, 2, 0)):
        site = tmp_path / "seg-sites" / f"site{k}"
        expected = sorted(f"s{i}.png" for i in idx)
        assert sorted(p.name for p in (site / "images").iterdir()) == expected
        assert all((site / "masks" / n).read_bytes() == (seg / "masks" / n).read_bytes() for n in expected)
        ds = load_data(site, spec, val_fraction=0.0).train
        assert ds is not None and len(ds) == len(idx)
        names += expected
    assert sorted(names) == sorted(f"s{i}.png" for i in range(6))


def test_refuses_a_non_empty_out_and_leaves_no_half_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = seg_folder(tmp_path / "seg", n=6, size=16)
    out = tmp_path / "sites"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = invoke("split", data, "--sites", 2, "--out", out)
    assert code != 0 and "not an empty folder" in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    import taskvec.simulation.sites as sites_mod

    calls = []
    real = sites_mod._link

    def interrupted(src: Path, dest: Path) -> None:
        calls.append(dest)
        if len(calls) == 9:  # three images and three masks a site: the second site, half written
            raise OSError(28, "No space left on device")
        real(src, dest)

    monkeypatch.setattr(sites_mod, "_link", interrupted)
    fresh = tmp_path / "fresh"
    code, _, err = invoke("split", data, "--sites", 2, "--out", fresh)
    assert code != 0 and len(calls) == 9
    assert not fresh.exists()  # nothing half-written: the folder it created is gone


def test_split_never_writes_into_the_data(tmp_path: Path) -> None:
    """A folder named images/ inside images/ keeps its place (it once mapped two images onto one name, and the
    copy onto the first one's hard link overwrote the user's file); an `out` inside the data is refused."""
    data = seg_folder(tmp_path / "seg", n=4, size=16)
    inner = seg_folder(tmp_path / "inner", n=2, size=16, seed=1)
    for folder in ("images", "masks"):
        (data / folder / "images").mkdir()
        for i in range(2):
            (data / folder / "images" / f"s{i}.png").write_bytes((inner / folder / f"s{i}.png").read_bytes())
    before = {p: p.read_bytes() for p in data.rglob("*.png")}
    _ok("split", data, "--sites", 1, "--out", tmp_path / "sites")
    assert {p: p.read_bytes() for p in data.rglob("*.png")} == before  # the data as it was
    site = tmp_path / "sites" / "site0"
    assert sorted(p.relative_to(site / "images").as_posix() for p in (site / "images").rglob("*.png")) == sorted(
        p.relative_to(data / "images").as_posix() for p in (data / "images").rglob("*.png"))  # all 6, in place
    for out in (data / "images" / "sites", data / "sites"):
        code, _, err = invoke("split", data, "--sites", 2, "--out", out)
        assert code != 0 and "is inside the data" in err and not out.exists()


def test_split_refuses_an_image_listed_twice(tmp_path: Path) -> None:
    """Two sites would share the image (even with two labels)."""
    image_folder(tmp_path / "img", n_per_class=4, size=16)
    files = sorted((tmp_path / "img").glob("*/*.png"))
    rows = [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}" for p in files]
    (tmp_path / "d.csv").write_text("\n".join(["path,label", *rows, rows[0]]) + "\n")
    code, _, err = invoke("split", tmp_path / "d.csv", "--sites", 3, "--out", tmp_path / "sites")
    assert code != 0 and "twice; sites must not share an image" in err and not (tmp_path / "sites").exists()


def test_split_refuses_a_file_name_its_csv_cannot_hold(tmp_path: Path) -> None:
    """A name from a Latin-1 file system loads (as surrogates), but a site's CSV is UTF-8: one line, nothing
    written."""
    import os

    root = image_folder(tmp_path / "img", n_per_class=4, size=16)
    first = sorted((root / "1").iterdir())[0]
    (root / "1" / os.fsdecode(b"caf\xe9.png")).write_bytes(first.read_bytes())
    code, _, err = invoke("split", root, "--sites", 2, "--out", tmp_path / "sites")
    assert code != 0 and "caf\\udce9.png' is not UTF-8, which a site's CSV is; rename the file" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "sites").exists()
