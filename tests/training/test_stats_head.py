"""`finetune --train stats-head:P`: the statistics and the site's LDA head against an independent numpy
computation on the pooled features, the DP release (its sensitivity for image and patient units, with checks
that the test fails without the clip or the log-norm clamp; its noise, `gaussian-sum` entry and ε against
dp-accounting), the solve's handling of a class the noise hides, and what it refuses before anything is
written."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_reference import pld_epsilon
from safetensors.numpy import load_file
from stats_reference import lda_reference, pooled_features, release_noise_drawn, unit_projected
from synthetic_data import npz_file

from taskvec.errors import ConfigError, PrivacyConfigError, TaskvecError
from taskvec.io.files import read_kind
from taskvec.models.spec import ModelSpec, build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.privacy.ledger import verify_ledger
from taskvec.training import sufficient
from taskvec.training.class_means import unit_weights
from taskvec.training.data import load_data
from taskvec.training.loop import FinetuneConfig, finetune

STATS = "statistics.safetensors"


@pytest.fixture
def setup(make_base: Any, tmp_path: Path) -> tuple[Path, Path]:
    base = make_base("test_efficientnet", num_classes=2, in_chans=1)
    return base, npz_file(tmp_path / "d.npz", n=60)


def _run(base: Path, data: Any, out: Path, mode: str = "stats-head:4", dp: DPConfig | None = None) -> Path:
    cfg = FinetuneConfig(train=mode, val_fraction=0.0, device="cpu", dp=dp)
    return finetune(base, data, out, cfg).model_path


@pytest.mark.parametrize("mode, dim", [("stats-head:4", 4), ("stats-head:10000", None)])
def test_statistics_and_head_match_the_pooled_features(setup: tuple[Path, Path], tmp_path: Path, mode: str,
                                                       dim: int | None) -> None:
    base, data = setup
    model = _run(base, data, tmp_path / "run", mode)
    feats, labels = pooled_features(base, data)
    stats = load_file(str(tmp_path / "run" / STATS))
    record = read_kind(tmp_path / "run" / STATS, "statistics").meta["sufficient"]
    d = feats.shape[1]
    p = dim or d
    assert record["features"]["dim"] == d and record["features"]["projection"]["dim"] == p
    proj = sufficient.projection(record["features"]["projection"]["seed"], d, p)
    if dim is None:
        assert record["features"]["projection"]["seed"] is None and np.array_equal(proj, np.eye(d))
    np.testing.assert_allclose(proj @ proj.T, np.eye(p), atol=1e-12)
    g, nu = unit_projected(feats, proj)
    np.testing.assert_array_equal(stats["sufficient.counts"], np.bincount(labels, minlength=2))
    np.testing.assert_allclose(stats["sufficient.log_norms"], [len(g) * np.log(nu)], rtol=1e-5)
    np.testing.assert_allclose(stats["sufficient.sums"], np.stack([g[labels == c].sum(0) for c in range(2)]),
                               rtol=1e-5, atol=1e-5 * np.abs(g).max())
    np.testing.assert_allclose(stats["sufficient.moments"], g.T @ g, rtol=1e-5, atol=1e-5 * (g**2).sum(1).max())
    assert record["clip"] is None and record["noise_std"] is None
    weight, bias = lda_reference(feats, labels, 2, proj, sufficient.DEFAULT_SHRINK)
    got = load_file(str(model))
    np.testing.assert_allclose(got["classifier.weight"], weight, rtol=1e-3, atol=1e-4 * np.abs(weight).max())
    np.testing.assert_allclose(got["classifier.bias"], bias, rtol=1e-3, atol=1e-4)
    before = load_file(str(base))
    assert all(np.array_equal(v, before[k]) for k, v in got.items() if not k.startswith("classifier."))


def _released(feats: np.ndarray, labels: list[int], groups: list[str] | None, keep: list[bool], clip: float | None,
              top: float, proj: np.ndarray, centre: sufficient.Centre | None = None) -> np.ndarray:
    """The released (pre-noise) statistics vector Σ v_u over the units kept, divided by C: each statistic (of g
    clipped at `clip`, unclipped if None; of h = g − c clipped at the centre's clip with a `centre`) times its
    share's root over its bound (`top` for the sums, `top`² for the moments, 1 for the counts, the log-norm range
    for the log norms), as the module docstring defines it."""
    idx = [i for i, on in enumerate(keep) if on]
    w = unit_weights([groups[i] for i in idx] if groups else None, len(idx)).numpy()
    s = sufficient.contributions(feats[idx], [labels[i] for i in idx], w, 3, proj, clip, centre)
    bounds = {"sums": top, "counts": 1.0, "moments": top**2, "log_norms": sufficient.LOG_NORM_RANGE}
    return np.concatenate([s[k].ravel() * math.sqrt(sufficient.SHARES[k]) / bounds[k] for k in sufficient.KEYS])


def _centre_released(feats: np.ndarray, groups: list[str] | None, keep: list[bool], clip: float | None,
                     bound: float, proj: np.ndarray) -> np.ndarray:
    """The centre release's (pre-noise) vector over C: Σ w·(√0.9·g/b, √0.05, √0.05·‖g‖²/b²)."""
    idx = [i for i, on in enumerate(keep) if on]
    w = unit_weights([groups[i] for i in idx] if groups else None, len(idx)).numpy()
    s = sufficient.centre_contributions(feats[idx], w, proj, clip)  # type: ignore[arg-type]
    bounds = {"sum": bound, "count": 1.0, "square": bound**2}
    return np.concatenate([np.ravel(s[k]) * math.sqrt(sufficient.CENTRE_SHARES[k]) / bounds[k] for k in bounds])


