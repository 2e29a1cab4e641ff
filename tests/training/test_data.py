"""Data loading: layouts, conversion policy, splits without patient leaks, and clear errors."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic_data import image_folder, npz_file, seg_folder

from taskvec.errors import MismatchError, TaskvecError
from taskvec.models.spec import ModelSpec
from taskvec.training.data import load_data


def spec(task: str = "classification", k: int = 2, chans: int = 3, size: int = 32,
         labels: list[str] | None = None) -> ModelSpec:
    return ModelSpec("test_vit", task, k, chans, size, labels or [str(i) for i in range(k)])


def test_image_folder_converts_channels_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "d"
    (root / "benign").mkdir(parents=True)
    (root / "malignant").mkdir()
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(gray).save(root / "benign" / "g.png")
    rgb = np.dstack([np.full((50, 50), v, np.uint8) for v in (200, 100, 0)])
    Image.fromarray(rgb).save(root / "malignant" / "c.jpg", quality=100)
    s = load_data(root, spec(labels=["malignant", "benign"]), val_fraction=0)
    assert s.train is not None and len(s.train) == 2
    g = s.train.sources.index(str(root / "benign" / "g.png"))
    assert sorted(s.train.targets) == [0, 1] and s.train.targets[g] == 1
    x, y = s.train[g]
    assert x.shape == (3, 32, 32) and x.dtype.__str__() == "torch.uint8"
    assert (x[0] == x[1]).all() and (x[1] == x[2]).all()  # grayscale repeated
    expected = np.asarray(Image.fromarray(gray).resize((32, 32), Image.BILINEAR))
    assert np.array_equal(x[0].numpy(), expected)
    # RGB to one channel is ITU-R 601 luma
    s1 = load_data(root, spec(chans=1, labels=["malignant", "benign"]), val_fraction=0)
    x1, _ = s1.train[s1.train.sources.index(str(root / "malignant" / "c.jpg"))]
    assert x1.shape == (1, 32, 32)
    assert abs(int(x1[0, 16, 16]) - round(0.299 * 200 + 0.587 * 100)) <= 2


def test_unknown_class_folder_and_empty_folders(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", n_per_class=2, labels=("0", "7"))
    with pytest.raises(MismatchError, match="outside the base's classes"):
        load_data(root, spec())
    named = image_folder(tmp_path / "n", n_per_class=2, labels=("cat", "dog"))
    with pytest.raises(MismatchError, match="not one of the base's labels"):
        load_data(named, spec(labels=["benign", "malignant"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskvecError, match="no class folders"):
        load_data(tmp_path / "empty", spec())
    (tmp_path / "e2" / "0").mkdir(parents=True)
    with pytest.raises(TaskvecError, match="holds no image files"):
        load_data(tmp_path / "e2", spec())


def test_corrupt_images_are_skipped_and_counted(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "d", n_per_class=4)
    (root / "0" / "garbage.png").write_bytes(b"not an image at all")
    good = (root / "1" / "0.png").read_bytes()
    (root / "1" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "1" / "notes.txt").write_text("ignored: not an image suffix")
    s = load_data(root, spec(), val_fraction=0)
    assert len(s.train) == 8
    assert sorted(Path(p).name for p in s.skipped) == ["garbage.png", "truncated.png"]
    assert any("skipped 2 unreadable" in w for w in s.warnings)


@pytest.mark.parametrize("split", ["all", "train"])
def test_a_csv_of_only_unreadable_images_is_one_error(tmp_path: Path, split: str) -> None:
    (tmp_path / "a").mkdir()
    for i in range(2):
        (tmp_path / "a" / f"{i}.png").write_bytes(b"not an image")
    (tmp_path / "d.csv").write_text("path,label\na/0.png,0\na/1.png,1\n")
    with pytest.raises(TaskvecError, match=r"d.csv: no readable images \(2 unreadable files skipped\)"):
        load_data(tmp_path / "d.csv", spec(), val_fraction=0).get(split)


def test_csv_split_never_leaks_a_patient(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", n_per_class=15)
    files = sorted(root.rglob("*.png"))
    rows = [f"{f.relative_to(tmp_path)},{f.parent.name},p{i // 3}" for i, f in enumerate(files)]
    lines = ["path,label,patient_id", *rows]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    s = load_data(tmp_path / "d.csv", spec(), val_fraction=0.3, seed=1)
    assert s.train.groups is not None and s.val.groups is not None
    assert not set(s.train.groups) & set(s.val.groups)
    assert len(s.train) + len(s.val) == 30 and 0 < len(s.val) < 30
    again = load_data(tmp_path / "d.csv", spec(), val_fraction=0.3, seed=1)
    assert again.val.sources == s.val.sources
    other = load_data(tmp_path / "d.csv", spec(), val_fraction=0.3, seed=2)
    assert other.val.sources != s.val.sources


def test_csv_own_splits_labels_and_errors(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", n_per_class=2)
    f = sorted(root.rglob("*.png"))
    rel = [str(p.relative_to(tmp_path)) for p in f]
    ok = ["path,label,patient_id,split", f"{rel[0]},benign,a,train", f"{rel[1]},malignant,b,train",
          f"{rel[2]},1,c,test", f"{rel[3]},0,d,val"]
    (tmp_path / "ok.csv").write_text("\n".join(ok) + "\n")
    s = load_data(tmp_path / "ok.csv", spec(labels=["benign", "malignant"]))
    assert s.own_splits and (len(s.train), len(s.val), len(s.test)) == (2, 1, 1)
    assert s.train.targets == [0, 1] and s.test.targets == [1]
    leak = ok[:2] + [f"{rel[1]},1,a,test"]
    (tmp_path / "leak.csv").write_text("\n".join(leak) + "\n")
    with pytest.raises(TaskvecError, match="patient 'a' is in both"):
        load_data(tmp_path / "leak.csv", spec(labels=["benign", "malignant"]))
    (tmp_path / "range.csv").write_text(f"path,label\n{rel[0]},5\n")
    with pytest.raises(MismatchError, match="label 5 is outside"):
        load_data(tmp_path / "range.csv", spec())
    (tmp_path / "cols.csv").write_text(f"file,label\n{rel[0]},0\n")
    with pytest.raises(TaskvecError, match=r"needs columns path \(or image\) and label"):
        load_data(tmp_path / "cols.csv", spec())
    (tmp_path / "table.csv").write_text(f"site,image,mask,label\nx,{rel[0]},,1\n")  # image (and mask) columns
    s = load_data(tmp_path / "table.csv", spec(), val_fraction=0.0)
    assert s.train.sources == [str((tmp_path / rel[0]).resolve())] and s.train.targets == [1]


def test_an_image_in_two_splits_is_refused(tmp_path: Path) -> None:
    """By a repeated CSV row, a hard link or a symbolic link: the model would be tested on an image it trained
    on. An image listed twice within one split is not a leak."""
    root = image_folder(tmp_path / "imgs", n_per_class=2)
    rel = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.png"))
    rows = ["path,label,split", f"{rel[0]},0,train", f"{rel[1]},0,train", f"{rel[2]},1,test"]
    (tmp_path / "d.csv").write_text("\n".join([*rows, f"{rel[1]},0,test"]) + "\n")
    with pytest.raises(TaskvecError, match=f"image {re.escape(rel[1])} is in both the train and test splits"):
        load_data(tmp_path / "d.csv", spec())
    (tmp_path / "ok.csv").write_text("\n".join([*rows, f"{rel[1]},0,train"]) + "\n")
    assert len(load_data(tmp_path / "ok.csv", spec(), val_fraction=0).train) == 3
    (tmp_path / "relabel.csv").write_text("\n".join([*rows, f"{rel[1]},1,train"]) + "\n")
    with pytest.raises(TaskvecError, match=f"image {re.escape(rel[1])} is listed with two labels, classes 0 and 1"):
        load_data(tmp_path / "relabel.csv", spec(), val_fraction=0)
    for link in ("hard", "symbolic"):
        data = image_folder(tmp_path / link / "train", n_per_class=3)
        (tmp_path / link / "test" / "0").mkdir(parents=True)
        copy = tmp_path / link / "test" / "0" / "copy.png"
        first = sorted((data / "0").glob("*.png"))[0]
        copy.hardlink_to(first) if link == "hard" else copy.symlink_to(first)
        with pytest.raises(TaskvecError, match=r"image train/0/\S+ is in both the train and test splits "
                                               r"\(also as test/0/copy.png\)"):
            load_data(tmp_path / link, spec(), val_fraction=0)


@pytest.mark.parametrize(("tail", "line", "said"), [
    (b"x" * (csv.field_size_limit() + 1) + b",0\n", 3,
     f"malformed CSV (field larger than field limit ({csv.field_size_limit()}))"),
    (b"x\0y.png,0\n", 3, "NUL byte; not a text CSV"),
    (b"caf\xe9.png,0\n", 3, "not UTF-8 text (byte 0xe9); save the CSV as UTF-8"),
    (b"\nimgs/0/0.png\n", 4, "1 fields, the header has 2"),
])
def test_malformed_csv_is_one_error_naming_the_line(tmp_path: Path, tail: bytes, line: int, said: str) -> None:
    image_folder(tmp_path / "imgs", n_per_class=1)
    good = b"\xef\xbb\xbfpath,label\nimgs/1/0.png,1\n"  # a UTF-8 BOM, as Excel writes
    (tmp_path / "good.csv").write_bytes(good)
    assert load_data(tmp_path / "good.csv", spec(), val_fraction=0).train.targets == [1]
    (tmp_path / "bad.csv").write_bytes(good + tail)
    with pytest.raises(TaskvecError, match="^" + re.escape(f"{tmp_path / 'bad.csv'}:{line}: {said}")) as e:
        load_data(tmp_path / "bad.csv", spec(), val_fraction=0)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("label_shape", ["(N,)", "(N,1)"])
def test_npz_label_shapes(tmp_path: Path, label_shape: str) -> None:
    p = npz_file(tmp_path / "d.npz", n=16, label_shape=label_shape)
    s = load_data(p, spec(chans=1))
    assert s.own_splits and (len(s.train), len(s.val), len(s.test)) == (16, 4, 8)
    x, y = s.test[3]
    assert x.shape == (1, 32, 32) and y == 1
    bad = dict(np.load(p))
    bad["train_labels"] = np.full(16, 2, np.uint8)
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(MismatchError, match="label 2 is outside"):
        load_data(tmp_path / "bad.npz", spec())
    empty = {**dict(np.load(p)), "train_images": np.zeros((16, 0, 0), np.uint8)}  # every row hashes alike
    np.savez(tmp_path / "empty.npz", **empty)
    with pytest.raises(TaskvecError, match=r"train_images must be uint8 .* >= 1, got uint8 \(16, 0, 0\)"):
        load_data(tmp_path / "empty.npz", spec(chans=1))


def test_segmentation_masks_binary_and_class_index(tmp_path: Path) -> None:
    root = seg_folder(tmp_path / "s", n=4, size=32)
    s = load_data(root, spec("segmentation"), val_fraction=0)
    x, m = s.train[0]
    raw = np.asarray(Image.open(root / "masks" / "s0.png"))
    assert x.shape == (3, 32, 32) and m.dtype.__str__() == "torch.int64"
    assert np.array_equal(m.numpy(), (raw > 0).astype(np.int64))  # 0/255 -> 0/1
    idx = tmp_path / "k"
    (idx / "images").mkdir(parents=True)
    (idx / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(idx / "images" / "a.png")
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16) % 3).save(idx / "masks" / "a.png")
    k = load_data(idx, spec("segmentation", k=3, size=16), val_fraction=0)
    assert np.array_equal(k.train[0][1].numpy(), np.arange(256).reshape(16, 16) % 3)
    with pytest.raises(MismatchError, match="neither class indices"):
        load_data(idx, spec("segmentation", k=2, size=16), val_fraction=0)


def test_segmentation_errors(tmp_path: Path) -> None:
    root = seg_folder(tmp_path / "s", n=3, size=32)
    (root / "masks" / "s1.png").unlink()
    with pytest.raises(TaskvecError, match="s1.*has no mask"):
        load_data(root, spec("segmentation"))
    root2 = seg_folder(tmp_path / "t", n=2, size=32)
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(root2 / "masks" / "s0.png")
    with pytest.raises(TaskvecError, match="differs from its image"):
        load_data(root2, spec("segmentation"))
    with pytest.raises(TaskvecError, match="needs .*images"):
        load_data(image_folder(tmp_path / "c", n_per_class=1), spec("segmentation"))
    with pytest.raises(TaskvecError, match="base is a classifier"):
        load_data(root2, spec())


def test_all_of_an_npz_with_its_own_splits_stacks_their_arrays(tmp_path: Path) -> None:
    import torch

    from taskvec.simulation.synthetic import write_classification_npz

    data = load_data(write_classification_npz(tmp_path / "d.npz", n_train=5, n_val=3, n_test=4, size=32),
                     spec(chans=1))
    everything = data.get("all")
    parts = [data.train, data.val, data.test]
    assert len(everything) == 12 and len(set(everything.image_ids())) == 12
    expected = [d[i] for d in parts if d is not None for i in range(len(d))]
    for i, (x, y) in enumerate(expected):
        got = everything[i]
        assert torch.equal(got[0], x) and got[1] == y, i


def test_split_folders_and_missing_split(tmp_path: Path) -> None:
    seg_folder(tmp_path / "d" / "train", n=6, size=32)
    seg_folder(tmp_path / "d" / "test", n=2, size=32, seed=1)
    s = load_data(tmp_path / "d", spec("segmentation"), val_fraction=0.34, seed=0)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 2, 2)
    assert not set(s.train.sources) & set(s.val.sources)
    assert len(s.get("all")) == 8
    single = load_data(tmp_path / "d" / "train", spec("segmentation"), val_fraction=0)
    with pytest.raises(TaskvecError, match="no test split.*`split` to all"):
        single.get("test")


def test_unlabelled_segmentation_split_is_left_out(tmp_path: Path) -> None:
    seg_folder(tmp_path / "d" / "train", n=6, size=32)
    unlabelled = seg_folder(tmp_path / "d" / "test", n=2, size=32, seed=1)
    for m in (unlabelled / "masks").iterdir():
        m.unlink()
    (unlabelled / "masks").rmdir()  # test/images only, as the ISBI 2012 challenge ships it
    s = load_data(tmp_path / "d", spec("segmentation"), val_fraction=0)
    assert len(s.train) == 6 and s.test is None
    assert any("test: images without masks (an unlabelled split); left out" in w for w in s.warnings)
    (tmp_path / "d" / "train" / "masks").rename(tmp_path / "masks-elsewhere")
    with pytest.raises(TaskvecError, match="train: segmentation data needs"):  # training images need masks
        load_data(tmp_path / "d", spec("segmentation"))


def test_subset_keeps_groups(tmp_path: Path) -> None:
    p = npz_file(tmp_path / "d.npz", n=8)
    ds = load_data(p, spec(chans=1)).train
    ds.groups = [f"p{i // 2}" for i in range(8)]
    sub = ds.subset([1, 2, 7])
    assert sub.groups == ["p0", "p1", "p3"] and sub.targets == [ds.targets[i] for i in (1, 2, 7)]
    assert np.array_equal(sub[2][0].numpy(), ds[7][0].numpy())


def test_a_file_name_that_is_not_utf8_still_splits(tmp_path: Path) -> None:
    """A name from a Latin-1 file system reads as a string with surrogates; its hold-out key hashes its bytes."""
    import os

    root = image_folder(tmp_path / "d", n_per_class=4)
    first = sorted((root / "1").iterdir())[0]
    odd = root / "1" / os.fsdecode(b"caf\xe9.png")
    odd.write_bytes(first.read_bytes())
    s = load_data(root, spec(), val_fraction=0.5, seed=0)
    ids = s.train.image_ids() + (s.val.image_ids() if s.val is not None else [])
    assert len(ids) == 9 and "1/caf\udce9.png" in ids


def test_two_images_of_one_name_in_a_segmentation_folder_are_refused(tmp_path: Path) -> None:
    root = seg_folder(tmp_path / "seg", n=3, size=32)
    Image.open(root / "images" / "s0.png").convert("RGB").save(root / "images" / "s0.jpg")
    with pytest.raises(TaskvecError, match=r"s0\.(png|jpg): s0\.(png|jpg) has the same name"):
        load_data(root, spec("segmentation"))


def test_numbers_are_names_when_the_base_labels_are_numbers(tmp_path: Path) -> None:
    """With labels 1, 2, 3 a "1" is the class named 1 (index 0) and a "0" could mean either: refused, where
    it used to be read as index 0 beside "1" read as a name (two classes merged)."""
    root = image_folder(tmp_path / "imgs", n_per_class=2)
    rel = sorted(str(p.relative_to(tmp_path)) for p in root.rglob("*.png"))
    grades = spec(k=3, labels=["1", "2", "3"])
    (tmp_path / "names.csv").write_text(f"path,label\n{rel[0]},1\n{rel[1]},3\n")
    assert load_data(tmp_path / "names.csv", grades, val_fraction=0).train.targets == [0, 2]
    (tmp_path / "index.csv").write_text(f"path,label\n{rel[0]},1\n{rel[1]},0\n")
    with pytest.raises(MismatchError, match=r"class '0' is not one of the base's labels .*read as a label's name"):
        load_data(tmp_path / "index.csv", grades, val_fraction=0)
    (tmp_path / "plain.csv").write_text(f"path,label\n{rel[0]},a\n{rel[1]},1\n")  # names a, b: 1 is an index
    assert load_data(tmp_path / "plain.csv", spec(labels=["a", "b"]), val_fraction=0).train.targets == [0, 1]


@pytest.mark.parametrize(("labels", "said"), [
    (np.array([0.9, 1.0] * 4), "train_labels must be whole class indices, got float64 0.9"),
    (np.array([np.nan, 1.0] * 4), "got float64 nan"),
    (np.array(["a", "b"] * 4), "got <U1 'a'"),
    (np.array([0.0, 1.0] * 4), None),
])
def test_npz_labels_must_be_whole_numbers(tmp_path: Path, labels: np.ndarray, said: str | None) -> None:
    np.savez(tmp_path / "d.npz", train_images=np.zeros((8, 28, 28), np.uint8), train_labels=labels)
    if said is None:
        assert load_data(tmp_path / "d.npz", spec(), val_fraction=0).train.targets == [0, 1] * 4
    else:
        with pytest.raises(TaskvecError, match=re.escape(said)):
            load_data(tmp_path / "d.npz", spec(), val_fraction=0)


def test_npz_channel_layouts(tmp_path: Path) -> None:
    """(N,H,W,1) is one channel (MedMNIST writes it); channels-first or 5 channels are refused when loaded."""
    gray = np.random.default_rng(0).integers(0, 255, (6, 28, 28, 1), dtype=np.uint8)
    np.savez(tmp_path / "c1.npz", train_images=gray, train_labels=np.arange(6) % 2)
    ds = load_data(tmp_path / "c1.npz", spec(chans=1, size=32), val_fraction=0).train
    assert ds[0][0].shape == (1, 32, 32) and len(ds) == 6
    for shape in ((6, 3, 32, 32), (6, 28, 28, 5)):
        np.savez(tmp_path / "bad.npz", train_images=np.zeros(shape, np.uint8), train_labels=np.arange(6) % 2)
        with pytest.raises(TaskvecError, match=re.escape(f"channels-last (N,H,W,C) with C 1, 3 or 4 and H, W >= 1, "
                                                         f"got uint8 {shape}")):
            load_data(tmp_path / "bad.npz", spec(), val_fraction=0)


def test_two_folders_of_one_split_and_a_repeated_csv_column_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    image_folder(root / "train", n_per_class=2)
    image_folder(root / "val", n_per_class=1, seed=1)
    image_folder(root / "extra", n_per_class=1, seed=2)
    s = load_data(root, spec())
    assert len(s.val) == 2 and any("extra beside them is not read" in w for w in s.warnings)
    image_folder(root / "Valid", n_per_class=1, seed=3)
    with pytest.raises(TaskvecError, match="folders Valid/ and val/ both hold the val split; keep one"):
        load_data(root, spec())
    rel = sorted(str(p.relative_to(tmp_path)) for p in (root / "train").rglob("*.png"))
    (tmp_path / "cols.csv").write_text(f"path,label,label\n{rel[0]},0,1\n")
    with pytest.raises(TaskvecError, match="cols.csv:1: column 'label' appears twice in the header"):
        load_data(tmp_path / "cols.csv", spec())


def test_an_image_that_fails_to_decode_is_named(tmp_path: Path) -> None:
    """A truncated JPEG passes the header check; decoding it is an error naming the file, not a bare OSError."""
    root = image_folder(tmp_path / "d", n_per_class=2)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "0" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    ds = load_data(root, spec(), val_fraction=0).train
    cut = ds.sources.index(str(root / "0" / "cut.jpg"))
    with pytest.raises(TaskvecError, match=r"cut.jpg: cannot decode image \(image file is truncated.*remove or re"):
        ds[cut]


def test_npz_arrays_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    """An object array (pickled, never loaded) and a 0-d image array: one error naming the file and array."""
    np.savez(tmp_path / "obj.npz", train_images=np.array([{"a": 1}] * 2, dtype=object), train_labels=np.zeros(2))
    with pytest.raises(TaskvecError, match=r"obj.npz: array train_images cannot be read \(Object arrays"):
        load_data(tmp_path / "obj.npz", spec(), val_fraction=0)
    np.savez(tmp_path / "zero.npz", train_images=np.uint8(3), train_labels=np.zeros(2))
    with pytest.raises(TaskvecError, match=r"zero.npz: train_images must be uint8 .* got uint8 \(\)"):
        load_data(tmp_path / "zero.npz", spec(), val_fraction=0)


def test_a_class_without_training_images_is_a_warning_in_every_layout(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs", n_per_class=2)
    rel = sorted(str(p.relative_to(tmp_path)) for p in (root / "0").glob("*.png"))
    (tmp_path / "d.csv").write_text("path,label\n" + "".join(f"{r},0\n" for r in rel))
    np.savez(tmp_path / "d.npz", train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros(4, np.uint8),
             test_images=np.zeros((2, 28, 28), np.uint8), test_labels=np.array([0, 1]))
    (root / "1").rename(tmp_path / "elsewhere")
    for data in (tmp_path / "d.csv", tmp_path / "d.npz", root):
        s = load_data(data, spec(k=3, labels=["0", "1", "2"]), val_fraction=0)
        assert f"{data}: no training images of class 1, 2" in s.warnings
    np.savez(tmp_path / "ok.npz", train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.arange(4) % 2)
    assert not any("no training images" in w for w in load_data(tmp_path / "ok.npz", spec(), val_fraction=0).warnings)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_image_with_non_finite_pixels_is_refused(tmp_path: Path, bad: float) -> None:
    """A float TIFF holding NaN or inf has no image to scale: an error naming it, not a black image."""
    root = image_folder(tmp_path / "d", n_per_class=2)
    pixels = np.linspace(0, 2, 64 * 64, dtype=np.float32).reshape(64, 64)
    Image.fromarray(pixels).save(root / "0" / "fine.tif")
    pixels[3, 5] = bad
    Image.fromarray(pixels).save(root / "0" / "bad.tif")
    ds = load_data(root, spec(), val_fraction=0).train
    fine = ds[ds.sources.index(str(root / "0" / "fine.tif"))][0]
    assert float(fine.float().max()) > 200  # a finite float image still loads, scaled to its maximum
    with pytest.raises(TaskvecError, match=r"bad.tif: cannot decode image \(pixel values that are NaN or infinite"):
        ds[ds.sources.index(str(root / "0" / "bad.tif"))]
