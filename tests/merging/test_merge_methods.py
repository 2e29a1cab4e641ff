"""Every merge method against a hand-computed reference on small tensors; the registry's parameter checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from taskvec.errors import ConfigError, TaskvecError
from taskvec.merging.methods import (
    MERGE_METHODS,
    Param,
    Sparsify,
    combine,
    get_method,
    kept_below,
    median,
    merge_method,
    sign_election,
    trimmed_mean,
    uniform,
)

A = np.array([1.0, -2.0, 3.0, 0.5])
B = np.array([-1.0, -1.0, 1.0, 4.0])
C = np.array([2.0, 1.0, -6.0, 0.0])


def close(got: np.ndarray, want: list[float]) -> None:
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6, atol=1e-7)


def test_sum_mean_weighted() -> None:
    close(combine("sum", [A, B, C]), [2.0, -2.0, -2.0, 4.5])
    close(combine("mean", [A, B, C]), [2 / 3, -2 / 3, -2 / 3, 1.5])
    # weights 1:2:1 → (A + 2B + C) / 4
    close(combine("weighted", [A, B, C], samples=[10, 20, 10]),
          [(1 - 2 + 2) / 4, (-2 - 2 + 1) / 4, (3 + 2 - 6) / 4, (0.5 + 8) / 4])


def test_weighted_needs_samples() -> None:
    with pytest.raises(TaskvecError, match="vector 1: has no sample count"):
        combine("weighted", [A, B], samples=[3, None])


def test_ties_by_hand() -> None:
    b = np.array([-1.0, -0.5, 1.5, 4.0])
    # density 0.5 keeps the 2 largest |x| of each: A→[0,-2,3,0], b→[0,0,1.5,4], C→[2,0,-6,0].
    # Summed mass [2,-2,-1.5,4] elects signs [+,-,-,+]. Agreeing entries: pos0 {C:2} → 2; pos1 {A:-2} → -2;
    # pos2 {C:-6} (A's 3 and b's 1.5 disagree) → -6; pos3 {b:4} → 4.
    close(combine("ties", [A, b, C], {"density": 0.5}), [2.0, -2.0, -6.0, 4.0])


def test_ties_full_density_is_disjoint_mean() -> None:
    # Signs of sums: [2,-2,-2,4.5] → [+,-,-,+]; pos0 agree {A:1, C:2} → 1.5; pos1 {A:-2, B:-1} → -1.5;
    # pos2 {C:-6} → -6; pos3 {A:0.5, B:4} (C is 0: excluded) → 2.25
    close(combine("ties", [A, B, C], {"density": 1.0}), [1.5, -1.5, -6.0, 2.25])


def test_ties_zero_mass_elects_the_majority_sign() -> None:
    # column 0: 3 − 1 − 2 = 0 exactly; two of three non-zero entries are negative → mean of {-1, -2} = -1.5
    # column 1: 1 − 1 = 0 and one vote each way (the third is 0): no sign wins → 0
    x = [np.array([3.0, 1.0]), np.array([-1.0, -1.0]), np.array([-2.0, 0.0])]
    close(combine("ties", x, {"density": 1.0}), [-1.5, 0.0])
    close(sign_election(np.stack(x), np.ones(3)), [-1.5, 0.0])


def test_magnitude_trim_keeps_largest() -> None:
    t = np.array([0.1, -5.0, 2.0, -0.3], dtype=np.float32)
    sp = Sparsify("magnitude", 0.5)
    close(sp.whole(t[None], [0])[0], [0.0, -5.0, 2.0, 0.0])


def test_breadcrumbs_by_hand() -> None:
    t = np.array([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9, -1.0])
    # gamma 0.1 of 10 drops the single largest |x| (-1.0); density 0.5 keeps the next 5: 0.9 -0.8 0.7 -0.6 0.5
    masked = [0, 0, 0, 0, 0.5, -0.6, 0.7, -0.8, 0.9, 0]
    close(combine("breadcrumbs", [t, 2 * t], {"density": 0.5, "gamma": 0.1}), [3 * v for v in masked])


def test_uniform_is_counter_based() -> None:
    whole = uniform(123, 0, 100_000)
    np.testing.assert_array_equal(uniform(123, 500, 40), whole[500:540])  # a chunk draws what the whole draws
    assert abs(whole.mean() - 0.5) < 0.005 and whole.min() >= 0 and whole.max() < 1
    assert not np.array_equal(whole[:100], uniform(124, 0, 100))


def test_dare_is_seeded_unbiased_and_rescaled() -> None:
    t = np.ones(200_000, dtype=np.float32)
    sp = Sparsify("dare", 0.3)
    d1 = sp.whole(t[None], [7])[0]
    np.testing.assert_array_equal(d1, sp.whole(t[None], [7])[0])
    kept = d1 != 0
    np.testing.assert_allclose(d1[kept], 1 / 0.3, rtol=1e-6)
    assert abs(kept.mean() - 0.3) < 0.005
    assert abs(d1.mean() - 1.0) < 0.02  # E[drop(t)] = t


def test_dare_and_dare_ties_by_hand() -> None:
    seeds = [11, 12, 13]
    masks = [uniform(s, 0, 4) < 0.5 for s in seeds]
    dropped = [np.where(m, x / 0.5, 0) for m, x in zip(masks, [A, B, C])]
    close(combine("dare", [A, B, C], {"density": 0.5}, seeds=seeds), list(sum(dropped)))
    close(combine("dare", [A, B, C], {"density": 1.0}, seeds=seeds), [2.0, -2.0, -2.0, 4.5])
    # dare_ties at density 1 keeps everything: TIES's disjoint mean
    close(combine("dare_ties", [A, B, C], {"density": 1.0}, seeds=seeds), [1.5, -1.5, -6.0, 2.25])
    # at 0.5: the sign election of the dropped, rescaled vectors, worked out column by column
    d = np.stack(dropped)
    want = []
    for col in d.T:
        s = np.sign(col.sum()) or np.sign(np.sign(col).sum())
        agree = col[(np.sign(col) == s) & (col != 0)]
        want.append(agree.mean() if agree.size else 0.0)
    close(combine("dare_ties", [A, B, C], {"density": 0.5}, seeds=seeds), want)


def test_model_stock_by_hand() -> None:
    x1, x2, x3 = np.array([1.0, 0.0]), np.array([1.0, 1.0]), np.array([0.0, 1.0])
    # N = 2: cos θ = 1/√2, t = 2cos/(1+cos) = 2(√2−1); mean [1, 0.5]
    t2 = 2 * (math.sqrt(2) - 1)
    close(combine("model_stock", [x1, x2]), [t2, t2 / 2])
    # N = 3: cosines 1/√2, 0, 1/√2 → mean √2/3; t = 3c/(1+2c); mean [2/3, 2/3]
    c = math.sqrt(2) / 3
    t3 = 3 * c / (1 + 2 * c)
    close(combine("model_stock", [x1, x2, x3]), [t3 * 2 / 3, t3 * 2 / 3])
    # identical vectors: cos 1, t 1, the mean itself
    close(combine("model_stock", [x2, x2]), [1.0, 1.0])


def test_median_and_trimmed_mean_by_hand() -> None:
    close(combine("median", [A, B, C]), [1.0, -1.0, 1.0, 0.5])
    cols = [np.array([1.0, -5.0]), np.array([2.0, 0.0]), np.array([3.0, 1.0]), np.array([4.0, 2.0]),
            np.array([100.0, 3.0])]
    # trim 0.2 of 5 drops one value at each end: column 0 mean(2,3,4)=3; column 1 mean(0,1,2)=1
    close(combine("trimmed_mean", cols, {"trim": 0.2}), [3.0, 1.0])
    close(combine("trimmed_mean", cols, {"trim": 0.0}), [22.0, 0.2])  # nothing trimmed: the mean
    close(combine("median", cols), [3.0, 1.0])


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def plain_sign_election(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """TIES's election written as the definition reads: masks of agreeing entries, weighted sums over them."""
    w = w.astype(np.float32)
    wx = x * w[:, None]
    sign = np.sign(wx.sum(0))
    for j in np.flatnonzero(sign == 0):
        sign[j] = np.sign(np.sign(x[:, j]).sum())
    agree = (np.sign(x) == sign) & (x != 0)
    total, weight = np.where(agree, wx, 0).sum(0), np.where(agree, w[:, None], 0).sum(0)
    return np.divide(total, weight, out=np.zeros_like(total), where=weight > 0)


