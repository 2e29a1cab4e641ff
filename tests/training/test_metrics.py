"""Metrics against values computed by hand and against brute-force definitions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from taskvec.training.metrics import auroc, classification_metrics, confusion, primary_metric, segmentation_metrics


def test_binary_classification_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1))
    # predictions 0,0,0,1: one positive missed
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)  # F1 class 0: 4/5, class 1: 2/3
    assert m["auroc"] == pytest.approx(0.75)  # pairs (0.35>0.1), (0.35<0.4), (0.8>both): 3 of 4
    assert m["per_class"]["1"]["recall"] == pytest.approx(0.5)


def test_multiclass_one_vs_rest_by_hand() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.2, 0.7], [0.3, 0.4, 0.3]])
    m = classification_metrics(y, probs, ["a", "b", "c"])
    # class c: positives 0.7, 0.3 vs negatives 0.1, 0.3 -> (1 + 1 + 1 + 0.5) / 4
    assert m["per_class"]["c"]["auroc"] == pytest.approx(0.875)
    assert m["auroc"] == pytest.approx((1 + 1 + 0.875) / 3)
    assert m["accuracy"] == pytest.approx(0.75)  # predictions 0, 1, 2, 1
    assert m["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.random(60), 1)  # many ties
    pos, neg = s[y == 1], s[y == 0]
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)]
    assert auroc(y, s) == pytest.approx(np.mean(pairs))


def test_undefined_values_are_none() -> None:
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]))
    assert m["auroc"] is None
    assert primary_metric(m) == ("accuracy", 0.5)
    # a class with no samples and never predicted is left out of the macro means
    m3 = classification_metrics(np.array([0, 1]), np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]]))
    assert m3["macro_f1"] == pytest.approx(1.0)
    assert m3["per_class"]["2"]["auroc"] is None


def test_binary_segmentation_by_hand() -> None:
    true = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    pred = np.array([[0, 1, 1, 0], [0, 1, 1, 1]])
    m = segmentation_metrics(confusion(true, pred, 2))
    fg = m["per_class"]["1"]
    assert (fg["dice"], fg["jaccard"], fg["pixel_accuracy"]) == pytest.approx((8 / 10, 4 / 6, 4 / 5))
    assert m["per_class"]["0"]["dice"] == pytest.approx(4 / 6)
    assert m["dice"] == pytest.approx(0.8)  # binary: foreground only
    assert m["mean_over"].startswith("foreground")
    assert m["pixel_accuracy"] == pytest.approx(6 / 8)


def test_multiclass_segmentation_mean_over_present_classes() -> None:
    true = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    m = segmentation_metrics(confusion(true, pred, 4))
    dice = [2 / 4, 4 / 5, 2 / 3]  # class 3 absent everywhere: None, not counted
    assert m["per_class"]["3"]["dice"] is None
    assert m["dice"] == pytest.approx(np.mean(dice))
    assert m["mean_over"] == "all classes"
