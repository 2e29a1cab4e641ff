"""One data set cut into K sites by the rules of `taskvec.simulation.splits` (`simulate --split`), and each
site's share written as data `finetune` reads (`taskvec split`).

Only the data's training split is cut (all of it when the data has no splits of its own); its val and test
splits stay whole, for the merger. A site is written as:
- `siteK.csv` (`path,label[,patient_id]`) for classification images (an image folder or a CSV): the absolute
  paths of the original files, so nothing is copied;
- `siteK.npz` (`train_images`, `train_labels`) for an npz;
- `siteK/images/` + `siteK/masks/` for segmentation, the files hard-linked where the file system allows,
  else copied, under their paths below the data's `images/` and `masks/`.
Each site lands under its final name in one rename, and `sites.json` (the rule, seed and each site's size)
is written last: a folder without it is an interrupted split.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from taskvec.errors import ConfigError, OutputExistsError, TaskvecError
from taskvec.io.files import atomic_output, write_json
from taskvec.models.spec import ModelSpec
from taskvec.simulation.splits import split_sites
from taskvec.training.data import ImageDataset, load_data
from taskvec.training.data.images import check_npz
from taskvec.training.data.layouts import SPLIT_ALIASES, csv_paths, csv_rows

SITES_FILE = "sites.json"
TCGA_SITE = re.compile(r"TCGA-([A-Z0-9]{2})-")


def group_ids(ds: ImageDataset, column: str, data: str | os.PathLike[str] | None = None) -> list[str]:
    """Group of every sample: `patient_id` (the data's patient column), `tcga` (the TCGA tissue-source site in
    file names, the two characters after `TCGA-`), or the value of any other column of the CSV `data`."""
    if column in ("patient_id", "patient"):
        if ds.groups is None:
            raise ConfigError("split by-group:patient_id needs a CSV with a patient_id column", field="split",
                              got=f"by-group:{column}")
        return list(ds.groups)
    if column == "tcga":
        out = []
        for s in ds.sources:
            m = TCGA_SITE.search(Path(str(s)).name)
            if m is None:
                raise TaskvecError(f"{s}: file name holds no TCGA-XX- tissue-source site")
            out.append(m.group(1))
        return out
    if data is None or Path(data).suffix.lower() != ".csv":
        raise ConfigError(f"split by-group:{column} needs a CSV with a {column} column (or by-group:patient_id, "
                          "by-group:tcga)", field="split", got=f"by-group:{column}")
    return _csv_column(Path(data), column, ds)


def _csv_column(path: Path, column: str, ds: ImageDataset) -> list[str]:
    """The `column` value of each sample of `ds`, read from the CSV it came from (matched by image file)."""
    lines, rows = csv_rows(path)
    if rows and column not in rows[0]:
        raise ConfigError(f"{path}: no column {column!r} to split by (it has {', '.join(rows[0])})", field="split",
                          got=f"by-group:{column}")
    by_file: dict[str, str] = {}
    for line, file, row in zip(lines, csv_paths(path, rows), rows):
        value = row[column].strip()
        if not value:
            raise TaskvecError(f"{path}:{line}: no {column}; every row needs one to split by it", path=path)
        if by_file.setdefault(str(file), value) != value:
            raise TaskvecError(f"{path}:{line}: {file.name} is listed under two values of {column}", path=path)
    return [by_file[str(s)] for s in ds.sources]


def site_indices(pool: ImageDataset, split: str, sites: int, seed: int,
                 data: str | os.PathLike[str] | None = None) -> list[np.ndarray]:
    """The samples of `pool` each site gets under `split` (`taskvec.simulation.splits.SPLIT_HELP`); `data` is the
    CSV `pool` was read from, for a split by one of its columns."""
    kind, _, arg = split.partition(":")
    labels = pool.targets if pool.task == "classification" else None
    groups = group_ids(pool, arg, data) if kind == "by-group" else None
    return split_sites(split, sites, seed, labels=labels, groups=groups, n=len(pool))


def data_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """How to read `path` when no base says: segmentation for images/ + masks/ folders (any mask values: the
    files are only passed on), else classification with the labels the data names (class folders, the CSV's
    label column, the npz's label numbers)."""
    p = Path(path)
    if p.is_dir():
        roots = [d for d in p.iterdir() if d.is_dir() and d.name.lower() in SPLIT_ALIASES] or [p]
        if any((r / "images").is_dir() and (r / "masks").is_dir() for r in roots):
            return ModelSpec("", "segmentation", 256, labels=[str(i) for i in range(256)])
        labels = sorted({c.name for r in roots for c in r.iterdir() if c.is_dir() and not c.name.startswith(".")})
    elif p.suffix.lower() == ".csv":
        labels = sorted({r.get("label", "").strip() for r in csv_rows(p)[1]} - {""})
    elif p.suffix.lower() == ".npz":
        check_npz(p)
        with np.load(p, allow_pickle=False) as z:
            top = max((int(z[k].max()) for k in z.files if k.endswith("_labels") and z[k].size), default=-1)
        labels = [str(i) for i in range(top + 1)]
    else:
        labels = ["0"]  # the reader names what is wrong with the file
    if not labels:
        raise TaskvecError(f"{p}: no class labels found in the data; read it for a base's labels "
                           f"(`taskvec split {p} --base BASE ...`)", path=p)
    return ModelSpec("", "classification", len(labels), labels=labels)


def split_into_sites(data: str | os.PathLike[str], out: str | os.PathLike[str], split: str, sites: int, seed: int,
                     spec: ModelSpec | None = None) -> dict[str, Any]:
    """Cut the training split of `data` into `sites` by `split` and write each site's share under the new (or
    empty) folder `out` (see the module docstring); return the record also written to `out/sites.json`."""
    root = Path(out)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise OutputExistsError(f"{root}: exists and is not an empty folder; choose a new `out`", path=root)
    if Path(data).is_dir() and root.resolve().is_relative_to(Path(data).resolve()):
        raise ConfigError(f"out {root} is inside the data {data}: the sites' files would become part of the data; "
                          "choose a folder outside it", field="out", got=str(root))
    spec = spec or data_spec(data)
    splits = load_data(data, spec, val_fraction=0.0, seed=seed)
    pool = splits.train
    if pool is None:
        raise TaskvecError(f"{data}: no training split to cut into sites", path=data)
    repeated = pool.repeated_image()
    if repeated is not None:
        raise TaskvecError(f"{data}: lists image {repeated} twice; sites must not share an image (give each once)",
                           path=data)
    if pool.task == "classification" and pool.array is None:  # each site's share is a UTF-8 CSV of paths
        odd = next((str(src) for src in pool.sources if _not_utf8(str(src))), None)
        if odd is not None:
            raise TaskvecError(f"{data}: file name {odd!r} is not UTF-8, which a site's CSV is; rename the file",
                               path=data)
    parts = site_indices(pool, split, sites, seed, data)
    new = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    try:
        written = [_write_site(pool.subset(idx.tolist()), root, f"site{k}", spec, Path(data))
                   for k, idx in enumerate(parts)]
    except BaseException:  # nothing half-written is left: the folder is as it was
        if new:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for p in root.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise
    left = [s for s in ("val", "test") if getattr(splits, s) is not None]
    record = {"data": str(data), "split": split, "sites": sites, "seed": seed, "task": spec.task,
              "files": written, "samples": [len(idx) for idx in parts], "unit": pool.unit,
              "not_cut": left, "warnings": splits.warnings}
    write_json(root / SITES_FILE, record)
    return record


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _write_site(ds: ImageDataset, root: Path, name: str, spec: ModelSpec, data: Path) -> str:
    """Write one site's share under `root` in one rename; return its name."""
    if ds.task == "segmentation":
        final = root / name
        tmp = root / f".{name}.partial"
        for src, mask in zip(ds.sources, ds.targets):
            for file, folder in ((Path(str(src)), "images"), (Path(mask), "masks")):
                _link(file, tmp / folder / _below(file, folder, data))
        tmp.rename(final)
        return name
    if ds.array is not None:
        final = root / f"{name}.npz"
        rows = np.asarray(ds.sources, dtype=np.int64)
        with atomic_output(final) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, train_images=ds.array[rows], train_labels=np.asarray(ds.targets, np.int64))
        return final.name
    final = root / f"{name}.csv"
    text = io.StringIO(newline="")
    w = csv.writer(text, lineterminator="\n")
    w.writerow(["path", "label", *(["patient_id"] if ds.groups is not None else [])])
    for i, src in enumerate(ds.sources):
        patient = [ds.groups[i]] if ds.groups is not None else []
        w.writerow([Path(str(src)).resolve().as_posix(), spec.labels[int(ds.targets[i])], *patient])
    with atomic_output(final) as tmp:
        tmp.write_text(text.getvalue(), encoding="utf-8")
    return final.name


def _below(file: Path, folder: str, data: Path) -> Path:
    """The path of `file` below the data's `folder` (images/ or masks/, the first below `data`): the name the
    loader pairs images and masks by, so a folder of that name further down stays part of the path."""
    parts = Path(os.path.abspath(file)).relative_to(os.path.abspath(data)).parts
    return Path(*parts[parts.index(folder) + 1:])


def _link(src: Path, dest: Path) -> None:
    """`dest` as a hard link to `src` (a copy across file systems); never onto an existing file, which may be
    a link to another of the data's own files."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(dest):
        raise TaskvecError(f"{src}: maps onto {dest}, which another file of the data already took", path=src)
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dest)

