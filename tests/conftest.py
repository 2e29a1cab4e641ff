"""Shared fixtures: tiny timm bases, fake fine-tunes, the shared real data (skipped when absent)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))  # tiny data, the Hub server, hostile files
SHARED_DATA = Path(os.environ.get("TASKVEC_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared_data(name: str) -> Path:
    """Path to a set in ../shared/data, or skip the test when it is absent."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"shared data {name} not available at {p}")
    return p


@pytest.fixture(autouse=True, scope="session")
def _threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _image_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Decoded-image caches of the tests' runs go to a temporary folder, not the user's."""
    os.environ["TASKVEC_CACHE"] = str(tmp_path_factory.mktemp("image-cache"))


@pytest.fixture
def make_base(tmp_path: Path) -> Callable[..., Path]:
    """Create a tiny base model file: make_base(arch='test_vit', task=..., num_classes=..., name=...)."""
    from taskvec.models.spec import build_base, save_model

    def _make(arch: str = "test_vit", task: str = "classification", num_classes: int = 3,
              in_chans: int = 3, img_size: int | None = 32, name: str = "base.safetensors",
              labels: list[str] | None = None) -> Path:
        torch.manual_seed(0)
        module, spec = build_base(arch, task, num_classes, in_chans, img_size, labels)
        path = tmp_path / name
        save_model(module, spec, path)
        return path

    return _make


@pytest.fixture
def dp_base(tmp_path: Path) -> Path:
    """A tiny DP-ready (frozen BatchNorm) 2-class grayscale EfficientNet base at 28 px."""
    from taskvec.models.spec import build_base, save_model

    torch.manual_seed(0)
    module, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=28, dp_compatible=True,
                              dp_norm="frozen-batchnorm")
    path = tmp_path / "base.safetensors"
    save_model(module, spec, path)
    return path


@pytest.fixture
def make_finetuned(tmp_path: Path) -> Callable[..., Path]:
    """A plain safetensors state_dict = base + N(0, scale²) on floating tensors (a site's own script)."""
    from safetensors.torch import load_file, save_file

    def _make(base: Path, seed: int, scale: float = 0.01, name: str | None = None) -> Path:
        g = torch.Generator().manual_seed(seed)
        sd = load_file(str(base))
        out = {
            k: (v + scale * torch.randn(v.shape, generator=g)).contiguous() if v.is_floating_point() else v
            for k, v in sd.items()
        }
        path = tmp_path / (name or f"ft{seed}.safetensors")
        save_file(out, str(path))
        return path

    return _make
