"""Generated image data for the fine-tuning tests: learnable, rotation-invariant, tiny."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def blob_image(rng: np.random.Generator, size: int, positive: bool, channels: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Noise, plus a bright square when `positive`; returns (image uint8, mask 0/255)."""
    shape = (size, size) if channels == 1 else (size, size, channels)
    img = rng.integers(0, 90, shape, dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    if positive:
        s = size // 3
        y, x = rng.integers(1, size - s - 1, 2)
        img[y:y + s, x:x + s] = 230
        mask[y:y + s, x:x + s] = 255
    return img, mask


def image_folder(root: Path, n_per_class: int = 24, size: int = 36, labels: tuple[str, str] = ("0", "1"),
                 seed: int = 0) -> Path:
    """`root/<label>/*.png`: class 1 images hold a bright square, class 0 images do not."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(labels):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(blob_image(rng, size, c == 1)[0]).save(root / name / f"{i}.png")
    return root


def npz_file(path: Path, n: int = 64, size: int = 28, seed: int = 0, label_shape: str = "(N,)") -> Path:
    """A MedMNIST-style npz with train/val/test splits of the same task."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, m in (("train", n), ("val", n // 4), ("test", n // 2)):
        labels = np.arange(m) % 2
        arrays[f"{split}_images"] = np.stack([blob_image(rng, size, bool(y))[0] for y in labels])
        y = labels.astype(np.uint8)
        arrays[f"{split}_labels"] = y[:, None] if label_shape == "(N,1)" else y
    np.savez(path, **arrays)
    return path


def seg_folder(root: Path, n: int = 16, size: int = 40, seed: int = 0) -> Path:
    """`root/images/*.png` (RGB) + `root/masks/*.png` (0/255): segment the bright square."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img, mask = blob_image(rng, size, True, channels=3)
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"s{i}.png")
    return root
