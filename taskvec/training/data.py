"""Datasets a hospital has, read into one form: uint8 images at the base's channels and size, plus targets.

Layouts (detected from `path`):
- classification: an ImageFolder tree (`root/<class>/*.png`), a UTF-8 CSV `path,label[,patient_id,split]`
  (paths relative to the CSV; labels are class names or indices), or a MedMNIST-style `.npz`
  (`train_images`, `train_labels`, `val_*`, `test_*`; labels `(N,)` or `(N,1)`);
- segmentation: `root/images/` + `root/masks/` with matching file stems; masks binary (0/255) or class
  indices (0..K-1, background 0);
- either, split by the data itself: `root/{train,val,test}/` each holding one of the layouts above.

Conversion policy: an image goes to the base's channels (grayscale → RGB repeats the channel; RGB → gray is
ITU-R 601 luma; alpha is dropped; 16-bit and float images are scaled by their maximum value), then is resized
to `img_size × img_size` (bilinear for images, nearest for masks), without cropping, so the aspect ratio
is not kept and nothing at the borders is lost. Images stay uint8; `Normalizer` scales them on the device.

Splits: the data's own (npz keys, a CSV `split` column, `train/val/test` folders); else about `val_fraction`
of the units (patients when patient ids are given, else images) go to validation, each by a keyed hash of its
own id (`hold_out`), so no patient is in two splits (a patient found in two of the data's own splits is an
error) and adding or removing one unit never moves another: a DP guarantee for the training set is then one
for the data set the site holds. Unreadable image files are skipped and counted (`DataSplits.skipped`);
every other problem is a `TaskvecError` naming the file.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from taskvec.errors import ConfigError, MismatchError, TaskvecError, check_range
from taskvec.models.spec import ModelSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
Source = str | int  # a file path, or a row of an in-memory array


@dataclass(eq=False)
class ImageDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Samples of one split: `dataset[i]` is `(uint8 tensor C×S×S, label int | int64 mask S×S)`.

    `groups` holds per-sample patient ids when the data gives them (None otherwise); `subset(indices)`
    makes a site's share for simulations. `root` is the data root that image ids are relative to, and
    `array_name` the npz array that row numbers index.
    """

    task: str
    in_chans: int
    img_size: int
    num_classes: int
    sources: list[Source]
    targets: list[Any]  # class index per sample, or the mask's path
    groups: list[str] | None = None
    array: np.ndarray | None = field(default=None, repr=False)  # images when `sources` are row numbers
    binary_masks: list[bool] | None = None  # per mask: stored as 0/255 (255 → class 1)
    root: str | None = None
    array_name: str = "images"

    @property
    def unit(self) -> str:
        """The unit of privacy and of splitting: `patient` when the data gives patient ids, else `image`."""
        return "patient" if self.groups is not None else "image"

    def image_ids(self) -> list[str]:
        """Each image's id: its file path relative to the data root (POSIX), or `ARRAY[ROW]` for an npz row."""
        out = []
        for src in self.sources:
            if isinstance(src, int):
                out.append(f"{self.array_name}[{src}]")
            else:
                out.append(Path(os.path.relpath(src, self.root)).as_posix() if self.root else str(src))
        return out

    def unit_ids(self) -> list[str]:
        """Each image's unit: its patient id, or its image id."""
        return list(self.groups) if self.groups is not None else self.image_ids()

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        src = self.sources[i]
        if isinstance(src, int) and self.array is not None:
            a = self.array[src]
            if a.shape[:2] == (self.img_size, self.img_size) and a.size == self.img_size ** 2 * self.in_chans:
                a = a.reshape(self.img_size, self.img_size, self.in_chans).copy()  # already in shape: no PIL
            else:
                a = to_array(Image.fromarray(a), self.in_chans, self.img_size)
        else:
            a = to_array(_open(str(src)), self.in_chans, self.img_size)
        x = torch.from_numpy(a).permute(2, 0, 1)
        if self.task == "classification":
            return x, int(self.targets[i])
        mask = np.asarray(_open(self.targets[i]).resize((self.img_size, self.img_size), Image.Resampling.NEAREST))
        if self.binary_masks is not None and self.binary_masks[i]:
            mask = mask > 0
        return x, torch.from_numpy(mask.astype(np.int64))

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        idx = [int(i) for i in indices]

        def pick(xs: list[Any]) -> list[Any]:
            return [xs[i] for i in idx]

        return replace(
            self, sources=pick(self.sources), targets=pick(self.targets),
            groups=pick(self.groups) if self.groups is not None else None,
            binary_masks=pick(self.binary_masks) if self.binary_masks is not None else None,
        )

    def concat(self, other: ImageDataset) -> ImageDataset:
        if self.array is not None or other.array is not None:
            if self.array is not other.array:
                raise TaskvecError("cannot join in-memory splits of different arrays")
        g = self.groups + other.groups if self.groups is not None and other.groups is not None else None
        b = (self.binary_masks or [False] * len(self)) + (other.binary_masks or [False] * len(other))
        return replace(self, sources=self.sources + other.sources, targets=self.targets + other.targets,
                       groups=g, binary_masks=b if self.task == "segmentation" else None)