@pytest.mark.parametrize("unit", ["image", "patient"])
def test_one_unit_moves_the_released_sums_by_at_most_the_sensitivity(unit: str) -> None:
    """Removing one image (or one patient, whose images span classes and norms from 1e-3 to 1e7) moves each
    released vector (the centre sums, the statistics of g, and those of g − c for a centre c) by at most C (here
    1: the vectors are divided by it) in L2 norm, attained by an image at the clip with a clamped log norm; without
    the clip, or with each of a patient's images at full weight, it would not hold (the checks that this test can
    fail)."""
    assert sum(sufficient.SHARES.values()) == pytest.approx(1.0)
    assert sum(sufficient.CENTRE_SHARES.values()) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    n, d, p = 30, 64, 4
    feats = rng.normal(size=(n, d)) * np.logspace(-3, 7, n)[:, None]
    proj = sufficient.projection(sufficient.projection_seed("b" * 64, d, p), d, p)
    feats[::3] = feats[::3, :p] @ proj  # some in P's row space: ‖g‖ = 1, far above the bound
    labels = [i % 3 for i in range(n)]
    groups = [f"p{i // 4}" for i in range(n)] if unit == "patient" else None
    bound = sufficient.clip_bound(d, p)
    assert bound == pytest.approx(1.25 * math.sqrt(p / d))
    centre = sufficient.Centre(np.full(p, 0.4 * bound), 0.3 * bound)  # ‖c‖ = 0.8 b

    def largest_move(release: Any, weigh: list[str] | None = groups) -> float:
        """The largest move of `release(weigh, keep)` when one unit leaves."""
        full = release(weigh, [True] * n)
        units = sorted(set(groups)) if groups else list(range(n))
        return max(float(np.linalg.norm(full - release(weigh, [(groups[i] if groups else i) != u for i in range(n)])))
                   for u in units)

    def stats(clip: float | None, c: sufficient.Centre | None = None, top: float = bound) -> Any:
        return lambda weigh, keep: _released(feats, labels, weigh, keep, clip, top, proj, c)

    def centre_sums(clip: float | None) -> Any:
        return lambda weigh, keep: _centre_released(feats, weigh, keep, clip, bound, proj)

    for release in (stats(bound), stats(bound, centre, centre.clip), centre_sums(bound)):
        assert largest_move(release) <= 1 + 1e-9
        if groups:  # a patient's four images at full weight each would break it
            assert largest_move(release, weigh=None) > 1.5
    assert largest_move(stats(None)) > 2  # unclipped features break the bound
    assert largest_move(centre_sums(None)) > 1.5
    assert largest_move(stats(bound, sufficient.Centre(centre.point, bound), centre.clip)) > 2  # h not clipped at b_c
    at_clip = proj[:1] * math.exp(12)  # in P's row space (‖g‖ = 1 > b), log norm 12 clamped to 10
    assert np.linalg.norm(_released(at_clip, [0], None, [True], bound, bound, proj)) == pytest.approx(1.0)
    scales = sufficient.release_scales(bound)  # the noise N(0, (zC)²) on v is z/scale on each statistic
    assert sufficient.noise_std(1.7, bound) == pytest.approx({k: 1.7 / scales[k] for k in sufficient.KEYS})
    assert sum((scales[k] * top) ** 2 for k, top in (("sums", bound), ("counts", 1), ("moments", bound**2),
                                                      ("log_norms", 10))) == pytest.approx(1.0)
    assert sufficient.centre_noise_std(1.7, bound) == pytest.approx({"sum": 1.7 * bound / math.sqrt(0.9), "count": 1.7
                                                                     / math.sqrt(0.05), "square": 1.7 * bound**2
                                                                     / math.sqrt(0.05)})


