"""Metrics papers report, on numpy arrays.

Classification (from true labels and class probabilities): accuracy; balanced accuracy (mean recall over the
classes present in the labels); macro-F1 (mean F1 over classes present in the labels or the predictions);
AUROC: binary on the probability of class 1, else the macro mean of one-vs-rest AUROCs over classes that
have both positives and negatives (rank statistic with ties counted half). Undefined values are None.

Segmentation (from a pixel confusion matrix summed over the whole split, so every pixel counts once):
per class Dice 2TP/(2TP+FP+FN), Jaccard TP/(TP+FP+FN) and pixel accuracy TP/(TP+FN) (the class's recall),
plus overall pixel accuracy. Means: **foreground only (class 1) for binary tasks**, the mean over all classes
otherwise; `mean_over` in the result says which. A class absent from both truth and prediction has no Dice
(None) and is left out of the mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _div(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """`C[t, p]` = count of samples (or pixels) of true class t predicted as p."""
    t = np.asarray(y_true, dtype=np.int64).ravel()
    p = np.asarray(y_pred, dtype=np.int64).ravel()
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def auroc(y_true: np.ndarray, score: np.ndarray) -> float | None:
    """Binary AUROC of `score` for `y_true` in {0, 1}: P(score⁺ > score⁻) + ½·P(tie); None with one class."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks (1-based) over runs of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str] | None = None) -> dict[str, Any]:
    """Metrics for labels `(N,)` and class probabilities `(N, K)`."""
    y = np.asarray(y_true, dtype=np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    k = probs.shape[1]
    pred = probs.argmax(1)
    cm = confusion(y, pred, k)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    recall = [_div(tp[c], support[c]) for c in range(k)]
    precision = [_div(tp[c], predicted[c]) for c in range(k)]
    f1 = [_div(2 * tp[c], support[c] + predicted[c]) for c in range(k)]
    present = [c for c in range(k) if support[c] > 0]
    seen = [c for c in range(k) if support[c] > 0 or predicted[c] > 0]
    if k == 2:
        auc = auroc(y == 1, probs[:, 1])
        per_auc: list[float | None] = [auc, auc]
    else:
        per_auc = [auroc(y == c, probs[:, c]) for c in range(k)]
        auc = _mean(per_auc)
    names = labels or [str(c) for c in range(k)]
    return {
        "n": int(len(y)),
        "accuracy": _div(tp.sum(), len(y)),
        "balanced_accuracy": _mean([recall[c] for c in present]),
        "macro_f1": _mean([f1[c] for c in seen]),
        "auroc": auc,
        "per_class": {
            names[c]: {"support": int(support[c]), "precision": precision[c], "recall": recall[c], "f1": f1[c],
                       "auroc": per_auc[c]}
            for c in range(k)
        },
    }


def segmentation_metrics(cm: np.ndarray, labels: list[str] | None = None) -> dict[str, Any]:
    """Metrics from a pixel confusion matrix `C[true, pred]` (K×K, background = class 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    tp = np.diag(cm)
    fn, fp = cm.sum(1) - tp, cm.sum(0) - tp
    dice = [_div(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]) for c in range(k)]
    jac = [_div(tp[c], tp[c] + fp[c] + fn[c]) for c in range(k)]
    acc = [_div(tp[c], tp[c] + fn[c]) for c in range(k)]
    classes = [1] if k == 2 else list(range(k))
    names = labels or [str(c) for c in range(k)]
    return {
        "pixels": int(cm.sum()),
        "dice": _mean([dice[c] for c in classes]),
        "jaccard": _mean([jac[c] for c in classes]),
        "pixel_accuracy": _div(tp.sum(), cm.sum()),
        "class_pixel_accuracy": _mean([acc[c] for c in classes]),
        "mean_over": "foreground (class 1)" if k == 2 else "all classes",
        "per_class": {names[c]: {"dice": dice[c], "jaccard": jac[c], "pixel_accuracy": acc[c],
                                 "pixels": int(cm[c].sum())} for c in range(k)},
    }


def primary_metric(metrics: dict[str, Any]) -> tuple[str, float | None]:
    """The number to select by: AUROC (else accuracy) for classification, mean Dice for segmentation."""
    if "dice" in metrics:
        return "dice", metrics["dice"]
    if metrics.get("auroc") is not None:
        return "auroc", metrics["auroc"]
    return "accuracy", metrics.get("accuracy")
