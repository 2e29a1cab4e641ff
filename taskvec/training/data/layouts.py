"""The data layouts a site may hand to `finetune` (ImageFolder, CSV, npz, segmentation folders, and
`train/val/test` folders of any of them), each read into `ImageDataset`s."""

from __future__ import annotations

import codecs
import csv
import io
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np

from taskvec.errors import MismatchError, TaskvecError, first_line
from taskvec.models.spec import ModelSpec
from taskvec.training.data.dataset import SPLITS, ImageDataset, Source
from taskvec.training.data.images import IMAGE_SUFFIXES, check_npz, image_files, open_image, readable

PATH_COLUMNS = ("path", "image")  # the CSV column of image paths, in order of preference
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}


class Reader:
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
        """A label's class: its name among the base's labels, else a class index, unless some label of the
        base is a number other than its own index (then a number that is not a label's name is refused, as it
        could mean either)."""
        labels = self.spec.labels
        if label in labels:
            return labels.index(label)
        numeric_names = any(_integer(name) is not None and name != str(i) for i, name in enumerate(labels))
        i = None if numeric_names else _integer(label)
        if i is None:
            raise MismatchError(
                f"{where}: class {label!r} is not one of the base's labels {labels}; rename it or use a base "
                "made with matching `labels`" + (" (the base's labels are numbers, so a number is read as a "
                                                 "label's name, never as a class index)" if numeric_names else ""),
                path=where, field="labels", expected=labels, got=label)
        self.check_range(np.array([i]), where)
        return i

    def check_range(self, labels: np.ndarray, where: str) -> None:
        k = self.spec.num_classes
        bad = labels[(labels < 0) | (labels >= k)]
        if bad.size:
            raise MismatchError(f"{where}: label {int(bad[0])} is outside the base's classes 0..{k - 1}")

    def warn_missing_classes(self, ds: ImageDataset | None, where: Path) -> None:
        """Warn when a classification training split holds no image of some class."""
        if ds is None or self.spec.task != "classification":
            return
        missing = set(range(self.spec.num_classes)) - set(ds.targets)
        if missing:
            names = [self.spec.labels[i] for i in sorted(missing)]
            self.warnings.append(f"{where}: no training images of class {', '.join(names)}")

    def keep_readable(self, paths: list[Path]) -> list[bool]:
        ok = [readable(p) for p in paths]
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
            files = image_files(c)
            if not files:
                raise TaskvecError(f"{c}: class folder holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files = [f for f, ok in zip(files, self.keep_readable(files)) if ok]
            sources += [str(f) for f in files]
            targets += [idx] * len(files)
        return self.nonempty(self.dataset(sources, targets), root)

    def csv_file(self, path: Path) -> dict[str, ImageDataset]:
        lines, rows = csv_rows(path)
        if not rows:
            raise TaskvecError(f"{path}: CSV has no rows; expected a header `path,label[,patient_id,split]`")
        cols = set(rows[0])
        if "label" not in cols or not cols & set(PATH_COLUMNS):
            raise TaskvecError(f"{path}: CSV needs columns path (or image) and label (has {', '.join(sorted(cols))})")
        has_split = "split" in cols and any(r["split"] for r in rows)
        paths = csv_paths(path, rows)
        for line, p, r in zip(lines, paths, rows):
            if not p.is_file():
                raise TaskvecError(f"{path}:{line}: row path {r[csv_path_column(r)]} is not an existing regular "
                                   f"file ({p})")
        use_groups = "patient_id" in cols
        if use_groups:  # an id-less row's unit would be a guess: its patient, or the row (which moves with others)
            blank = next((line for line, r in zip(lines, rows) if not r["patient_id"].strip()), None)
            if blank is not None:
                raise TaskvecError(f"{path}:{blank}: no patient_id; give every row its patient's id, or drop the "
                                   "column to make each image its own unit", path=path, field="patient_id")
            _one_spelling_each(path, lines, [r["patient_id"].strip() for r in rows])
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
        if not by_split:
            raise self.no_images(path)
        out = {s: self.dataset(v[0], v[1], v[2] if use_groups else None) for s, v in by_split.items()}
        return {s: self.nonempty(d, path) for s, d in out.items()}

    def npz_file(self, path: Path) -> dict[str, ImageDataset]:
        check_npz(path)
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise TaskvecError(f"{path}: cannot read npz ({e})") from None
        out = {}
        for split in SPLITS:
            if f"{split}_images" not in z.files:
                continue
            if f"{split}_labels" not in z.files:
                raise TaskvecError(f"{path}: has {split}_images but no {split}_labels")
            images, labels = _array(z, f"{split}_images", path), _array(z, f"{split}_labels", path)
            if images.ndim == 4 and images.shape[3] == 1:  # (N,H,W,1): one channel, as (N,H,W)
                images = images[..., 0]
            if (images.ndim not in (3, 4) or images.dtype != np.uint8 or 0 in images.shape[1:]
                    or (images.ndim == 4 and images.shape[3] not in (3, 4))):
                raise TaskvecError(f"{path}: {split}_images must be uint8 (N,H,W) or channels-last (N,H,W,C) with "
                                   f"C 1, 3 or 4 and H, W >= 1, got {images.dtype} {images.shape}")
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images):
                raise TaskvecError(f"{path}: {split}_labels has shape {labels.shape}, expected ({len(images)},) "
                                   "or (N, 1) (multi-label sets are not supported)")
            if labels.dtype.kind not in "iub":  # floats only when each is a whole number
                flat = labels.ravel()
                whole = (np.isfinite(flat) & (flat == np.round(flat))) if labels.dtype.kind == "f" \
                    else np.zeros(flat.shape, bool)
                if not np.all(whole):
                    raise TaskvecError(f"{path}: {split}_labels must be whole class indices, got {labels.dtype} "
                                       f"{flat[~whole][0].item()!r}")
            self.check_range(labels.astype(np.int64), f"{path} ({split}_labels)")
            ds = self.dataset(list(range(len(images))), labels.astype(np.int64).tolist(), array=images)
            out[split] = self.nonempty(replace(ds, array_name=f"{split}_images"), path)
        if not out:
            raise TaskvecError(f"{path}: no `<split>_images` arrays (expected train_images, train_labels, ...)")
        return out

    # segmentation layout

    def seg_folder(self, root: Path) -> ImageDataset:
        img_dir, mask_dir = root / "images", root / "masks"
        images, masks = _by_stem(img_dir), _by_stem(mask_dir)
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
        with open_image(image) as im, open_image(mask) as m:
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
            raise self.no_images(where)
        return ds

    def no_images(self, where: Path) -> TaskvecError:
        return TaskvecError(f"{where}: no readable images ({len(self.skipped)} unreadable files skipped)")

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
        split_dirs: dict[str, Path] = {}
        for p in sorted(path.iterdir()):
            if p.is_dir() and p.name.lower() in SPLIT_ALIASES:
                name = SPLIT_ALIASES[p.name.lower()]
                if name in split_dirs:
                    raise TaskvecError(f"{path}: folders {split_dirs[name].name}/ and {p.name}/ both hold the "
                                       f"{name} split; keep one", path=path)
                split_dirs[name] = p
        if split_dirs:
            unread = sorted(p.name for p in path.iterdir() if not p.name.startswith(".") and p not in
                            split_dirs.values() and (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES))
            if unread:
                self.warnings.append(f"{path}: read as split folders ({', '.join(sorted(split_dirs))}); "
                                     f"{', '.join(unread[:3])}{' ...' if len(unread) > 3 else ''} beside them "
                                     "is not read")
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
        signs = _segmentation_signs(path, self.spec.labels)
        if signs:
            raise TaskvecError(
                f"{path}: {signs}, a segmentation layout, but the base is a classifier (task classification); "
                "give <class>/<image files>, a CSV or an npz, or a segmentation base", path=path, field="task",
            )
        return self.image_folder(path)


