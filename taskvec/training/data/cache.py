"""Decoded images kept on disk: each image file of a split decoded and resized once into a memory-mapped uint8
array (masks into an int32 one), so later epochs and later runs read arrays instead of decoding files.

A cache entry is a folder named by a hash of what its arrays depend on: the conversion and layout (task,
channels, size, `POLICY`; images are stored C × S × S, so a batch stacks contiguous rows) and every source's
image id, byte size and modification time (masks' too), in order. A changed, added or removed file changes the
name, so a stale entry is never read; it is rebuilt beside the old one.
An entry is built under a temporary name and renamed when complete (no partial entry is ever read), under a
file lock, so processes of one run (torchrun) build it once; one that does not hold every source at the data's
size and channels when opened is removed and rebuilt. The folders are created readable by their owner
alone: they hold the site's images, as sensitive as the data itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from taskvec.progress import Track, no_track
from taskvec.training.data.dataset import DataSplits, DecodedImages, ImageDataset

POLICY = 2  # the version of the entries' layout and of the conversion (taskvec.training.data.images)
ENV = "TASKVEC_CACHE"
AUTO = "auto"  # the default folder: $TASKVEC_CACHE, else $XDG_CACHE_HOME/taskvec/images, else ~/.cache/...
OFF = "off"
SPARE_BYTES = 1 << 30  # an entry is built only when the disk keeps this much free after it


def cache_root(setting: str) -> Path | None:
    """The folder of the cache entries for `setting` (AUTO, OFF or a folder), None when off."""
    if setting == OFF:
        return None
    if setting != AUTO:
        return Path(setting).expanduser()
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "taskvec" / "images"


def entry_key(ds: ImageDataset) -> str:
    """The entry's name: a hash of the conversion and of each source's (and mask's) id, size and mtime."""
    digest = hashlib.sha256(json.dumps([POLICY, ds.task, ds.in_chans, ds.img_size]).encode())
    files = ds.sources if ds.task == "classification" else [*ds.sources, *ds.targets]
    for f in files:
        st = os.stat(str(f))
        digest.update(json.dumps([str(Path(str(f)).resolve()), st.st_size, st.st_mtime_ns]).encode())
    return digest.hexdigest()[:32]


def cacheable(ds: ImageDataset) -> bool:
    """Whether `ds` reads image files that the cache can hold (in-memory arrays are read directly)."""
    return len(ds) > 0 and ds.array is None and all(isinstance(s, str) for s in ds.sources)


def cached(ds: ImageDataset, root: Path, track: Track[Any] = no_track) -> ImageDataset:
    """`ds` reading its images (and masks) from the cache entry for it under `root`, built first when absent;
    `ds` unchanged when it already reads from one, or when the disk has no room for the entry."""
    if ds.decoded is not None and all(s in ds.decoded.rows for s in ds.sources):
        return ds
    folder = root / entry_key(ds)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    with FileLock(str(root / f".{folder.name}.lock")):
        entry = _reopen(folder, ds)
        if entry is None:
            for stale in root.glob(f".{folder.name}-*"):  # a build killed before its cleanup (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            if not _room_for(ds, root):
                return ds
            _build(ds, folder, track)
            entry = DecodedImages.open(folder)
    return replace(ds, decoded=entry)


def _reopen(folder: Path, ds: ImageDataset) -> DecodedImages | None:
    """The entry in `folder` when it holds every source of `ds` at its size and channels; None when it is absent,
    and removed (to be rebuilt) when it does not."""
    if not folder.exists():
        return None
    try:
        entry = DecodedImages.open(folder)
        if entry.images.shape[1:] == (ds.in_chans, ds.img_size, ds.img_size) and all(
                s in entry.rows for s in ds.sources) and (entry.masks is not None) == (ds.task == "segmentation"):
            return entry
    except (OSError, ValueError, RecursionError):  # unreadable or not what the cache writes: rebuilt
        pass
    shutil.rmtree(folder, ignore_errors=True)
    return None


def cached_splits(splits: DataSplits, setting: str, track: Track[Any] = no_track) -> DataSplits:
    """Each split of `splits` that reads image files, reading them from the cache (`setting`: AUTO, OFF or a
    folder); unchanged when the cache is off."""
    root = cache_root(setting)
    if root is None:
        return splits

    def one(ds: ImageDataset | None) -> ImageDataset | None:
        return cached(ds, root, track) if ds is not None and cacheable(ds) else ds

    return replace(splits, train=one(splits.train), val=one(splits.val), test=one(splits.test))


def _room_for(ds: ImageDataset, root: Path) -> bool:
    size = len(ds) * ds.img_size ** 2 * (ds.in_chans + (4 if ds.task == "segmentation" else 0))
    return shutil.disk_usage(root).free > size + SPARE_BYTES


def _build(ds: ImageDataset, folder: Path, track: Track[Any]) -> None:
    """Decode every image (and mask) of `ds` in threads into a new entry, renamed to `folder` when complete."""
    s, n = ds.img_size, len(ds)
    plain = replace(ds, decoded=None, binary_masks=None)  # masks as stored: the flags apply when read
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, ds.in_chans, s, s))
        masks = (np.lib.format.open_memmap(tmp / "masks.npy", "w+", np.int32, (n, s, s))
                 if ds.task == "segmentation" else None)

        def decode(i: int) -> None:
            x, y = plain[i]
            images[i] = x.numpy()
            if masks is not None:
                masks[i] = y.numpy()

        with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for _ in track(pool.map(decode, range(n)), "decoding images into the cache", n):
                pass
        for array in (images, masks):
            if array is not None:
                array.flush()
        (tmp / "sources.json").write_text(json.dumps([str(src) for src in ds.sources]))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
