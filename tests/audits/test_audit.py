"""Membership-inference audit: metrics against brute force, an overfit model is caught, chance otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_reference import pld_epsilon
from torch import nn

from taskvec.audits.membership import attack_metrics, audit_model, tpr_at_fpr
from taskvec.errors import FileFormatError, MismatchError
from taskvec.training.data import ImageDataset


def brute_force(members: np.ndarray, non_members: np.ndarray) -> tuple[float, float]:
    """AUC as P(member > non-member) + ½P(tie) over all pairs; best TPR over every threshold with FPR ≤ 1%."""
    diff = members[:, None] - non_members[None, :]
    auc = float((diff > 0).mean() + 0.5 * (diff == 0).mean())
    best = 0.0
    for t in np.concatenate([members, non_members, [-np.inf]]):
        if (non_members > t).mean() <= 0.01:
            best = max(best, float((members > t).mean()))
    return auc, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    members = np.round(rng.normal(0.5, 1, 150), 1)  # rounding makes ties
    non_members = np.round(rng.normal(0, 1, 230), 1)
    got = attack_metrics(members, non_members)
    auc, tpr = brute_force(members, non_members)
    assert got["auc"] == pytest.approx(auc)
    assert got["tpr_at_1pct_fpr"] == pytest.approx(tpr)
    assert tpr_at_fpr(np.array([1.0, 2.0]), np.array([0.0] * 98 + [1.5])) == 0.5  # 99 non-members: no false positive
    assert tpr_at_fpr(np.array([1.0, 2.0]), np.array([0.0] * 99 + [1.5])) == 1.0  # 100: one allowed


def _dataset(n: int, seed: int) -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, n).tolist()
    return ImageDataset("classification", 3, 32, 3, list(range(n)), labels, array=images)


def _overfit(base: Path, ds: ImageDataset, out: Path) -> None:
    from taskvec.io.files import read_kind
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.training.data import Normalizer

    spec = model_spec(base)
    model = load_model(base)
    norm = Normalizer(spec, "cpu")
    x = norm(torch.stack([ds[i][0] for i in range(len(ds))]))
    y = torch.tensor(ds.targets)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    save_model(model, spec, out, extra={"parent": read_kind(base, "model").meta["identity"]})


def test_overfit_model_is_caught_and_base_is_not(make_base, tmp_path: Path) -> None:
    base = make_base("test_vit")
    members, non_members = _dataset(30, 1), _dataset(30, 2)
    _overfit(base, members, tmp_path / "ft.safetensors")
    r = audit_model(tmp_path / "ft.safetensors", members, non_members, reference=base)
    assert r["members"] == 30 and r["mean_loss"]["members"] < r["mean_loss"]["non_members"]
    assert r["attacks"]["loss"]["auc"] > 0.9
    assert r["attacks"]["calibrated"]["auc"] > 0.75
    assert r["attacks"]["loss"]["tpr_at_1pct_fpr"] > 0.3

    # the base never saw either set: disjoint samples from one distribution are indistinguishable
    chance = audit_model(base, _dataset(120, 3), _dataset(120, 4))
    assert abs(chance["attacks"]["loss"]["auc"] - 0.5) < 0.1

    with pytest.raises(MismatchError, match="is not the base"):
        other = make_base("test_convnext", name="other.safetensors")
        audit_model(tmp_path / "ft.safetensors", members, non_members, reference=other)


def test_audit_cli_json(make_base, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base = make_base("test_vit", num_classes=2)
    rng = np.random.default_rng(0)
    for name in ("members", "non_members"):
        np.savez(tmp_path / f"{name}.npz", train_images=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                 train_labels=rng.integers(0, 2, 20))
    res = CliRunner().invoke(app, ["audit", str(base), "--members", str(tmp_path / "members.npz"),
                                   "--non-members", str(tmp_path / "non_members.npz"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["members"] == 20 and set(out["attacks"]) == {"loss"}
    assert 0 <= out["attacks"]["loss"]["auc"] <= 1


def test_members_are_the_runs_training_split(make_base, tmp_path: Path) -> None:
    """A data set without a split column: the run held some of it out for validation; those are no members."""
    from taskvec.errors import ConfigError
    from taskvec.io.files import read_kind, write_json
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.training.data import as_splits, split_record
    from taskvec.training.run_folder import RUN_FILE, SPLIT_FILE

    base = make_base("test_vit")
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / RUN_FILE, {"run_id": "r1", "parent": read_kind(base, "model").meta["identity"],
                                "config": {"val_fraction": 0.25, "seed": 3, "img_size": None}, "data": "dataset"})
    save_model(load_model(base), model_spec(base), run / "model.safetensors", extra={"run_id": "r1"})
    data = _dataset(40, 5)
    splits = as_splits(data, model_spec(base), val_fraction=0.25, seed=3)
    assert splits.train is not None and 0 < len(splits.train) < 40
    with pytest.raises(MismatchError, match="no split.json, so its training units cannot be told"):
        audit_model(run, data, _dataset(20, 6))  # a run folder of an earlier taskvec
    write_json(run / SPLIT_FILE, split_record(splits.train, splits.val))
    r = audit_model(run, data, _dataset(20, 6))
    assert r["members"] == len(splits.train)
    with pytest.raises(MismatchError, match="its training units are not the ones"):
        audit_model(run, _dataset(40, 9), _dataset(20, 6))  # other images than the run trained on
    with pytest.raises(ConfigError, match="^members_split 'val'"):
        audit_model(run, data, _dataset(20, 6), members_split="val")
    assert audit_model(base, data, _dataset(20, 6))["members"] == 40  # no run record: the data as given
    with pytest.raises(ConfigError, match="^batch_size must be an integer >= 1, got 0"):
        audit_model(run, data, _dataset(20, 6), batch_size=0)
    (run / SPLIT_FILE).write_text("[1]")
    with pytest.raises(FileFormatError, match=r"split.json: not what taskvec writes there \(not a JSON object\)"):
        audit_model(run, data, _dataset(20, 6))
    record = json.loads((run / RUN_FILE).read_text())
    del record["config"]["val_fraction"]
    (run / RUN_FILE).write_text(json.dumps(record))
    with pytest.raises(FileFormatError, match="run.json: .*config.val_fraction missing or of the wrong type"):
        audit_model(run, data, _dataset(20, 6))
    (run / RUN_FILE).write_text("{ bad")
    with pytest.raises(FileFormatError, match=r"run.json: cannot be read \(.*\); give the members as data"):
        audit_model(run, data, _dataset(20, 6))


SHAPES = [(40, 250), (10_000,)]  # 20,000 coordinates in two tensors


@pytest.mark.parametrize("z", [0.5, 1.0, 2.0])
def test_canaries_bound_a_correct_mechanism_below_its_claim(z: float, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.audits.canaries import audit_export_mechanism
    from taskvec.privacy import dpsgd

    # the release's noise comes from a secret generator; seed it (far from the canaries' seeds) so the test is
    # deterministic: unseeded, the estimate at z = 2 left the ±40% band in about 1 run in 13
    monkeypatch.setattr(dpsgd, "secret_generator", lambda device: torch.Generator(device).manual_seed(2**40))
    a = audit_export_mechanism(SHAPES, clip=0.7, noise_multiplier=z, delta=1e-5, canaries=1000, seed=1)
    assert a.dim == 20_000 and a.epsilon_lower_bound < a.claimed_epsilon
    # the Gaussian mechanism is tight: the estimate is near the claim (its noise grows with z at δ = 1e-5)
    assert a.epsilon_estimate == pytest.approx(a.claimed_epsilon, rel=0.4)


def test_canaries_catch_a_mechanism_without_noise_or_clipping(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.audits.canaries import audit_export_mechanism
    from taskvec.merging import export

    with monkeypatch.context() as m:  # the test-only hook: no noise
        m.setattr(export, "draw_noise", lambda shape, sigma, generator: torch.zeros(shape))
        a = audit_export_mechanism(SHAPES, clip=1.0, noise_multiplier=1.0, delta=1e-5, canaries=500, seed=1)
    assert a.epsilon_lower_bound > 5 * a.claimed_epsilon
    with monkeypatch.context() as m:  # canaries are drawn at 3× the clip: an unclipped one is 3× as loud
        m.setattr(export, "clip_", lambda tensors, clip: (0.0, 0.0))
        a = audit_export_mechanism(SHAPES, clip=1.0, noise_multiplier=1.0, delta=1e-5, canaries=500, seed=1)
    assert a.epsilon_lower_bound > a.claimed_epsilon


@pytest.mark.parametrize("z", [0.5, 1.0, 3.0])
def test_two_gaussians_of_equal_variance_are_the_gaussian_mechanism(z: float) -> None:
    from taskvec.audits.canaries import epsilon_two_gaussians
    from taskvec.privacy.ledger import gaussian_epsilon

    assert epsilon_two_gaussians((0.0, 2.0), (2.0 / z, 2.0), 1e-5) == pytest.approx(gaussian_epsilon(z, 1e-5),
                                                                                    rel=1e-3)


def test_audit_canaries_cli(make_base, make_finetuned, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app
    from taskvec.errors import PrivacyError
    from taskvec.merging.export import export_vector

    base = make_base()
    v = export_vector(make_finetuned(base, 1), base, tmp_path / "v.safetensors", clip=1.0, noise_multiplier=1.0,
                      delta=1e-5).path
    res = CliRunner().invoke(app, ["audit", str(v), "--canaries", "200", "--max-dim", "20000", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["claimed_epsilon"] == pytest.approx(pld_epsilon(dpa.GaussianDpEvent(1.0), 1e-5), rel=1e-3)
    assert out["canaries"] == 200 and out["epsilon_lower_bound"] < out["claimed_epsilon"]
    res = CliRunner().invoke(app, ["audit", str(v), "--canaries", "200", "--members", str(tmp_path)])
    assert res.exit_code == 2 and "--canaries audits a vector's export mechanism and reads no data" in res.output
    clear = export_vector(make_finetuned(base, 2), base, tmp_path / "c.safetensors").path
    res = CliRunner().invoke(app, ["audit", str(clear), "--canaries", "200", "--max-dim", "20000"])
    assert isinstance(res.exception, PrivacyError) and "no export-time noise" in str(res.exception)


@pytest.mark.parametrize("canaries", [9, 10**8, 100.0])
def test_the_canary_count_is_bounded(canaries: object) -> None:
    from taskvec.audits.canaries import audit_export_mechanism
    from taskvec.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^canaries must be an integer in 10\.\.100000"):
        audit_export_mechanism(SHAPES, clip=1.0, noise_multiplier=1.0, delta=1e-5, canaries=canaries)  # type: ignore[arg-type]
