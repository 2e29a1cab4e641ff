"""An independent computation of the statistics heads: every image's pooled feature one at a time, the LDA head
from the centred projected unit features and the ridge head as least squares on them (numpy), for the
stats-head, lda-head and ridge-head tests."""

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
    """Least squares of one-hot targets on [g, 1], g = P f/‖f‖, with penalty λ·‖A‖² (bias free),
    λ = ridge·Σ‖g‖²/p; W = AᵀP/ν."""
    g, nu = unit_projected(feats, proj)
    lam = ridge * float((g**2).sum()) / g.shape[1]
    x = np.hstack([g, np.ones((len(g), 1))])
    reg = np.diag([lam] * g.shape[1] + [0.0])
    coef = np.linalg.solve(x.T @ x + reg, x.T @ np.eye(k)[labels])
    return coef[:-1].T @ proj / nu, coef[-1]


def unit_projected(feats: np.ndarray, proj: np.ndarray) -> tuple[np.ndarray, float]:
    """g = P f/‖f‖ for every feature, and ν = exp(mean log ‖f‖)."""
    norms = np.sqrt((feats**2).sum(1))
    return np.stack([proj @ (f / n) for f, n in zip(feats, norms)]), float(np.exp(np.log(norms).mean()))


def lda_reference(feats: np.ndarray, labels: np.ndarray, k: int, proj: np.ndarray, shrink: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    """LDA on g = P f/‖f‖: class means, the pooled within-class covariance of the centred g, its eigenvalues
    floored at shrink × their mean; W = (Σ⁻¹μ)ᵀP/ν, b = −½μᵀΣ⁻¹μ + log(n_c/N)."""
    g, nu = unit_projected(feats, proj)
    means = np.stack([g[labels == c].mean(0) for c in range(k)])
    centred = g - means[labels]
    cov = centred.T @ centred / len(g)
    values, vectors = np.linalg.eigh(cov)
    inverse = vectors @ np.diag(1 / np.maximum(values, shrink * values.mean())) @ vectors.T
    prior = np.log(np.bincount(labels, minlength=k) / len(g))
    return means @ inverse @ proj / nu, np.array([-0.5 * m @ inverse @ m for m in means]) + prior


def release_noise_drawn(noisy: dict[str, np.ndarray], clear: dict[str, np.ndarray], centre: list[float]
                        ) -> dict[str, np.ndarray]:
    """The noise a centred DP release drew: the file's statistics of g (keys with or without `sufficient.`)
    taken back to those of h = g − c (S_c − n_c·c, M − c sᵀ − s cᵀ − N·c cᵀ with s = Σ_c S_c and the file's
    noised counts) minus `clear`, the un-noised statistics of h."""
    stats = {k.removeprefix("sufficient."): v for k, v in noisy.items()}
    c = np.asarray(centre)
    sums = stats["sums"] - stats["counts"][:, None] * c
    s = sums.sum(0)
    moments = stats["moments"] - np.outer(c, s) - np.outer(s, c) - stats["counts"].sum() * np.outer(c, c)
    held = {"counts": stats["counts"], "sums": sums, "moments": moments, "log_norms": stats["log_norms"]}
    return {k: held[k] - np.asarray(clear[k]) for k in held}
