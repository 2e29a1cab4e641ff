"""Every merge method against a hand-computed reference on small tensors."""

from __future__ import annotations

import pytest
import torch

from taskvec.errors import TaskvecError
from taskvec.merging.methods import MERGE_METHODS, dare_drop, trim_top

A = torch.tensor([1.0, -2.0, 3.0, 0.5])
B = torch.tensor([-1.0, -1.0, 1.0, 4.0])
C = torch.tensor([2.0, 1.0, -6.0, 0.0])


def test_sum_mean_weighted() -> None:
    assert torch.equal(MERGE_METHODS["sum"].combine([A, B, C]), torch.tensor([2.0, -2.0, -2.0, 4.5]))
    assert torch.allclose(MERGE_METHODS["mean"].combine([A, B, C]), torch.tensor([2 / 3, -2 / 3, -2 / 3, 1.5]))
    # weights 1:2:1 → (A + 2B + C) / 4
    got = MERGE_METHODS["weighted"].combine([A, B, C], samples=[10, 20, 10])
    assert torch.allclose(got, torch.tensor([(1 - 2 + 2) / 4, (-2 - 2 + 1) / 4, (3 + 2 - 6) / 4, (0.5 + 8) / 4]))


def test_weighted_needs_samples() -> None:
    with pytest.raises(TaskvecError, match="`samples`"):
        MERGE_METHODS["weighted"].combine([A, B], samples=[3, None])


def test_ties_by_hand() -> None:
    b = torch.tensor([-1.0, -0.5, 1.5, 4.0])
    # density 0.5 keeps the 2 largest |x| of each: A→[0,-2,3,0], b→[0,0,1.5,4], C→[2,0,-6,0].
    # Summed mass [2,-2,-1.5,4] elects signs [+,-,-,+]. Agreeing entries: pos0 {C:2} → 2; pos1 {A:-2} → -2;
    # pos2 {C:-6} (A's 3 and b's 1.5 disagree) → -6; pos3 {b:4} → 4.
    got = MERGE_METHODS["ties"].combine([A, b, C], density=0.5)
    assert torch.equal(got, torch.tensor([2.0, -2.0, -6.0, 4.0]))


def test_ties_full_density_is_disjoint_mean() -> None:
    # Signs of sums: [2,-2,-2,4.5] → [+,-,-,+]; pos0 agree {A:1, C:2} → 1.5; pos1 {A:-2, B:-1} → -1.5;
    # pos2 {C:-6} → -6; pos3 {A:0.5, B:4} (C is 0: excluded) → 2.25
    got = MERGE_METHODS["ties"].combine([A, B, C], density=1.0)
    assert torch.allclose(got, torch.tensor([1.5, -1.5, -6.0, 2.25]))


def test_trim_top_keeps_largest() -> None:
    assert torch.equal(trim_top(torch.tensor([0.1, -5.0, 2.0, -0.3]), 0.5), torch.tensor([0.0, -5.0, 2.0, 0.0]))


def test_dare_is_seeded_unbiased_and_rescaled() -> None:
    t = torch.ones(200_000)
    d1, d2 = dare_drop(t, 0.3, seed=7), dare_drop(t, 0.3, seed=7)
    assert torch.equal(d1, d2)
    kept = d1 != 0
    assert torch.allclose(d1[kept], torch.full_like(d1[kept], 1 / 0.3))
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert abs(d1.mean().item() - 1.0) < 0.02  # E[drop(t)] = t
    assert not torch.equal(d1, dare_drop(t, 0.3, seed=8))


def test_dare_method_sums_dropped_vectors() -> None:
    seeds = [11, 12, 13]
    got = MERGE_METHODS["dare"].combine([A, B, C], density=0.5, seeds=seeds)
    want = sum(dare_drop(t, 0.5, s) for t, s in zip([A, B, C], seeds))
    assert torch.equal(got, want)
