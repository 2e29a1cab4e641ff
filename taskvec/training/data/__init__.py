"""Datasets a hospital has, read into one form: uint8 images at the base's channels and size, plus targets.

Layouts (detected from `path`):
- classification: an ImageFolder tree (`root/<class>/*.png`), a UTF-8 CSV `path,label[,patient_id,split]`
  (paths relative to the CSV, in a column `path` or `image`; labels are class names or indices; other columns
  are ignored), or a MedMNIST-style `.npz`
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
own id (`hold_out`), so no patient is in two splits (a patient, or an image file by any path or link, found
in two splits is an error) and adding or removing one unit never moves another: a DP guarantee for the
training set is then one for the data set the site holds. Unreadable image files are skipped and counted
(`DataSplits.skipped`); every other problem is a `TaskvecError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from taskvec.errors import MismatchError
from taskvec.models.spec import ModelSpec
from taskvec.training.data.dataset import SPLITS, DataSplits, ImageDataset
from taskvec.training.data.images import to_array
from taskvec.training.data.layouts import Reader
from taskvec.training.data.model_input import Normalizer, make_loader
from taskvec.training.data.splits import (
    check_images,
    check_patients,
    hold_out,
    hold_out_by_patient,
    in_holdout,
    split_record,
)

__all__ = ["SPLITS", "DataSplits", "ImageDataset", "Normalizer", "as_splits", "check_patients", "hold_out",
           "hold_out_by_patient", "in_holdout", "load_data", "make_loader", "split_record", "to_array"]


def load_data(
    path: str | os.PathLike[str], spec: ModelSpec, *, img_size: int | None = None,
    val_fraction: float = 0.1, seed: int = 0,
) -> DataSplits:
    """Read a data source for a model spec (its task, classes, channels and input size) into splits."""
    p = Path(path)
    reader = Reader(spec, int(img_size or spec.img_size))
    found = reader.source(p)
    own = isinstance(found, dict)
    splits = found if isinstance(found, dict) else {"train": found}
    root = str(p if p.is_dir() else p.parent)
    splits = {name: replace(ds, root=root) for name, ds in splits.items()}
    check_patients(splits, str(p))
    reader.warn_missing_classes(splits.get("train"), p)
    if "val" not in splits and "train" in splits and val_fraction > 0:
        splits["train"], val = hold_out(splits["train"], val_fraction, seed)
        if val is None:
            reader.warnings.append(f"no {splits['train'].unit} fell in the validation share ({val_fraction:g}); "
                                   "no validation metrics")
        else:
            splits["val"] = val
    check_images(splits, str(p))
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
