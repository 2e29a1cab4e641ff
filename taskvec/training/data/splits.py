"""Splitting: a site's validation units by a keyed hash of their own ids (`hold_out`), the drawn hold-out of
experiments (`hold_out_by_patient`), the record of a run's units (`split_record`), and the checks that no
patient and no image is in two splits."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from taskvec.errors import TaskvecError, check_range
from taskvec.training.data.dataset import SPLITS, ImageDataset


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
    digest = hashlib.sha256(f"taskvec-holdout\0{seed}\0{key}".encode("utf-8", "surrogateescape")).digest()
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


def check_images(splits: dict[str, ImageDataset], where: str) -> None:
    """Refuse splits that share an image file (by any path or link): the model would be validated or tested
    on images it trained on; and a classification image listed under two labels."""
    seen: dict[Any, tuple[str, str, Any]] = {}
    order = {name: i for i, name in enumerate(SPLITS)}
    for name, ds in sorted(splits.items(), key=lambda item: order.get(item[0], len(SPLITS))):
        if ds.array is not None:  # npz rows: each split is its own array
            continue
        labels = ds.targets if ds.task == "classification" else [None] * len(ds)
        for key, image, label in zip(ds.image_keys(), ds.image_ids(), labels):
            if key not in seen:
                seen[key] = (name, image, label)
                continue
            first, other, before = seen[key]
            also = "" if other == image else f" (also as {image})"
            if first != name:
                raise TaskvecError(f"{where}: image {other} is in both the {first} and {name} splits{also}; an "
                                   "image belongs to one split: remove the copy, or give its copies one patient id")
            if label != before:
                raise TaskvecError(f"{where}: image {other} is listed with two labels{also}, classes {before} and "
                                   f"{label}; keep the row with its right label")


def check_patients(splits: dict[str, ImageDataset], where: str) -> None:
    """Refuse data whose own splits share a patient."""
    seen: dict[str, str] = {}
    for name, ds in splits.items():
        for g in set(ds.groups or []):
            if g in seen and seen[g] != name:
                raise TaskvecError(f"{where}: patient {g!r} is in both the {seen[g]} and {name} splits; "
                                   "a patient's images must stay in one split")
            seen[g] = name
