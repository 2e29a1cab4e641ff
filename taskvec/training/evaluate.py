"""Evaluate any taskvec model file (a base, a fine-tuned model, a merged model) on one split of a data source."""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from taskvec.errors import ConfigError, FileFormatError, TaskvecError
from taskvec.io.files import read_header, read_kind
from taskvec.io.tensors import all_finite
from taskvec.models.spec import ModelSpec, load_model, resolve_model_path
from taskvec.progress import Track, no_track
from taskvec.training.config import check_device
from taskvec.training.data import DataSplits, ImageDataset, Normalizer, as_splits, make_loader
from taskvec.training.metrics import classification_metrics, segmentation_metrics


def resolve_device(device: str) -> torch.device:
    """`auto` is CUDA when available, else CPU; a device torch does not see is an error."""
    if check_device(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is visible to torch; use cpu or auto", field="device",
                          got=device)
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps': torch sees no Apple GPU; use cpu or auto", field="device", got=device)
    return torch.device(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision on GPU only: bf16 where supported (no loss scaling needed), else fp16."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


class NonFiniteOutputError(TaskvecError):
    """A model's outputs hold NaN or ±Inf: any score of them would be an artefact (NaN ranks as it falls)."""


@torch.no_grad()
def evaluate_module(
    model: nn.Module, spec: ModelSpec, ds: ImageDataset, *, device: torch.device | str = "cpu",
    batch_size: int = 64, num_workers: int | None = None, track: Track[Any] = no_track,
) -> dict[str, Any]:
    """Metrics of an in-memory model on a dataset (see `taskvec.training.metrics` for definitions)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    norm = Normalizer(spec, device)
    loader = make_loader(ds, batch_size, device, num_workers=num_workers)
    k = spec.num_classes
    probs, ys = [], []
    cm = torch.zeros(k * k, dtype=torch.int64, device=device)
    for x, y in track(loader, "evaluating", len(loader)):
        with autocast(device):
            logits = model(norm(x.to(device, non_blocking=True))).float()
        if not all_finite(logits):
            raise NonFiniteOutputError("the model's outputs are NaN or infinite on this data (its weights overflow "
                                       "or hold NaN), so no metric of it means anything")
        y = y.to(device, non_blocking=True)
        if spec.task == "classification":
            probs.append(logits.softmax(1).cpu())
            ys.append(y.cpu())
        else:
            cm += torch.bincount((y * k + logits.argmax(1)).reshape(-1), minlength=k * k)
    model.train(was_training)
    if spec.task == "classification":
        return classification_metrics(torch.cat(ys).numpy(), torch.cat(probs).numpy(), spec.labels)
    return segmentation_metrics(cm.reshape(k, k).cpu().numpy(), spec.labels)


@dataclass
class Evaluation:
    """What `evaluate_model` measured: the model, the data and split, and the task's metrics (keys as
    `classification_metrics` or `segmentation_metrics` return them)."""

    model: str
    identity: str
    task: str
    data: str
    split: str
    samples: int
    img_size: int
    skipped: int
    warnings: list[str]
    metrics: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """One flat record (`taskvec evaluate --json`): the fields above, then every metric."""
        d = asdict(self)
        metrics = d.pop("metrics")
        return {**d, **metrics}


def evaluate_model(
    model_path: str | os.PathLike[str], data: str | os.PathLike[str] | DataSplits | ImageDataset,
    split: str | None = None, *, device: str = "auto", batch_size: int = 64, img_size: int | None = None,
    track: Track[Any] = no_track,
) -> Evaluation:
    """Evaluate a model file (or run directory) on `split` (`train`, `val`, `test` or `all`) of `data`; by
    default the data's test split when it has one, else all of it."""
    path = resolve_model_path(model_path)
    if read_header(path).kind == "vector":
        raise FileFormatError(
            f"{path}: is a data vector (a fine-tune's change to its base), not a model; merge it onto its base "
            f"first: `taskvec merge {path} --base BASE --out merged.safetensors`, then evaluate merged.safetensors",
            path=path,
        )
    header = read_kind(path, "model")
    spec = ModelSpec.from_dict(header.model.model)
    splits = as_splits(data, spec, img_size=img_size, val_fraction=0.0)
    warnings = list(splits.warnings)
    if split is None and splits.test is None and splits.own_splits:
        warnings.append(f"{splits.source}: no test split; scored on all of it, its "
                        f"{' and '.join(s for s in ('train', 'val') if getattr(splits, s) is not None)} split "
                        "included (give `split` to choose one)")
    split = split or ("test" if splits.test is not None else "all")
    ds = splits.get(split)
    dev = resolve_device(device)
    model = load_model(path, dev)
    metrics = evaluate_module(model, spec, ds, device=dev, batch_size=batch_size, track=track)
    return Evaluation(str(path), header.model.identity, spec.task, splits.source, split, len(ds), ds.img_size,
                      len(splits.skipped), warnings, metrics)
