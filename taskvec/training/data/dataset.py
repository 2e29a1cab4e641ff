"""The samples of a split (`ImageDataset`: uint8 images, targets, patient ids) and the splits of one data
source (`DataSplits`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from taskvec.errors import ConfigError, TaskvecError
from taskvec.training.data.images import load_pixels, to_array

SPLITS = ("train", "val", "test")
Source = str | int  # a file path, or a row of an in-memory array


def file_key(path: str) -> tuple[int, int] | str:
    """A file's identity: (device, inode) of what the path leads to, or its resolved path where it cannot be
    read."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return st.st_dev, st.st_ino


@dataclass(eq=False)
class DecodedImages:
    """One cache entry opened read-only: row `rows[source]` of `images` (N × C × S × S uint8) is that
    source's converted image, of `masks` (N × S × S int32, segmentation) its resized mask. Pickled as its
    folder: another process maps the files again, or, where the folder is not (another machine), reads the
    images from their files."""

    folder: Path
    rows: dict[str, int]
    images: np.ndarray = field(repr=False)
    masks: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def open(cls, folder: Path) -> DecodedImages:
        sources = json.loads((folder / "sources.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        masks = np.load(folder / "masks.npy", mmap_mode="r") if (folder / "masks.npy").exists() else None
        if not (isinstance(sources, list) and all(isinstance(x, str) for x in sources)):
            raise OSError(f"{folder}: sources.json is not a list of file names")
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] != len(sources) or (
                masks is not None and (masks.dtype != np.int32 or masks.shape[0] != len(sources))):
            raise OSError(f"{folder}: arrays and sources.json disagree")
        return cls(folder, {s: i for i, s in enumerate(sources)}, images, masks)

    @classmethod
    def reopen(cls, folder: Path) -> DecodedImages | None:
        return cls.open(folder) if (folder / "sources.json").exists() else None

    def __reduce__(self) -> tuple[Any, ...]:
        return DecodedImages.reopen, (self.folder,)


@dataclass(eq=False)
class ImageDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Samples of one split: `dataset[i]` is `(uint8 tensor C×S×S, label int | int64 mask S×S)`.

    `groups` holds per-sample patient ids when the data gives them (None otherwise); `subset(indices)`
    makes a site's share for simulations. `root` is the data root that image ids are relative to, and
    `array_name` the npz array that row numbers index. `decoded` holds images (and masks) already converted
    (`taskvec.training.data.cache`): a source found there is read from it, any other from its file.
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
    decoded: DecodedImages | None = field(default=None, repr=False)

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

    def image_keys(self) -> list[Any]:
        """What makes each sample's image the same as another's: its npz row, or its file (device and inode,
        so two paths, a symbolic link and a hard link to one file are one image)."""
        return [src if isinstance(src, int) else file_key(src) for src in self.sources]

    def repeated_image(self, across_units: bool = False) -> str | None:
        """An image this data set lists more than once (the same npz row, or the same file by two paths or a
        link), named by its ids, if there is one; with `across_units`, only one that two units list (under
        the patient unit, one image under two patient ids)."""
        seen: dict[Any, tuple[str, str | None]] = {}
        patients = self.groups if across_units and self.groups is not None else [None] * len(self)
        for key, name, unit in zip(self.image_keys(), self.image_ids(), patients):
            if key in seen and (unit is None or seen[key][1] != unit):
                first = seen[key][0]
                return first if first == name else f"{first} (also as {name})"
            seen.setdefault(key, (name, unit))
        return None

    def unit_ids(self) -> list[str]:
        """Each image's unit: its patient id, or its image id."""
        return list(self.groups) if self.groups is not None else self.image_ids()

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        src = self.sources[i]
        cache = self.decoded
        row = cache.rows.get(src) if cache is not None and isinstance(src, str) else None
        if cache is not None and row is not None:
            x = torch.from_numpy(np.array(cache.images[row]))  # stored C×S×S
        else:
            if isinstance(src, int) and self.array is not None:
                a = self.array[src]
                if a.shape[:2] == (self.img_size, self.img_size) and a.size == self.img_size ** 2 * self.in_chans:
                    a = a.reshape(self.img_size, self.img_size, self.in_chans)  # already in shape: no PIL
                else:
                    a = to_array(Image.fromarray(a), self.in_chans, self.img_size)
            else:
                a = load_pixels(str(src), lambda img: to_array(img, self.in_chans, self.img_size))
            x = torch.from_numpy(np.array(a.transpose(2, 0, 1), order="C"))  # an own contiguous copy: stacks fast
        if self.task == "classification":
            return x, int(self.targets[i])
        if cache is not None and row is not None and cache.masks is not None:
            mask = np.array(cache.masks[row])
        else:
            size = (self.img_size, self.img_size)
            mask = load_pixels(self.targets[i], lambda img: np.asarray(img.resize(size, Image.Resampling.NEAREST)))
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
        """Both data sets' samples; rows of two different npz arrays index one array that stacks them."""
        array, name, theirs = self.array, self.array_name, other.sources
        if self.array is not other.array:
            if self.array is None or other.array is None:
                raise TaskvecError("cannot join image files and npz rows in one data set")
            array, name = np.concatenate([self.array, other.array]), f"{self.array_name}+{other.array_name}"
            theirs = [int(i) + len(self.array) for i in other.sources]
        g = self.groups + other.groups if self.groups is not None and other.groups is not None else None
        b = (self.binary_masks or [False] * len(self)) + (other.binary_masks or [False] * len(other))
        return replace(self, sources=self.sources + theirs, targets=self.targets + other.targets, array=array,
                       array_name=name, groups=g, binary_masks=b if self.task == "segmentation" else None)


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
