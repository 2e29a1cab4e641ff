"""Membership-inference audit: how well can an attacker tell a model's training images from others?

Two attacks, both scored by ROC AUC (0.5 = guessing) and TPR at 1% FPR (the fraction of members caught
while wrongly accusing at most 1% of non-members, the number that matters for individual privacy):

- `loss`: the loss-threshold attack (Yeom et al. 2018): score = −loss(model, x).
- `calibrated`: per-example difficulty calibration (Watson et al. 2022) against a reference model that
  never saw x (the shared base the model was fine-tuned from): score = loss(base, x) − loss(model, x),
  how much fine-tuning lowered this image's loss. It removes the "easy image" confound of the loss attack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from taskvec.errors import ConfigError, MismatchError, TaskvecError
from taskvec.io.files import Fields, read_record
from taskvec.training.config import DEFAULT_DEVICE
from taskvec.training.metrics import auroc

FPR = 0.01


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = FPR) -> float:
    """Largest TPR over thresholds t (flag score > t) whose false-positive rate is at most `fpr`."""
    neg = np.sort(np.asarray(non_members, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(neg)))  # false positives we may make
    threshold = neg[allowed] if allowed < len(neg) else -np.inf
    return float(np.mean(np.asarray(members, dtype=np.float64) > threshold))


def attack_metrics(members: np.ndarray, non_members: np.ndarray) -> dict[str, float]:
    """ROC AUC and TPR at 1% FPR of scores where higher means 'member'."""
    scores = np.concatenate([members, non_members])
    labels = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    auc = auroc(labels, scores)
    if auc is None:
        raise TaskvecError("the audit needs at least one member and one non-member")
    return {"auc": auc, "tpr_at_1pct_fpr": tpr_at_fpr(members, non_members)}


@torch.no_grad()
def per_example_losses(model: nn.Module, spec: Any, ds: Any, *, device: str | torch.device = "cpu",
                       batch_size: int = 64) -> np.ndarray:
    """Cross-entropy of each example (segmentation: mean over the image's pixels), model in eval mode."""
    from taskvec.training.data import Normalizer, make_loader

    device = torch.device(device)
    model.eval()
    norm = Normalizer(spec, device)
    out = []
    for x, y in make_loader(ds, batch_size, device):
        logits = model(norm(x.to(device))).float()
        loss = nn.functional.cross_entropy(logits, y.to(device), reduction="none")
        out.append(loss.reshape(len(loss), -1).mean(1).cpu())
    return torch.cat(out).numpy().astype(np.float64)


_RUN_FIELDS: Fields = {"run_id": str, "config.val_fraction": (int, float), "config.seed": int,
                       "config.img_size": (int, type(None))}


def _members(model: Path, run_id: str | None, data: Any, split: str, spec: Any) -> Any:
    """The images the model was trained on: with the run record beside the model, its training split rebuilt
    with the run's own validation fraction and seed (a data set without split column had images held out
    for validation, which are not members) and checked against the units its `split.json` lists; else the
    `split` of the data as given."""
    from taskvec.training.data import as_splits, split_record
    from taskvec.training.run_folder import RUN_FILE, SPLIT_FILE

    record, remedy = model.parent / RUN_FILE, "give the members as data of their own"
    run = read_record(record, _RUN_FIELDS, remedy) if record.exists() else {}
    if run.get("run_id") is None or run["run_id"] != run_id:
        return as_splits(data, spec, val_fraction=0.0).get(split)
    if split not in ("train", "all"):
        raise ConfigError(f"members_split {split!r}: the model in {model.parent} was trained on its training "
                          "split only (its run record says how it was split)", field="members_split", got=split)
    cfg = run["config"]
    splits = as_splits(data, spec, img_size=cfg.get("img_size"), val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    train = splits.get("train")
    recorded = model.parent / SPLIT_FILE
    if not recorded.exists():
        raise MismatchError(f"{model.parent}: no {SPLIT_FILE}, so its training units cannot be told (an earlier "
                            "taskvec split validation another way); give the members as data of their own",
                            path=recorded)
    if split_record(train, None)["train"] != read_record(recorded, {"train": list}, remedy)["train"]:
        raise MismatchError(f"{data}: its training units are not the ones {recorded} lists; give the data the run "
                            "was trained on", path=recorded)
    return train


def audit_model(
    model_path: str | os.PathLike[str],
    members: Any,
    non_members: Any,
    *,
    members_split: str = "all",
    non_members_split: str = "all",
    reference: str | os.PathLike[str] | None = None,
    device: str = DEFAULT_DEVICE,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Run the membership-inference attacks on a model file; `members`/`non_members` are data paths
    (or datasets), `reference` the base model for the calibrated attack."""
    from taskvec.io.files import read_kind
    from taskvec.models.spec import ModelSpec, load_model, resolve_model_path
    from taskvec.training.data import as_splits
    from taskvec.training.evaluate import resolve_device

    path = resolve_model_path(model_path)
    header = read_kind(path, "model")
    spec = ModelSpec.from_dict(header.model.model)
    sets = {
        "members": _members(path, header.model.run_id, members, members_split, spec),
        "non_members": as_splits(non_members, spec, val_fraction=0.0).get(non_members_split),
    }
    device = str(resolve_device(device))
    model = load_model(path, device)
    losses = {k: per_example_losses(model, spec, ds, device=device, batch_size=batch_size) for k, ds in sets.items()}
    attacks = {"loss": attack_metrics(-losses["members"], -losses["non_members"])}
    if reference is not None:
        ref_header = read_kind(reference, "model")
        parent = header.model.parent
        if parent is not None and parent != ref_header.model.identity:
            raise MismatchError(f"{reference}: is not the base {path} was fine-tuned from ({parent[:12]})")
        ref = load_model(reference, device)
        ref_losses = {k: per_example_losses(ref, spec, ds, device=device, batch_size=batch_size)
                      for k, ds in sets.items()}
        attacks["calibrated"] = attack_metrics(ref_losses["members"] - losses["members"],
                                               ref_losses["non_members"] - losses["non_members"])
    return {
        "model": str(path),
        "members": len(sets["members"]),
        "non_members": len(sets["non_members"]),
        "mean_loss": {k: float(v.mean()) for k, v in losses.items()},
        "attacks": attacks,
        "privacy": header.model.ledger,
    }