def test_dp_release_is_one_gaussian_sum_of_sensitivity_c(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Two releases, the centre sums at z/√0.1 and the statistics centred on it at z/√0.9, which compose to
    exactly one Gaussian release at z (checked with dp-accounting); the statistics' noise, undone from the
    uncentred sums the file carries, has the recorded sds."""
    base, data = setup
    dp = DPConfig(max_grad_norm=2.0, delta=1e-5, noise_multiplier=1.5, seed=3)
    model = _run(base, data, tmp_path / "a", dp=dp)
    again = _run(base, data, tmp_path / "b", dp=dp)
    noisy = {k[len("sufficient."):]: v for k, v in load_file(str(model.parent / STATS)).items()}
    assert all(np.array_equal(noisy[k], load_file(str(again.parent / STATS))[f"sufficient.{k}"]) for k in noisy)
    feats, labels = pooled_features(base, data)
    d, p = feats.shape[1], 4
    b = 1.25 * math.sqrt(p / d)
    record = read_kind(model.parent / STATS, "statistics").meta["sufficient"]
    bc, c = record["clip"], np.array(record["centre"]["point"])
    assert record["centre"]["share"] == 0.1 and 0 < bc <= b and len(c) == p and np.linalg.norm(c) <= b * (1 + 1e-12)
    proj = sufficient.projection(record["features"]["projection"]["seed"], d, p)
    g, nu = unit_projected(feats, proj)
    g *= np.minimum(1, b / np.linalg.norm(g, axis=1))[:, None]
    h = (g - c) * np.minimum(1, bc / np.linalg.norm(g - c, axis=1))[:, None]
    clear = {"counts": np.bincount(labels, minlength=2), "sums": np.stack([h[labels == k].sum(0) for k in range(2)]),
             "moments": h.T @ h, "log_norms": [len(h) * np.log(nu)]}
    z = 1.5 / math.sqrt(0.9)
    sd = {"sums": z * bc / math.sqrt(0.45), "counts": z / math.sqrt(0.05), "moments": z * bc * bc / math.sqrt(0.45),
          "log_norms": z * 10 / math.sqrt(0.05)}
    assert record["noise_std"] == pytest.approx(sd)
    noise = release_noise_drawn(noisy, clear, record["centre"]["point"])
    upper = np.triu_indices(p, 1)
    draws = [noise[k].ravel() / sd[k] for k in ("sums", "counts", "log_norms")]
    diff = noise["moments"]
    draws += [np.diag(diff) / sd["moments"], diff[upper] * math.sqrt(2) / sd["moments"]]  # symmetrised: /√2
    assert np.std(np.concatenate(draws)) == pytest.approx(1.0, rel=0.3)  # 21 standardised noise draws
    assert np.array_equal(noisy["moments"], noisy["moments"].T)
    header = read_kind(model, "model").meta
    (entry,) = header["privacy"]
    assert "samples" not in header["training"]
    assert (entry["mechanism"], entry["unit"], entry["relation"]) == ("gaussian-sum", "image", "add-remove")
    assert (entry["sample_rate"], entry["steps"], entry["noise_multiplier"]) == (1.0, 1, 1.5)
    assert entry["max_grad_norm"] == pytest.approx(2.0)
    assert entry["epsilon"] == pytest.approx(pld_epsilon(dpa.GaussianDpEvent(1.5), 1e-5), rel=0.02)
    two = [dpa.GaussianDpEvent(1.5 / math.sqrt(0.1)), dpa.GaussianDpEvent(1.5 / math.sqrt(0.9))]
    assert pld_epsilon(two, 1e-5) == pytest.approx(pld_epsilon(dpa.GaussianDpEvent(1.5), 1e-5), rel=1e-3)
    verify_ledger([entry], "model")


def test_the_centre_sets_a_tighter_clip_only_where_its_noise_allows() -> None:
    """From noised centre sums: c = sum/count scaled into the ball of radius b, b_c = √(square/count − ‖c‖²
    + 2p(σ_sum/count)² + 2σ_square/count); where that is not below b (a few units, much noise) the statistics
    are not centred at all (c = 0, clip b)."""
    b, p = 0.5, 4
    noisy = {"sum": np.full(p, 3.0), "count": np.asarray(10.0), "square": np.asarray(2.6)}
    c = np.full(p, 0.3) * b / 0.6  # ‖sum/count‖ = 0.6 > b
    sds = {"sum": 0.5, "count": 0.1, "square": 0.2}
    want = math.sqrt(2.6 / 10 - b**2 + 2 * p * (0.5 / 10) ** 2 + 2 * 0.2 / 10)
    got = sufficient.centre_of(noisy, sds, b)
    assert got.clip == pytest.approx(want) and want < b
    np.testing.assert_allclose(got.point, c)
    loose = sufficient.centre_of(noisy, {"sum": 5.0, "count": 20.0, "square": 5.0}, b)
    assert loose.clip == b and not loose.point.any()


def test_the_head_does_not_depend_on_the_centre_the_statistics_were_released_around() -> None:
    """Noised statistics of h = g − c brought back around two different centres c describe the same features
    shifted by c: the heads solved from them must score each feature's shifted copy alike (logits equal up to
    a constant per feature), with noise and a class the noise hides (class 2 has no units). The within-class
    covariance is taken about the overall mean, so the hidden class's count noise along c cancels."""
    rng = np.random.default_rng(1)
    p, k = 6, 3
    h = rng.normal(size=(50, p)) * 0.1
    labels = rng.integers(0, 2, 50)
    stats = {"counts": np.bincount(labels, minlength=k).astype(float), "sums": np.zeros((k, p)), "moments": h.T @ h,
             "log_norms": np.zeros(1)}
    np.add.at(stats["sums"], labels, h)
    std = {"sums": 0.05, "counts": 2.0, "moments": 0.05, "log_norms": 0.0}
    stats = sufficient.add_noise(stats, std, rng.standard_normal)
    logits = []
    for c in (np.zeros(p), np.full(p, 0.4)):
        weight, bias = sufficient.solve_lda(sufficient.uncentre(stats, sufficient.Centre(c, 1.0)), np.eye(p), 1e-2, std)
        z = (h + c) @ weight.T + bias
        logits.append(z - z.mean(1, keepdims=True))
    np.testing.assert_allclose(logits[0], logits[1], rtol=1e-9, atol=1e-9 * np.abs(logits[0]).max())


