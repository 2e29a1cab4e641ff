"""Small synthetic medical-looking image sets, so the demo and tests run with no data and no network.

Classification: grayscale "ultrasound" frames with one blob; the blob of class 1 (`lesion`) is darker with a
rough rim, class 0 (`normal`) smooth and brighter, under speckle noise. Written as a MedMNIST-style npz,
so it goes through the same loader as real data.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from taskvec.errors import check_range
from taskvec.io.files import atomic_output

LABELS = ["normal", "lesion"]


def _frames(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    labels = rng.integers(0, 2, size=n)
    images = np.empty((n, size, size), dtype=np.uint8)
    for i, y in enumerate(labels):
        cy, cx = rng.uniform(0.3, 0.7, size=2) * size
        r = rng.uniform(0.12, 0.22) * size
        angle = np.arctan2(yy - cy, xx - cx)
        rim = r * (1 + (0.25 * np.sin(rng.integers(3, 7) * angle + rng.uniform(0, 6)) if y else 0.0))
        inside = np.hypot(yy - cy, xx - cx) < rim
        background = 0.55 + 0.1 * rng.standard_normal()
        blob = background - (0.3 if y else 0.1) + 0.05 * rng.standard_normal()
        img = np.where(inside, blob, background) * rng.gamma(4.0, 0.25, size=(size, size))  # speckle
        images[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_classification_npz(path: str | os.PathLike[str], n_train: int = 600, n_val: int = 100,
                             n_test: int = 200, size: int = 32, seed: int = 0) -> Path:
    """Write `train/val/test_images` (N, size, size) uint8 and `*_labels` (N,) to `path`."""
    check_range("size", size, low=1, low_open=False)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _frames(n, size, rng)
    with atomic_output(path, force=True) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)  # type: ignore[arg-type]
    return Path(path)
