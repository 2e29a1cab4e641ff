"""Site splits: disjoint, complete, seeded; Dirichlet skew follows alpha; groups never straddle sites."""

from __future__ import annotations

import numpy as np
import pytest

from taskvec.errors import TaskvecError
from taskvec.simulation.splits import split_by_group, split_dirichlet, split_iid, split_sites


def _assert_partition(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n and len(np.unique(allidx)) == n, "sites must be disjoint and cover every sample"
    assert all(len(p) > 0 for p in parts)


def test_iid_is_a_balanced_seeded_partition() -> None:
    parts = split_iid(103, 4, seed=0)
    _assert_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_iid(103, 4, seed=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_iid(103, 4, seed=1)))


def test_iid_keeps_class_balance_roughly() -> None:
    y = np.repeat([0, 1], [3000, 1000])
    for p in split_iid(len(y), 4, seed=2):
        assert abs(y[p].mean() - 0.25) < 0.05


def _skew(parts: list[np.ndarray], y: np.ndarray) -> float:
    """Mean total-variation distance between each site's class mix and the global one."""
    glob = np.bincount(y) / len(y)
    return float(np.mean([0.5 * np.abs(np.bincount(y[p], minlength=len(glob)) / len(p) - glob).sum() for p in parts]))


def test_dirichlet_partitions_and_skews_with_small_alpha() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=2000)
    low, high = split_dirichlet(y, 5, 0.1, seed=0), split_dirichlet(y, 5, 100.0, seed=0)
    _assert_partition(low, 2000)
    _assert_partition(high, 2000)
    assert _skew(low, y) > 0.3 > 0.05 > _skew(high, y)


def test_by_group_keeps_groups_whole_and_balances() -> None:
    groups = ["A"] * 50 + ["B"] * 40 + ["C"] * 30 + ["D"] * 20 + ["E"] * 10
    parts = split_by_group(groups, 3)
    _assert_partition(parts, 150)
    g = np.array(groups)
    site_of = {}
    for s, p in enumerate(parts):
        for name in set(g[p]):
            assert name not in site_of, "a group straddles two sites"
            site_of[name] = s
    assert sorted(len(p) for p in parts) == [50, 50, 50]  # A | B+E | C+D


def test_bad_specs() -> None:
    with pytest.raises(TaskvecError, match="sites must be at most the 2 groups"):
        split_by_group(["a", "b", "a"], 3)
    for sites in (0, -2):  # was an argmin of an empty sequence
        with pytest.raises(TaskvecError, match="^sites must be >= 1"):
            split_by_group(["a", "b", "a"], sites)
    with pytest.raises(TaskvecError, match="class labels"):
        split_sites("dirichlet:0.5", 2, 0, n=10)
    with pytest.raises(TaskvecError, match="split must be iid"):
        split_sites("random", 2, 0, n=10)
    with pytest.raises(TaskvecError, match="cannot be split"):
        split_iid(2, 3, 0)