@dataclass
class DataSplits:
    """The splits of one data source; `own_splits` says whether the data defined them itself."""

    train: ImageDataset | None
    val: ImageDataset | None
    test: ImageDataset | None
    source: str = ""
    own_splits: bool = False
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def get(self, split: str) -> ImageDataset:
        """One split by name, or `all` for every sample."""
        if split == "all":
            parts = [d for d in (self.train, self.val, self.test) if d is not None]
            out = parts[0]
            for d in parts[1:]:
                out = out.concat(d)
            return out
        if split not in SPLITS:
            raise ConfigError(f"split must be one of train, val, test, all, got {split!r}", field="split",
                              expected=[*SPLITS, "all"], got=split)
        ds = getattr(self, split)
        if ds is None:
            have = [s for s in SPLITS if getattr(self, s) is not None]
            hint = "" if self.own_splits else " (the data has no splits of its own)"
            raise TaskvecError(f"{self.source}: no {split} split{hint}; it has {', '.join(have)}; "
                               "set `split` to all to use every sample", path=self.source, field="split")
        return ds


# --------------------------------------------------------------------------------------------- images


# Bounded work for any input: one image decodes to at most a few hundred MB, and an npz may not expand past
# these sizes (a 1 MB npz of zeros can claim gigabytes).
MAX_IMAGE_PIXELS = 50_000_000
MAX_NPZ_ARRAY_BYTES = 8 << 30
MAX_NPZ_RATIO = 100  # decompressed / compressed, for arrays over 64 MiB


class ImageTooLargeError(TaskvecError):
    """An image whose header declares more than `MAX_IMAGE_PIXELS` pixels (refused, never skipped)."""


