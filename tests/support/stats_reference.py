"""An independent computation of the statistics head: every image's pooled feature one at a time, and the ridge
head as least squares on [P f, 1] (numpy), for the stats-head and ridge-head tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from taskvec.io.files import read_kind
from taskvec.models.spec import ModelSpec, load_model
from taskvec.training.data import ImageDataset, Normalizer, load_data


def pooled_features(base: Path, data: Any) -> tuple[np.ndarray, np.ndarray]:
    """Every training image's pooled feature (float64), one image at a time, and its label."""
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    net: Any = load_model(base, "cpu").eval()
    train = data if isinstance(data, ImageDataset) else load_data(data, spec, val_fraction=0.0).train
    assert train is not None
    norm = Normalizer(spec, torch.device("cpu"))
    feats, labels = [], []
    with torch.no_grad():
        for i in range(len(train)):
            x, y = train[i]
            feats.append(net.forward_head(net.forward_features(norm(x[None])), pre_logits=True)[0].double().numpy())
            labels.append(int(y))
    return np.stack(feats), np.array(labels)


def ridge_reference(feats: np.ndarray, labels: np.ndarray, k: int, proj: np.ndarray, ridge: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of one-hot targets on [P f, 1] with penalty λ·‖A‖² (bias free), λ = ridge·Σ‖Pf‖²/p."""
    g = feats @ proj.T
    lam = ridge * float((g**2).sum()) / g.shape[1]
    x = np.hstack([g, np.ones((len(g), 1))])
    reg = np.diag([lam] * g.shape[1] + [0.0])
    coef = np.linalg.solve(x.T @ x + reg, x.T @ np.eye(k)[labels])
    return coef[:-1].T @ proj, coef[-1]
