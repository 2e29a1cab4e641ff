"""What feeds the model: normalised float batches on the device, and DataLoaders."""

from __future__ import annotations

import os

import numpy as np
import torch

from taskvec.errors import ConfigError
from taskvec.models.spec import ModelSpec
from taskvec.training.data.dataset import ImageDataset


class Normalizer:
    """uint8 batches → float inputs normalised with the architecture's pretrained mean/std (on the device)."""

    def __init__(self, spec: ModelSpec, device: torch.device | str) -> None:
        import timm

        cfg = timm.get_pretrained_cfg(spec.arch)
        mean = np.array(cfg.mean if cfg is not None else (0.485, 0.456, 0.406), dtype=np.float32)
        std = np.array(cfg.std if cfg is not None else (0.229, 0.224, 0.225), dtype=np.float32)
        if spec.in_chans != len(mean):
            mean, std = np.full(spec.in_chans, mean.mean()), np.full(spec.in_chans, std.mean())
        self.scale = torch.tensor(1.0 / (255.0 * std), dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.shift = torch.tensor(mean / std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


def make_loader(ds: ImageDataset, batch_size: int, device: torch.device, *, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False,
                num_workers: int | None = None) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    """A DataLoader: worker processes decode images when training on a GPU (none on CPU, where they would
    compete with the model for the same cores) and pinned memory feeds the GPU."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}", field="batch_size",
                          got=batch_size)
    cuda = device.type == "cuda"
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if cuda else 0
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
        num_workers=num_workers, pin_memory=cuda, persistent_workers=num_workers > 0,
    )