def _open(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image lazily (header only), refusing non-regular files and images over `MAX_IMAGE_PIXELS`."""
    if not Path(path).is_file():
        raise TaskvecError(f"{path}: not a regular file", path=path)
    try:
        img = Image.open(path)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        raise TaskvecError(f"{path}: cannot read image ({e})") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLargeError(f"{path}: image of {w}x{h} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit; "
                                 "downsample it first", path=path)
    return img


def to_array(img: Image.Image, in_chans: int, size: int) -> np.ndarray:
    """An image as uint8 `size × size × in_chans` under the module's conversion policy."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        f = a.astype(np.float32)  # one float32 copy, scaled in place (no float64 copies of a large image)
        f *= 255.0 / top
        f += 0.5
        np.clip(f, 0, 255, out=f)
        img = Image.fromarray(f.astype(np.uint8))
    img = img.convert("RGB" if in_chans == 3 else "L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    a = np.array(img, dtype=np.uint8)  # a writable copy for torch.from_numpy
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] != in_chans:
        a = np.repeat(a, in_chans, axis=2)
    return a


def _readable(path: Path) -> bool:
    """Open and verify an image file (header and, for PNG, every chunk's CRC) without decoding it."""
    try:
        with _open(path) as im:
            im.verify()
        return True
    except ImageTooLargeError:
        raise
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt files
        return False


def _image_files(folder: Path) -> list[Path]:
    """Regular image files under `folder` (FIFOs and devices named like images are not files to read)."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def _check_npz(path: Path) -> None:
    """Refuse an npz whose arrays would expand past the limits, before any is decompressed."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                size = info.file_size
                with zf.open(info) as f:
                    fmt = np.lib.format
                    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(
                        fmt.read_magic(f))
                    if read is None:
                        raise ValueError(f"{info.filename}: unsupported .npy version")
                    shape, _, dtype = read(f)
                claimed = int(np.prod(shape, dtype=np.float64) * dtype.itemsize)
                bomb = size > 64 << 20 and size > MAX_NPZ_RATIO * max(info.compress_size, 1)
                if claimed > size or size > MAX_NPZ_ARRAY_BYTES or bomb:
                    raise TaskvecError(
                        f"{path}: array {info.filename} expands to {max(size, claimed):,} B from "
                        f"{info.compress_size:,} B (limit {MAX_NPZ_ARRAY_BYTES:,} B, ratio {MAX_NPZ_RATIO}); refused",
                        path=path,
                    )
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise TaskvecError(f"{path}: cannot read npz ({e})", path=path) from None


# ------------------------------------------------------------------------------------------- layouts


class _Reader:
    """Reads one data source for a model spec, collecting skipped files and warnings."""

    def __init__(self, spec: ModelSpec, img_size: int) -> None:
        self.spec, self.img_size = spec, img_size
        self.skipped: list[str] = []
        self.warnings: list[str] = []

    def dataset(self, sources: list[Source], targets: list[Any], groups: list[str] | None = None,
                array: np.ndarray | None = None, binary: list[bool] | None = None) -> ImageDataset:
        s = self.spec
        return ImageDataset(s.task, s.in_chans, self.img_size, s.num_classes, sources, targets, groups, array, binary)

    def label_index(self, label: str, where: str) -> int:
        labels = self.spec.labels
        if label in labels:
            return labels.index(label)
        try:
            i = int(label)
        except ValueError:
            raise MismatchError(
                f"{where}: class {label!r} is not one of the base's labels {labels}; rename it or use a base "
                "made with matching `labels`", path=where, field="labels", expected=labels, got=label
            ) from None
        self.check_range(np.array([i]), where)
        return i

    def check_range(self, labels: np.ndarray, where: str) -> None:
        k = self.spec.num_classes
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            raise MismatchError(f"{where}: label {int(bad[0])} is outside the base's classes 0..{k - 1}")

    def keep_readable(self, paths: list[Path]) -> list[bool]:
        ok = [_readable(p) for p in paths]
        self.skipped += [str(p) for p, good in zip(paths, ok) if not good]
        return ok

    # classification layouts

    def image_folder(self, root: Path) -> ImageDataset:
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise TaskvecError(f"{root}: no class folders; expected {root}/<class>/<image files>")
        sources: list[Source] = []
        targets: list[Any] = []
        for c in classes:
            idx = self.label_index(c.name, f"{root}: folder {c.name}")
            files = _image_files(c)
            if not files:
                raise TaskvecError(f"{c}: class folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files = [f for f, ok in zip(files, self.keep_readable(files)) if ok]
            sources += [str(f) for f in files]
            targets += [idx] * len(files)
        missing = set(range(self.spec.num_classes)) - set(targets)
        if missing:
            names = [self.spec.labels[i] for i in sorted(missing)]
            self.warnings.append(f"{root}: no images of class {', '.join(names)}")
        return self.nonempty(self.dataset(sources, targets), root)

    def csv_file(self, path: Path) -> dict[str, ImageDataset]:
        lines, rows = _csv_rows(path)
        if not rows:
            raise TaskvecError(f"{path}: CSV has no rows; expected a header `path,label[,patient_id,split]`")
        cols = set(rows[0])
        if not {"path", "label"} <= cols:
            raise TaskvecError(f"{path}: CSV needs columns path and label (has {', '.join(sorted(cols))})")
        has_split = "split" in cols and any(r["split"] for r in rows)
        paths = [(path.parent / r["path"]).resolve() for r in rows]
        for line, p, r in zip(lines, paths, rows):
            if not p.is_file():
                raise TaskvecError(f"{path}:{line}: row path {r['path']} is not an existing regular file ({p})")
        use_groups = "patient_id" in cols
        if use_groups:  # an id-less row's unit would be a guess: its patient, or the row (which moves with others)
            blank = next((line for line, r in zip(lines, rows) if not r["patient_id"].strip()), None)
            if blank is not None:
                raise TaskvecError(f"{path}:{blank}: no patient_id; give every row its patient's id, or drop the "
                                   "column to make each image its own unit", path=path, field="patient_id")
        ok = self.keep_readable(paths)
        by_split: dict[str, tuple[list[Source], list[Any], list[str]]] = {}
        for line, p, r, good in zip(lines, paths, rows, ok):
            if not good:
                continue
            split = _split_name(r["split"], f"{path}:{line}") if has_split else "train"
            srcs, tgts, grps = by_split.setdefault(split, ([], [], []))
            srcs.append(str(p))
            tgts.append(self.label_index(r["label"].strip(), f"{path}:{line}"))
            grps.append(r.get("patient_id", "").strip())
        out = {s: self.dataset(v[0], v[1], v[2] if use_groups else None) for s, v in by_split.items()}
        return {s: self.nonempty(d, path) for s, d in out.items()}

    def npz_file(self, path: Path) -> dict[str, ImageDataset]:
        _check_npz(path)
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TaskvecError(f"{path}: cannot read npz ({e})") from None
        out = {}
        for split in SPLITS:
            if f"{split}_images" not in z.files:
                continue
            images = np.asarray(z[f"{split}_images"])
            labels = np.asarray(z[f"{split}_labels"]) if f"{split}_labels" in z.files else None
            if labels is None:
                raise TaskvecError(f"{path}: has {split}_images but no {split}_labels")
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images):
                raise TaskvecError(f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)},) "
                                   "or (N, 1) (multi-label sets are not supported)")
            if images.ndim not in (3, 4) or images.dtype != np.uint8:
                raise TaskvecError(f"{path}: {split}_images must be uint8 (N,H,W) or (N,H,W,C), "
                                   f"got {images.dtype} {images.shape}")
            self.check_range(labels.astype(np.int64), f"{path} ({split}_labels)")
            ds = self.dataset(list(range(len(images))), labels.astype(np.int64).tolist(), array=images)
            out[split] = self.nonempty(replace(ds, array_name=f"{split}_images"), path)
        if not out:
            raise TaskvecError(f"{path}: no `<split>_images` arrays (expected train_images, train_labels, ...)")
        return out

    # segmentation layout

    def seg_folder(self, root: Path) -> ImageDataset:
        img_dir, mask_dir = root / "images", root / "masks"
        images = {p.relative_to(img_dir).with_suffix("").as_posix(): p for p in _image_files(img_dir)}
        masks = {p.relative_to(mask_dir).with_suffix("").as_posix(): p for p in _image_files(mask_dir)}
        if not images:
            raise TaskvecError(f"{img_dir}: no image files")
        for a, b, what in ((images, masks, "has no mask in"), (masks, images, "has no image in")):
            lone = sorted(set(a) - set(b))
            if lone:
                other = mask_dir if a is images else img_dir
                raise TaskvecError(f"{(img_dir if a is images else mask_dir) / lone[0]}: {what} {other} "
                                   f"({len(lone)} unpaired); image and mask files need the same name")
        stems = sorted(images)
        ok = [a and b for a, b in zip(self.keep_readable([images[s] for s in stems]),
                                      self.keep_readable([masks[s] for s in stems]))]
        stems = [s for s, good in zip(stems, ok) if good]
        binary = [self.check_mask(images[s], masks[s]) for s in stems]
        ds = self.dataset([str(images[s]) for s in stems], [str(masks[s]) for s in stems], binary=binary)
        return self.nonempty(ds, root)

    def check_mask(self, image: Path, mask: Path) -> bool:
        """Validate one mask against its image; return True for 0/255 binary masks."""
        with _open(image) as im, _open(mask) as m:
            if im.size != m.size:
                raise TaskvecError(f"{mask}: size {m.size} differs from its image's {im.size}")
            if m.mode not in ("L", "P", "1", "I", "I;16"):
                raise TaskvecError(f"{mask}: mode {m.mode}; masks must be single-channel (binary or class index)")
            values = np.unique(np.asarray(m))
        k = self.spec.num_classes
        if values.min() >= 0 and values.max() < k:
            return False
        if set(values.tolist()) <= {0, 255}:
            return True
        raise MismatchError(f"{mask}: values {values.tolist()[:8]} are neither class indices 0..{k - 1} "
                            "nor binary 0/255")

    def nonempty(self, ds: ImageDataset, where: Path) -> ImageDataset:
        if len(ds) == 0:
            raise TaskvecError(f"{where}: no readable images ({len(self.skipped)} unreadable files skipped)")
        return ds

    def source(self, path: Path) -> dict[str, ImageDataset] | ImageDataset:
        """One source: a dict of its own splits, or a single pool of samples."""
        seg = self.spec.task == "segmentation"
        if path.is_file():
            suffix = path.suffix.lower()
            if seg:
                raise TaskvecError(f"{path}: segmentation data is a folder with images/ and masks/")
            if suffix == ".npz":
                return self.npz_file(path)
            if suffix == ".csv":
                return self.csv_file(path)
            raise TaskvecError(f"{path}: unknown data file; give a folder, a .csv or a .npz")
        if not path.is_dir():
            raise TaskvecError(f"{path}: no such file or folder")
        split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in path.iterdir()
                      if p.is_dir() and p.name.lower() in SPLIT_ALIASES}
        if seg:  # a challenge's test images without masks cannot be scored: left out, not fatal
            for name, p in list(split_dirs.items()):
                if name != "train" and (p / "images").is_dir() and not (p / "masks").exists():
                    self.warnings.append(f"{p}: images without masks (an unlabelled split); left out")
                    del split_dirs[name]
        if split_dirs:
            return {s: self.layout(p) for s, p in split_dirs.items()}
        return self.layout(path)

    def layout(self, path: Path) -> ImageDataset:
        if self.spec.task == "segmentation":
            if not ((path / "images").is_dir() and (path / "masks").is_dir()):
                raise TaskvecError(f"{path}: segmentation data needs {path}/images and {path}/masks folders")
            return self.seg_folder(path)
        if (path / "images").is_dir() and (path / "masks").is_dir():
            raise TaskvecError(f"{path}: holds images/ and masks/ (segmentation data) but the base is a classifier")
        return self.image_folder(path)


