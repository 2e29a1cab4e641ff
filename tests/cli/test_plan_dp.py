"""`taskvec plan-dp`: its predictions against a measured run (the noise multiplier the run's ledger records, the
norm of the noise its statistics release added), its ratios against their formulas, and the statistics head's
recommended P."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from stats_reference import pooled_features, release_noise_drawn
from synthetic_data import npz_file
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.cli.console import error_message
from taskvec.errors import ConfigError
from taskvec.io.files import read_kind
from taskvec.models.spec import build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.training import sufficient
from taskvec.training.loop import FinetuneConfig, finetune


def test_predictions_match_a_measured_release(tmp_path: Path) -> None:
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    base = tmp_path / "base.safetensors"
    save_model(net, spec, base)
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(base), "--units", "40", "--epsilon", "2",
                                 "--stats-dim", "64", "--max-grad-norm", "3", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    modes = {m["mode"]: m for m in plan["modes"]}
    stats, head = modes["stats-head:64"], modes["head"]
    d = 256 * 2 + 2  # the head's weight and bias
    assert head["coordinates"] == d
    assert head["noise_to_signal"] == pytest.approx(head["noise_multiplier"] * math.sqrt(d) / (0.25 * 40))
    assert stats["noise_to_signal"] == pytest.approx(
        stats["noise_multiplier"] / 0.9**0.5 * math.sqrt(64) * 2 / (0.45**0.5 * 40))
    assert plan["recommended"] == min(plan["modes"], key=lambda m: m["noise_to_signal"])["mode"]

    data = npz_file(tmp_path / "d.npz", n=40)
    dp = DPConfig(max_grad_norm=3.0, delta=1e-5, target_epsilon=2.0, seed=1)
    run = finetune(base, data, tmp_path / "dp", FinetuneConfig(train="stats-head:64", val_fraction=0.0, device="cpu",
                                                               dp=dp)).model_path
    (entry,) = read_kind(run, "model").meta["privacy"]
    assert entry["noise_multiplier"] == pytest.approx(stats["noise_multiplier"])
    noisy = load_file(str(run.parent / "statistics.safetensors"))
    record = read_kind(run.parent / "statistics.safetensors", "statistics").meta["sufficient"]
    feats, labels = pooled_features(base, data)  # the clear statistics, clipped as under DP
    d = feats.shape[1]
    proj = sufficient.projection(record["features"]["projection"]["seed"], d, 64)
    bound, centre = 1.25 * math.sqrt(64 / d), sufficient.Centre(np.array(record["centre"]["point"]), record["clip"])
    clear = sufficient.contributions(feats, labels.tolist(), np.ones(len(labels)), 2, proj, bound, centre)
    noise = release_noise_drawn(noisy, clear, record["centre"]["point"])
    shrink = record["clip"] / bound  # the plan's noise is at the clip b; the run's at its centre's b_c ≤ b
    assert 0 < shrink <= 1
    measured = float(np.linalg.norm(noise["sums"]))
    assert measured == pytest.approx(stats["noise_norms"]["sums"] * shrink, rel=0.3)  # 128 coordinates: sd ~6%
    sym = (np.eye(64) + 1) / 2  # the variance of a symmetrised coordinate, relative to the noise's
    measured = float(np.linalg.norm(noise["moments"] / np.sqrt(sym)))
    assert measured == pytest.approx(stats["noise_norms"]["moments"] * shrink**2, rel=0.1)


@pytest.mark.parametrize(("units", "modes", "follows"), [(100_000, [], True), (50, [], False),
                                                      (100_000, ["--mode", "head", "--mode", "lora:4"], False)])
def test_a_dp_sgd_stage_follows_the_statistics_head_where_its_noise_allows(
        tmp_path: Path, units: int, modes: list[str], follows: bool) -> None:
    """With a statistics head recommended, the feature-training DP-SGD mode of the smallest step ratio follows it
    when that ratio, at what the statistics leave of ε (3/8 of it by default), is at most 2 (not `head`, which
    trains the head alone); without a statistics head, or with too few units, none does."""
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    base = str(tmp_path / "base.safetensors")
    save_model(net, spec, base)

    def plan(*extra: str) -> dict[str, Any]:
        r = CliRunner().invoke(app, ["plan-dp", "--base", base, "--units", str(units), "--epsilon", "8", *modes,
                                     *extra, "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    got = plan()
    ratios = {m["mode"]: m["noise_to_signal"] for m in got["modes"]}
    bodies = {m: v for m, v in ratios.items() if m != "head" and not m.startswith("stats-head:")}
    assert got["recommended"] == min(ratios, key=ratios.__getitem__)
    split = {m["mode"]: m["noise_to_signal"] for m in plan("--stats-share", "0.375")["modes"]}
    if follows:
        body = min(bodies, key=bodies.__getitem__)
        assert got["recommended"].startswith("stats-head:") and got["then"] == body
        assert min(ratios.values()) < ratios["head"] < bodies[body]  # head: less noisy, but no body
        assert got["then_noise_to_signal"] == pytest.approx(split[body]) and bodies[body] < split[body] <= 2
    else:
        assert got["then"] is None and got["then_noise_to_signal"] is None
        assert not got["recommended"].startswith("stats-head:") or min(split[m] for m in bodies) > 2
    r = CliRunner().invoke(app, ["plan-dp", "--base", base, "--units", str(units), "--epsilon", "8", *modes])
    assert ("then:" in r.stdout) == follows, r.stdout


def test_too_few_units_are_warned_and_bad_counts_refused(tmp_path: Path) -> None:
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    save_model(net, spec, tmp_path / "base.safetensors")
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(tmp_path / "base.safetensors"), "--units", "3",
                                 "--epsilon", "0.5", "--mode", "head"])
    assert r.exit_code == 0, r.output
    assert "recommended: head" in r.stdout and "noise exceeds its signal" in r.stdout
    for option, value, field in (("--units", "0", "units"), ("--steps", "0", "steps"), ("--steps", "-5", "steps"),
                                 ("--stats-dim", "100000", "stats_dim"),  # the base's features: 1280
                                 ("--steps", str(10**10), "steps"), ("--units", str(2**60), "units"),
                                 ("--epsilon", "-1", "epsilon"), ("--mode", "bogus", "mode")):
        units = [] if option == "--units" else ["--units", "10"]
        r = CliRunner().invoke(app, ["plan-dp", "--base", str(tmp_path / "base.safetensors"), "--epsilon", "1",
                                     *units, option, value])
        assert isinstance(r.exception, ConfigError) and r.exception.field == field, (option, value, r.output)
        assert error_message(r.exception).startswith(option)  # the flag plan-dp has, not finetune's


def test_the_recommended_projection_follows_the_moment_noise(tmp_path: Path) -> None:
    """The recommended P is the largest of 16, 32, ..., 512 (at most the feature dimension, 256 here) whose
    moment noise ratio √(2P)·σ_M·d/(√K·N) is at most 3, σ_M = z·b²/√0.45 at b = 1.25·√(P/d): smaller at a
    smaller ε, larger with more units or sites; the default mode list uses it."""
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    save_model(net, spec, tmp_path / "base.safetensors")

    def plan(units: int, epsilon: float, sites: int = 1) -> dict:
        r = CliRunner().invoke(app, ["plan-dp", "--base", str(tmp_path / "base.safetensors"), "--units", str(units),
                                     "--epsilon", str(epsilon), "--sites", str(sites), "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    def expected(z: float, n: int, sites: int) -> int:
        d = 256
        fit = [p for p in (16, 32, 64, 128, 256) if math.sqrt(2 * p) * z * min(1, 1.25**2 * p / d) / 0.45**0.5 * d
               / (math.sqrt(sites) * n) <= 3]
        return fit[-1] if fit else 16

    got = {}
    for units, epsilon, sites in ((2000, 1, 1), (2000, 8, 1), (2000, 1, 5), (200000, 8, 1), (50, 1, 1)):
        out = plan(units, epsilon, sites)
        (stats,) = [m for m in out["modes"] if m["mode"].startswith("stats-head:")]
        assert out["stats_dim"] == expected(stats["noise_multiplier"], units, sites)
        assert stats["mode"] == f"stats-head:{out['stats_dim']}"
        got[units, epsilon, sites] = out["stats_dim"]
    assert got[2000, 1, 1] < got[2000, 8, 1] <= got[200000, 8, 1] == 256 and got[2000, 1, 1] < got[2000, 1, 5]
    assert got[50, 1, 1] == 16
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(tmp_path / "base.safetensors"), "--units", "10",
                                 "--epsilon", "1", "--sites", "0"])
    assert isinstance(r.exception, ConfigError) and r.exception.field == "sites"


def test_dp_sgd_predictions_match_a_measured_run(tmp_path: Path) -> None:
    """The noise multiplier and steps plan-dp predicts for a DP-SGD mode are the ones a run of that mode records,
    and the step noise is z·C·√d over the trained coordinates."""
    from taskvec.training.planning import plan_dp

    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, dp_compatible=True, seed=0)
    base = tmp_path / "base.safetensors"
    save_model(net, spec, base)
    plan = plan_dp(base, 40, 4.0, clip=2.0, modes=["head"], steps=12)
    (head,) = plan.modes
    dp = DPConfig(max_grad_norm=2.0, delta=1e-5, target_epsilon=4.0)
    run = finetune(base, npz_file(tmp_path / "d.npz", n=40), tmp_path / "run",
                   FinetuneConfig(train="head", steps=12, val_fraction=0.0, device="cpu", dp=dp))
    (entry,) = read_kind(run.model_path, "model").model.ledger
    assert entry["noise_multiplier"] == pytest.approx(head.noise_multiplier)
    assert entry["steps"] == head.steps == run.steps == 12
    assert head.coordinates == 256 * 2 + 2  # the classifier of test_efficientnet: 256 features, 2 classes
    assert head.noise_norms["step"] == pytest.approx(head.noise_multiplier * 2.0 * math.sqrt(head.coordinates))


def test_a_segmentation_plan_matches_a_measured_pixel_release(tmp_path: Path) -> None:
    """On a U-Net base the statistics head's features are the head convolution's 16 × 3 × 3 window per pixel:
    the plan's noise multiplier is the run's, and the noise its per-pixel statistics release added has the
    predicted norm."""
    from synthetic_data import seg_folder

    from taskvec.models.spec import ModelSpec, load_model
    from taskvec.progress import no_track
    from taskvec.training.data import load_data
    from taskvec.training.modes.stats_head import STATISTICS_FILE, _one_pass

    net, spec = build_base("test_efficientnet", task="segmentation", num_classes=2, img_size=32, seed=0)
    base = tmp_path / "seg.safetensors"
    save_model(net, spec, base)
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(base), "--units", "12", "--epsilon", "3",
                                 "--stats-dim", "64", "--json"])
    assert r.exit_code == 0, r.output
    stats = {m["mode"]: m for m in json.loads(r.stdout)["modes"]}["stats-head:64"]
    assert stats["coordinates"] == 2 * 64 + 2 + 64 * 64 + 1
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(base), "--units", "100000", "--epsilon", "8", "--json"])
    many = json.loads(r.stdout)  # DP-SGD noise allows a second stage, but none was measured for segmentation
    assert many["recommended"].startswith("stats-head:") and many["then"] is None
    assert min(m["noise_to_signal"] for m in many["modes"] if m["mode"] in ("norm-bias", "all")) < 1
    train = load_data(seg_folder(tmp_path / "data", n=12), ModelSpec.from_dict(spec.to_dict()), val_fraction=0.0).train
    assert train is not None
    dp = DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=3.0, seed=2)
    run = finetune(base, train, tmp_path / "dp", FinetuneConfig(train="stats-head:64", val_fraction=0.0,
                                                                 device="cpu", dp=dp)).model_path
    (entry,) = read_kind(run, "model").meta["privacy"]
    assert entry["noise_multiplier"] == pytest.approx(stats["noise_multiplier"])
    record = read_kind(run.parent / STATISTICS_FILE, "statistics").meta["sufficient"]
    assert record["features"]["dim"] == 16 * 9
    proj = sufficient.projection(record["features"]["projection"]["seed"], 16 * 9, 64)
    bound, centre = 1.25 * math.sqrt(64 / (16 * 9)), sufficient.Centre(np.array(record["centre"]["point"]),
                                                                       record["clip"])
    clear = _one_pass(load_model(base, "cpu").eval(), spec, train, False, torch.device("cpu"), 4, no_track, "t",
                      lambda f, y, w: sufficient.contributions(f, y, w, 2, proj, bound, centre))
    noise = release_noise_drawn(load_file(str(run.parent / STATISTICS_FILE)), clear, record["centre"]["point"])
    measured = float(np.linalg.norm(noise["sums"]))
    assert measured == pytest.approx(stats["noise_norms"]["sums"] * record["clip"] / bound, rel=0.3)


def test_a_two_stage_plan_predicts_both_stages_noise(tmp_path: Path) -> None:
    """`--stats-share 0.5` at ε 2: the statistics run at ε 1 and the DP-SGD run from their merge that includes the
    lineage (`--epsilon-includes-lineage`) record the noise multipliers the plan predicts."""
    from taskvec.merging.export import export_vector
    from taskvec.merging.stream import merge_vectors

    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, dp_compatible=True, seed=0)
    base = tmp_path / "base.safetensors"
    save_model(net, spec, base)
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(base), "--units", "40", "--epsilon", "2", "--stats-share",
                                 "0.5", "--stats-dim", "16", "--steps", "6", "--mode", "stats-head:16", "--mode",
                                 "norm-bias", "--json"])
    assert r.exit_code == 0, r.output
    plan = {m["mode"]: m["noise_multiplier"] for m in json.loads(r.stdout)["modes"]}
    data = npz_file(tmp_path / "d.npz", n=40)

    def run(start: Path, out: str, train: str, **dp: Any) -> Path:
        return finetune(start, data, tmp_path / out, FinetuneConfig(
            train=train, steps=None if train.startswith("stats") else 6, val_fraction=0.0, device="cpu",
            contributor="h", dp=DPConfig(max_grad_norm=1.0, delta=1e-5, **dp))).model_path

    stats = run(base, "stats", "stats-head:16", target_epsilon=1.0)
    v1 = merge_vectors([export_vector(stats, base, tmp_path / "s.safetensors").path], base, tmp_path / "v1.safetensors",
                       method="lda-head").path
    body = run(v1, "body", "norm-bias", target_epsilon=2.0, include_lineage=True)
    recorded = {m: read_kind(p, "model").meta["privacy"][0]["noise_multiplier"]
                for m, p in (("stats-head:16", stats), ("norm-bias", body))}
    assert recorded == pytest.approx(plan)
    alone = CliRunner().invoke(app, ["plan-dp", "--base", str(base), "--units", "40", "--epsilon", "2", "--steps", "6",
                                     "--mode", "norm-bias", "--json"])
    assert json.loads(alone.stdout)["modes"][0]["noise_multiplier"] < plan["norm-bias"]  # less ε left: more noise
    bad = CliRunner().invoke(app, ["plan-dp", "--base", str(base), "--units", "40", "--epsilon", "2",
                                   "--stats-share", "1"])
    assert isinstance(bad.exception, ConfigError) and bad.exception.field == "stats_share"


def test_what_it_cannot_predict_is_refused_and_the_rest_planned(tmp_path: Path) -> None:
    """`class-means` is refused by name, a repeated mode is planned once, and on a base whose classifier the
    statistics head cannot solve (LeViT's two heads) the DP-SGD modes are still planned."""
    base = tmp_path / "base.safetensors"
    save_model(*build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0), base)
    args = ["plan-dp", "--base", str(base), "--units", "100", "--epsilon", "1"]
    r = CliRunner().invoke(app, [*args, "--mode", "stats-head:6", "--mode", "class-means"])
    assert isinstance(r.exception, ConfigError) and r.exception.field == "mode"
    assert str(r.exception).startswith("mode class-means is not predicted")
    r = CliRunner().invoke(app, [*args, "--mode", "head", "--mode", "head", "--json"])
    assert r.exit_code == 0, r.output
    assert [m["mode"] for m in json.loads(r.stdout)["modes"]] == ["head"]
    levit = tmp_path / "levit.safetensors"
    save_model(*build_base("levit_128s", num_classes=2, in_chans=1, img_size=32, seed=0), levit)
    args = ["plan-dp", "--base", str(levit), "--units", "1000", "--epsilon", "8"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["stats_dim"] is None and {"head", "norm-bias"} <= {m["mode"] for m in plan["modes"]}
    assert not any(m["mode"].startswith("stats-head") for m in plan["modes"])
    r = CliRunner().invoke(app, [*args, "--mode", "stats-head:8"])
    assert isinstance(r.exception, ConfigError) and "needs a linear classifier; levit_128s's is tuple" in str(
        r.exception)
