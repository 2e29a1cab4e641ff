"""Merge-time calibration: choose λ in `base + λ·combined` on the merger's own validation data.

For each λ of a grid the merged weights are built in memory, BatchNorm running statistics (when the model
has BatchNorm) are re-estimated on the validation images, and the model is evaluated; the λ with the best
primary metric (AUROC, else accuracy; mean Dice for segmentation) wins, ties going to the λ nearest the one
asked for. The chosen model keeps the statistics estimated for it. The score is measured on the data λ was
chosen on, so it is optimistic: evaluate the merged model on held-out data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from taskvec.errors import TaskvecError
from taskvec.io.files import Header
from taskvec.io.layout import is_statistic
from taskvec.merging.stream import Accumulator
from taskvec.models.spec import ModelSpec, create_module
from taskvec.progress import Track, no_track
from taskvec.training.data import DataSplits, ImageDataset, Normalizer, as_splits, make_loader
from taskvec.training.evaluate import evaluate_module, resolve_device
from taskvec.training.metrics import primary_metric

DEFAULT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def reestimate_batchnorm(model: nn.Module, spec: ModelSpec, ds: ImageDataset, device: torch.device,
                         batch_size: int = 64) -> None:
    """Replace BatchNorm running statistics by their average over `ds` (torch's `update_bn`)."""
    norm = Normalizer(spec, device)
    loader = make_loader(ds, batch_size, device)

    def inputs() -> Iterator[torch.Tensor]:
        for x, _ in loader:
            yield norm(x.to(device, non_blocking=True))

    was_training = model.training
    torch.optim.swa_utils.update_bn(inputs(), model)
    model.train(was_training)


@dataclass
class Calibrator:
    """A `merge_vectors(calibrate=...)` hook: grid-search λ on `data`; `record` holds the grid afterwards.

    `data` is used whole, or its own `val` split when it has one.
    """

    data: str | os.PathLike[str] | DataSplits | ImageDataset
    grid: Sequence[float] = DEFAULT_GRID
    prefer: float = 1.0
    device: str = "auto"
    batch_size: int = 64
    track: Track[Any] = no_track
    record: dict[str, Any] = field(default_factory=dict)

    def __call__(self, base: Header, acc: Accumulator) -> tuple[float, dict[str, Any]]:
        if not self.grid:
            raise TaskvecError("the calibration grid is empty")
        spec = ModelSpec.from_dict(base.meta["model"])
        splits = as_splits(self.data, spec, val_fraction=0.0)
        ds = splits.val if splits.val is not None else splits.get("all")
        device = resolve_device(self.device)
        model = create_module(spec).to(device)
        base_state = load_file(str(base.path))
        stats = {k: acc.stats[k] / acc.stat_counts[k] for k in acc.stats}
        bn = has_batchnorm(model)

        def build(scale: float) -> None:
            state: dict[str, torch.Tensor] = {}
            for k, b in base_state.items():
                if k in acc.deltas:
                    state[k] = (b.to(torch.float32) + scale * acc.deltas[k]).to(b.dtype)
                else:
                    state[k] = stats[k].to(b.dtype) if k in stats else b
            model.load_state_dict(state, strict=True)
            if bn:
                reestimate_batchnorm(model, spec, ds, device, self.batch_size)

        rows: list[dict[str, Any]] = []
        for scale in self.track(self.grid, "calibrating λ", len(self.grid)):
            build(float(scale))
            metrics = evaluate_module(model, spec, ds, device=device, batch_size=self.batch_size)
            name, value = primary_metric(metrics)
            rows.append({"scale": float(scale), "metric": name, "value": value,
                         **{k: metrics[k] for k in ("accuracy", "auroc", "dice", "jaccard") if k in metrics}})
        scored = [r for r in rows if r["value"] is not None]
        if not scored:
            raise TaskvecError(f"{splits.source}: no metric is defined on this data (e.g. a single class)")
        best = max(scored, key=lambda r: (r["value"], -abs(r["scale"] - self.prefer)))
        if bn:
            build(best["scale"])
            for name, t in model.state_dict().items():
                if is_statistic(name):
                    acc.stats[name] = t.detach().to("cpu", torch.float32)
                    acc.stat_counts[name] = 1
        self.record = {"data": splits.source, "samples": len(ds), "metric": best["metric"], "grid": rows,
                       "chosen": best["scale"], "batchnorm_reestimated": bn,
                       "note": "scores are on the calibration data itself (optimistic)"}
        return best["scale"], self.record