def _csv_rows(path: Path) -> tuple[list[int], list[dict[str, str]]]:
    """The rows of a UTF-8 CSV (a leading BOM is allowed) as dicts by header name, with the line each ends
    on; a malformed file (bad encoding, NUL bytes, a field over `csv.field_size_limit()`, a row whose
    field count differs from the header's) is a TaskvecError naming the line."""
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TaskvecError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the CSV as UTF-8",
                           path=path) from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise TaskvecError(f"{path}:{line}: NUL byte; not a text CSV (a UTF-16 export? save it as UTF-8)",
                           path=path)
    reader = csv.reader(io.StringIO(text, newline=""))
    lines: list[int] = []
    rows: list[dict[str, str]] = []
    try:
        header = next(reader, [])
        for fields in reader:
            if not fields:  # a blank line
                continue
            if len(fields) != len(header):
                raise TaskvecError(f"{path}:{reader.line_num}: {len(fields)} fields, the header has {len(header)}",
                                   path=path)
            lines.append(reader.line_num)
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise TaskvecError(f"{path}:{reader.line_num}: malformed CSV ({e})", path=path) from None
    return lines, rows


def _split_name(value: str, where: str) -> str:
    v = value.strip().lower()
    if v not in SPLIT_ALIASES:
        raise TaskvecError(f"{where}: split {value!r} is not train, val or test")
    return SPLIT_ALIASES[v]


