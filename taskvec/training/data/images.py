"""Image files read safely: bounded decoding (pixel and npz expansion limits), and one conversion policy
(channels, bit depth, size) to uint8 arrays."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from taskvec.errors import TaskvecError, first_line

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp"}

# Bounded work for any input: one image decodes to at most a few hundred MB, and an npz may not expand past
# these sizes (a 1 MB npz of zeros can claim gigabytes).
MAX_IMAGE_PIXELS = 50_000_000
MAX_NPZ_ARRAY_BYTES = 8 << 30
MAX_NPZ_RATIO = 100  # decompressed / compressed, for arrays over 64 MiB


class ImageTooLargeError(TaskvecError):
    """An image whose header declares more than `MAX_IMAGE_PIXELS` pixels (refused, never skipped)."""


def open_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image lazily (header only), refusing non-regular files and images over `MAX_IMAGE_PIXELS`."""
    if not Path(path).is_file():
        raise TaskvecError(f"{path}: not a regular file", path=path)
    try:
        with warnings.catch_warnings():  # the limit below is ours: Pillow's warning under its own is noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{path}: {e}; over the {MAX_IMAGE_PIXELS:,}-pixel limit, downsample it first",
                                 path=path) from None
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise TaskvecError(f"{path}: cannot read image ({e})") from None
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLargeError(f"{path}: image of {w}x{h} pixels is over the {MAX_IMAGE_PIXELS:,}-pixel limit; "
                                 "downsample it first", path=path)
    return img


def load_pixels(path: str | os.PathLike[str], convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """`convert` applied to the image in `path`, which decodes it in full: a file that fails there (a truncated
    JPEG passes `readable`'s header check) is a TaskvecError naming it."""
    with open_image(path) as img:
        try:
            return convert(img)
        except (OSError, ValueError, SyntaxError) as e:
            raise TaskvecError(f"{path}: cannot decode image ({first_line(e)}); remove or replace the file",
                               path=path) from None


def to_array(img: Image.Image, in_chans: int, size: int) -> np.ndarray:
    """An image as uint8 `size × size × in_chans` under the module's conversion policy."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(img)
        if img.mode == "F" and not np.isfinite(a).all():
            raise ValueError("pixel values that are NaN or infinite")
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


def readable(path: Path) -> bool:
    """Open and verify an image file (header and, for PNG, every chunk's CRC) without decoding it."""
    try:
        with open_image(path) as im:
            im.verify()
        return True
    except ImageTooLargeError:
        raise
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt files
        return False


def image_files(folder: Path) -> list[Path]:
    """Regular image files under `folder` (FIFOs and devices named like images are not files to read)."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def check_npz(path: Path) -> None:
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