def test_a_class_the_noise_hides_takes_no_side() -> None:
    """A class whose count is below 3 sd of the count noise gets the direction of the mean of all units: with
    W linear in the means, the count-weighted mean of the known classes' rows."""
    rng = np.random.default_rng(1)
    d, p = 12, 5
    proj = sufficient.projection(sufficient.projection_seed("c" * 64, d, p), d, p)
    feats = rng.normal(size=(90, d)) + np.repeat(np.eye(3, d) * 3, 30, 0)
    stats = sufficient.contributions(feats, [i // 30 for i in range(90)], np.ones(90), 3, proj, None)
    stats["counts"][2], stats["sums"][2] = 0.5, 0.0  # class 2: below 3 × the count noise's sd
    std = {"sums": 0.0, "counts": 1.0, "moments": 0.0, "log_norms": 0.0}
    weight, bias = sufficient.solve_lda(stats, proj, sufficient.DEFAULT_SHRINK, std)
    np.testing.assert_allclose(weight[2], (30 * weight[0] + 30 * weight[1]) / 60.5, rtol=1e-9, atol=1e-12)
    assert np.isfinite(bias).all() and bias[2] < bias[:2].min()


def test_classes_without_spread_give_a_finite_head() -> None:
    """One unit per class: no within-class spread, so the covariance floor comes from the second moment and
    each unit is its own class's (a nearest-mean head); statistics that give no finite head are refused."""
    rng = np.random.default_rng(2)
    d, p = 12, 5
    proj = sufficient.projection(sufficient.projection_seed("c" * 64, d, p), d, p)
    feats = rng.normal(size=(3, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)  # norm 1: the logits are exactly A g + b
    stats = sufficient.contributions(feats, [0, 1, 2], np.ones(3), 3, proj, None)
    for solver, strength in (("lda", sufficient.DEFAULT_SHRINK), ("ridge", sufficient.DEFAULT_RIDGE)):
        weight, bias = sufficient.solve(solver, stats, proj, strength, None, "three units")
        assert np.isfinite(weight).all() and np.isfinite(bias).all()
        assert (np.argmax(feats @ weight.T + bias, axis=1) == [0, 1, 2]).all()
        zero = {k: np.zeros_like(v) for k, v in stats.items()}
        with pytest.raises(TaskvecError, match=f"^no units: the {solver} head (cannot be solved|solved from these "
                                               "statistics is not finite)"):
            sufficient.solve(solver, zero, proj, strength, None, "no units")


def test_patients_are_the_unit_when_the_data_names_them(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    spec = ModelSpec.from_dict(read_kind(base, "model").meta["model"])
    train = load_data(data, spec, val_fraction=0.0).train
    assert train is not None
    train.groups = [f"p{i // 4}" for i in range(len(train))]
    model = _run(base, train, tmp_path / "run", dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=3.0))
    (entry,) = read_kind(model, "model").meta["privacy"]
    assert entry["unit"] == "patient" and 2.9 <= entry["epsilon"] <= 3.0


def test_refusals_come_before_anything_is_written(setup: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = setup
    over = DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=1.0, noise_multiplier=0.3)
    with pytest.raises(PrivacyConfigError, match="above target_epsilon 1"):
        _run(base, data, tmp_path / "over", dp=over)
    assert not (tmp_path / "over").exists()
    with pytest.raises(ConfigError, match="^epochs does not apply to `train` stats-head:4"):
        FinetuneConfig(train="stats-head:4", epochs=2).check()
    with pytest.raises(ConfigError, match="train must be one of"):
        FinetuneConfig(train="stats-head").check()


def test_non_finite_features_are_refused_and_nothing_is_released(tmp_path: Path) -> None:
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    with torch.no_grad():
        net.conv_head.weight.fill_(float("inf"))  # type: ignore[operator, union-attr]
    save_model(net, spec, tmp_path / "base.safetensors")
    data = npz_file(tmp_path / "d.npz", n=20)
    with pytest.raises(TaskvecError, match="features of a training image are not finite"):
        _run(tmp_path / "base.safetensors", data, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing released, nothing to resume: no run folder is left
    ok = tmp_path / "ok.safetensors"
    save_model(*build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0), ok)
    assert _run(ok, data, tmp_path / "run").exists()  # so the same folder takes the next try


def test_a_classifier_that_is_not_linear_is_refused() -> None:
    from taskvec.training.modes.stats_head import head_layer

    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    assert head_layer(net, spec, "stats-head:4")[1] == net.num_features
    net.classifier = torch.nn.Sequential(torch.nn.Linear(net.num_features, 2))
    with pytest.raises(ConfigError, match="needs a linear classifier; test_efficientnet's is Sequential"):
        head_layer(net, spec, "stats-head:4")