# ------------------------------------------------------------------------------------------- splitting


def _split_keys(ds: ImageDataset) -> list[str]:
    """What decides each image's side in `hold_out`: its patient id; else its image id (a file path relative to
    the data root), or for an npz row the SHA-256 of its pixels (a row number moves when a row is removed)."""
    if ds.groups is not None:
        return [f"patient:{g}" for g in ds.groups]
    if ds.array is not None and all(isinstance(s, int) for s in ds.sources):
        return [f"pixels:{hashlib.sha256(ds.array[int(s)].tobytes()).hexdigest()}" for s in ds.sources]
    return [f"image:{i}" for i in ds.image_ids()]


def in_holdout(key: str, fraction: float, seed: int) -> bool:
    """Whether the unit `key` falls in a held-out share `fraction`: SHA-256 of (seed, key) read as a number in
    [0, 1). Each unit's side depends on its own key alone."""
    digest = hashlib.sha256(f"taskvec-holdout\0{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def hold_out(ds: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset | None]:
    """(train, val): each unit (a patient with all their images, or an image) goes to val with probability
    `fraction` by a keyed hash of its own id (`in_holdout`), independently of every other unit, so adding or
    removing one unit moves that unit alone. val is None when no unit falls in it (a small data set)."""
    check_range("fraction", fraction, low=0, high=1)
    held = [in_holdout(k, fraction, seed) for k in _split_keys(ds)]
    if all(held):
        raise TaskvecError(f"all {len(set(ds.unit_ids()))} {ds.unit}(s) fell in the validation share "
                           f"({fraction:g}); give a smaller val_fraction, more data, or a val split of the data's own")
    val_idx = [i for i, h in enumerate(held) if h]
    train = ds.subset([i for i, h in enumerate(held) if not h])
    return train, ds.subset(val_idx) if val_idx else None


def hold_out_by_patient(ds: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """A seeded (rest, held-out) draw with about `fraction` of the samples held out, whole patients at a time,
    for designing experiments (a simulation's test and public shares). A site's own validation split is
    `hold_out`'s: this draw depends on every other unit in the data."""
    check_range("fraction", fraction, low=0, high=1)
    groups = ds.groups if ds.groups is not None else [str(i) for i in range(len(ds))]
    unique = sorted(set(groups))
    if len(unique) < 2:
        raise TaskvecError(f"cannot split a validation set from {len(unique)} patient(s); give a val split")
    order = np.random.default_rng(seed).permutation(len(unique))
    sizes: dict[str, int] = {}
    for g in groups:
        sizes[g] = sizes.get(g, 0) + 1
    val_groups: set[str] = set()
    target, n = fraction * len(ds), 0
    for i in order:  # whole patients while the count stays nearest the target; at least one
        size = sizes[unique[i]]
        if val_groups and (n + size / 2 > target or len(val_groups) == len(unique) - 1):
            break
        val_groups.add(unique[i])
        n += size
    val_idx = [i for i, g in enumerate(groups) if g in val_groups]
    train_idx = [i for i, g in enumerate(groups) if g not in val_groups]
    return ds.subset(train_idx), ds.subset(val_idx)


def split_record(train: ImageDataset, val: ImageDataset | None) -> dict[str, Any]:
    """Which units trained and which validated: `{"unit": "patient"|"image", "train": [ids], "val": [ids]}`
    (sorted ids: patient ids, or image ids, `ImageDataset.image_ids`). For the site's own records only."""
    return {"unit": train.unit, "train": sorted(set(train.unit_ids())),
            "val": sorted(set(val.unit_ids())) if val is not None else []}


def check_patients(splits: dict[str, ImageDataset], where: str) -> None:
    """Refuse data whose own splits share a patient."""
    seen: dict[str, str] = {}
    for name, ds in splits.items():
        for g in set(ds.groups or []):
            if g in seen and seen[g] != name:
                raise TaskvecError(f"{where}: patient {g!r} is in both the {seen[g]} and {name} splits; "
                                   "a patient's images must stay in one split")
            seen[g] = name


def load_data(
    path: str | os.PathLike[str], spec: ModelSpec, *, img_size: int | None = None,
    val_fraction: float = 0.1, seed: int = 0,
) -> DataSplits:
    """Read a data source for a model spec (its task, classes, channels and input size) into splits."""
    p = Path(path)
    reader = _Reader(spec, int(img_size or spec.img_size))
    found = reader.source(p)
    own = isinstance(found, dict)
    splits = found if isinstance(found, dict) else {"train": found}
    root = str(p if p.is_dir() else p.parent)
    splits = {name: replace(ds, root=root) for name, ds in splits.items()}
    check_patients(splits, str(p))
    if "val" not in splits and "train" in splits and val_fraction > 0:
        splits["train"], val = hold_out(splits["train"], val_fraction, seed)
        if val is None:
            reader.warnings.append(f"no {splits['train'].unit} fell in the validation share ({val_fraction:g}); "
                                   "no validation metrics")
        else:
            splits["val"] = val
    if reader.skipped:
        reader.warnings.append(f"skipped {len(reader.skipped)} unreadable image file(s), e.g. {reader.skipped[0]}")
    return DataSplits(splits.get("train"), splits.get("val"), splits.get("test"), str(p), own,
                      reader.skipped, reader.warnings)


def as_splits(data: str | os.PathLike[str] | DataSplits | ImageDataset, spec: ModelSpec, *,
              img_size: int | None = None, val_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """Accept a path, ready-made splits, or one dataset (split into train/val by `val_fraction`)."""
    if isinstance(data, DataSplits):
        out = data
    elif isinstance(data, ImageDataset):
        if val_fraction > 0:
            train, val = hold_out(data, val_fraction, seed)
            out = DataSplits(train, val, None, "dataset")
        else:
            out = DataSplits(data, None, None, "dataset")
    else:
        return load_data(data, spec, img_size=img_size, val_fraction=val_fraction, seed=seed)
    for ds in (out.train, out.val, out.test):
        if ds is not None and (ds.task, ds.num_classes, ds.in_chans) != (spec.task, spec.num_classes, spec.in_chans):
            raise MismatchError(f"dataset is {ds.task} with {ds.num_classes} classes and {ds.in_chans} channels; "
                                f"the base is {spec.task} with {spec.num_classes} and {spec.in_chans}")
    return out


# ---------------------------------------------------------------------------------------- model input


class Normalizer:
    """uint8 batches → float inputs normalised with the architecture's pretrained mean/std (on the device)."""

    def __init__(self, spec: ModelSpec, device: torch.device | str) -> None:
        import timm

        cfg = timm.get_pretrained_cfg(spec.arch)
        mean = np.array(cfg.mean if cfg is not None else (0.485, 0.456, 0.406), dtype=np.float32)
        std = np.array(cfg.std if cfg is not None else (0.229, 0.224, 0.225), dtype=np.float32)
        if spec.in_chans != len(mean):
            mean, std = np.full(spec.in_chans, mean.mean()), np.full(spec.in_chans, std.mean())
        self.scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.shift = torch.tensor(mean / std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


def make_loader(ds: ImageDataset, batch_size: int, device: torch.device, *, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                num_workers: int | None = None) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    """A DataLoader: worker processes decode images when training on a GPU (none on CPU, where they would
    compete with the model for the same cores) and pinned memory feeds the GPU."""
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if cuda else 0
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
        num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0,
    )