@pytest.mark.parametrize(("n", "m"), [(1, 7), (2, 50), (4, 300), (5, 301), (16, 1000), (64, 257)])
def test_consensus_equals_its_plain_definition_bit_for_bit(n: int, m: int) -> None:
    rng = np.random.default_rng(n * m)
    x = (rng.standard_normal((n, m)) * 10.0 ** rng.integers(-12, 12, (n, m))).astype(np.float32)  # rounding
    few = rng.random(m) < 0.4  # columns of a few values: equal values, zeros, zero masses
    x[:, few] = np.round(rng.standard_normal((n, int(few.sum()))) * 2) / 4
    x[:, 0] = 0
    x[: 2 * (n // 2), 1] = np.tile([1.5, -1.5], n // 2)  # an exact zero mass, no majority
    for w in (np.ones(n), rng.uniform(0.5, 2.0, n)):
        assert np.array_equal(bits(sign_election(x, w)), bits(plain_sign_election(x, w)))
    assert np.array_equal(bits(median(x, np.ones(n))), bits(np.median(x, axis=0)))
    for trim in (0.0, 0.2, 0.34, 0.49):
        k = int(math.floor(trim * n))
        want = np.sort(x, axis=0)[k: n - k].mean(0, dtype=np.float64)
        assert np.array_equal(bits(trimmed_mean(trim)(x, np.ones(n))), bits(want))


@pytest.mark.parametrize("sp", [Sparsify("magnitude", 0.3), Sparsify("breadcrumbs", 0.5, 0.1), Sparsify("dare", 0.4)])
def test_sparsify_equals_ranks_by_a_full_sort(sp: Sparsify) -> None:
    rng = np.random.default_rng(1)
    x = (np.round(rng.standard_normal((6, 500)) * 3) / 8).astype(np.float32)  # many equal magnitudes
    seeds = [int(s) for s in rng.integers(0, 2**63, 6)]
    want = []
    for row, seed in zip(x, seeds):
        if sp.kind == "dare":
            want.append(np.where(uniform(seed, 0, row.size) < sp.density, row / np.float32(sp.density), 0))
            continue
        ranked = np.sort(np.abs(row))[::-1]  # ranked[i]: the (i+1)-th largest magnitude
        top = int(round(sp.gamma * row.size))
        keep = int(round(sp.density * row.size))
        hi = ranked[top - 1] if top else np.inf
        want.append(np.where((np.abs(row) >= ranked[top + keep - 1]) & (np.abs(row) < hi), row, 0))
    got = sp.whole(x, seeds)
    assert np.array_equal(bits(got), bits(np.stack(want)))
    # in chunks, with the whole rows' windows: the same
    windows = sp.windows(x)
    chunked = np.concatenate([sp.apply(x[:, a:a + 64], windows, seeds, a) for a in range(0, 500, 64)], axis=1)
    assert np.array_equal(bits(chunked), bits(got))


def test_dare_draws_compare_on_the_integers() -> None:
    for p in (1e-9, 0.3, 0.5, 0.999999999, 1.0):
        for seed in (0, 7, 2**64 - 1):
            np.testing.assert_array_equal(kept_below([seed], 1000, 5000, p)[0], uniform(seed, 1000, 5000) < p)


def test_robust_methods_are_bounded_under_one_poisoned_vector() -> None:
    rng = np.random.default_rng(0)
    honest = [1.0 + 0.1 * rng.standard_normal(1000) for _ in range(4)]
    for poison in (50 * honest[0], -honest[0], 20 * rng.standard_normal(1000)):
        for method, params in (("median", {}), ("trimmed_mean", {"trim": 0.2})):
            # the honest values lie in about 1 ± 0.4: the robust result stays among them
            assert np.abs(combine(method, [*honest, poison], params) - 1.0).max() < 0.5, method
        assert np.abs(combine("mean", [*honest, poison]) - 1.0).max() > 0.5  # the mean is not


def test_registry_refuses_parameters_naming_them() -> None:
    with pytest.raises(ConfigError, match=r"^density must be a finite number in \(0, 1\], got 0") as e:
        get_method("ties").resolve({"density": 0})
    assert e.value.field == "density"
    with pytest.raises(ConfigError, match="^density must be a number, got 'lots'"):
        get_method("dare").resolve({"density": "lots"})
    with pytest.raises(ConfigError, match="^trim must be a finite number in \\[0, 0.5\\)") as e:
        get_method("trimmed_mean").resolve({"trim": 0.5})
    with pytest.raises(ConfigError, match="^gamma is not a parameter of method 'ties'; it takes density"):
        get_method("ties").resolve({"gamma": 0.1})
    with pytest.raises(ConfigError, match="^method 'nope' is unknown; choose one of sum, mean"):
        get_method("nope")
    assert get_method("breadcrumbs").resolve({"density": "0.5"}) == {"density": 0.5, "gamma": 0.01}


def test_a_method_is_one_decorated_function() -> None:
    from taskvec.merging.methods import Recipe, param

    @merge_method("halved", reference="a test")
    def halved(keep: float = param(0.5, low=0, high=1, help="kept")) -> Recipe:
        """Half of DARE."""
        return Recipe(sparsify=Sparsify("dare", keep))

    try:
        m = MERGE_METHODS["halved"]
        assert (m.summary, m.reference, [p.name for p in m.params]) == ("Half of DARE.", "a test", ["keep"])
        assert m.describe() == "halved: Half of DARE. [keep in (0, 1), default 0.5: kept]"
        with pytest.raises(ConfigError, match="^keep must"):
            m.resolve({"keep": 1})
    finally:
        del MERGE_METHODS["halved"]
    with pytest.raises(TypeError, match="needs a Param default"):
        merge_method("bad", reference="")(lambda x=1: None)  # type: ignore[arg-type,return-value]


def test_every_method_has_a_reference_and_valid_defaults() -> None:
    assert set(MERGE_METHODS) == {"sum", "mean", "weighted", "dare", "ties", "dare_ties", "breadcrumbs",
                                  "model_stock", "median", "trimmed_mean", "lda-head", "ridge-head"}
    for m in MERGE_METHODS.values():
        assert m.reference and m.summary
        assert all(isinstance(p, Param) and p.check(p.default) == p.default for p in m.params)
        m.recipe()