def _segmentation_signs(path: Path, labels: list[str]) -> str | None:
    """What makes a folder read as classification data look like segmentation data, or None: images/ with masks/
    (a labelled split), images/ alone when no class has that name (an unlabelled test split), or class folders
    that each hold images/ and masks/ (one folder per site)."""
    def paired(p: Path) -> bool:
        return (p / "images").is_dir() and (p / "masks").is_dir()

    if paired(path):
        return "holds images/ and masks/"
    if (path / "images").is_dir() and "images" not in labels:
        return "holds images/ without masks/ (an unlabelled split?)"
    sites = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name not in labels and paired(p))
    if sites:
        return f"its folder {sites[0]}/ holds images/ and masks/"
    return None


def csv_path_column(row: dict[str, str]) -> str:
    """The column holding image paths: `path`, else `image` (as in a table of image and mask paths)."""
    return next(c for c in PATH_COLUMNS if c in row)


def csv_paths(path: Path, rows: list[dict[str, str]]) -> list[Path]:
    """Each row's image file, resolved against the CSV's folder."""
    return [(path.parent / r[csv_path_column(r)]).resolve() for r in rows]


def csv_rows(path: Path) -> tuple[list[int], list[dict[str, str]]]:
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
        twice = next((c for i, c in enumerate(header) if c in header[:i]), None)
        if twice is not None:
            raise TaskvecError(f"{path}:1: column {twice!r} appears twice in the header; keep one", path=path)
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


def _array(z: Any, name: str, path: Path) -> np.ndarray:
    """Array `name` of an open npz; one that cannot be read without pickle (an object array) is refused."""
    try:
        return np.asarray(z[name])
    except (OSError, ValueError) as e:
        raise TaskvecError(f"{path}: array {name} cannot be read ({first_line(e)})", path=path) from None


def _integer(text: str) -> int | None:
    """`text` as a whole number (such as "2" or " 2"), else None."""
    try:
        return int(text)
    except ValueError:
        return None


def _id_key(text: str) -> str:
    """What two spellings of one patient id share: the number it writes (`7`, `7.0`, `007`), else its casefold."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        return text.casefold()
    return f"#{number.normalize()}" if number.is_finite() else text.casefold()


def _one_spelling_each(path: Path, lines: list[int], ids: list[str]) -> None:
    """Refuse one patient id written two ways (`7` and `7.0`, `P7` and `p7`, as spreadsheets rewrite ids): it
    would be two units of a guarantee meant for one patient."""
    first: dict[str, tuple[str, int]] = {}
    for line, pid in zip(lines, ids):
        other, at = first.setdefault(_id_key(pid), (pid, line))
        if other != pid:
            raise TaskvecError(f"{path}:{line}: patient_id {pid!r} reads as {other!r} (line {at}) written another "
                               "way; write each patient's id one way", path=path, field="patient_id")


def _split_name(value: str, where: str) -> str:
    v = value.strip().lower()
    if v not in SPLIT_ALIASES:
        raise TaskvecError(f"{where}: split {value!r} is not train, val or test")
    return SPLIT_ALIASES[v]


def _by_stem(folder: Path) -> dict[str, Path]:
    """The image files of `folder` by name without suffix (how images meet their masks); two files of one name
    (`a.png`, `a.jpg`) are refused, as either could be meant."""
    found: dict[str, Path] = {}
    for p in image_files(folder):
        stem = p.relative_to(folder).with_suffix("").as_posix()
        if stem in found:
            raise TaskvecError(f"{p}: {found[stem].name} has the same name; keep one file per image or mask")
        found[stem] = p
    return found
