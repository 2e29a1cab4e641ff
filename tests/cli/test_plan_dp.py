"""`taskvec plan-dp`: its predictions against a measured run (the noise multiplier the run's ledger records, the
norm of the noise its statistics release added) and its ratios against their formulas."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from synthetic_data import npz_file
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.errors import ConfigError
from taskvec.io.files import read_kind
from taskvec.models.spec import build_base, save_model
from taskvec.privacy.dpsgd import DPConfig
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
    assert stats["noise_to_signal"] == pytest.approx(stats["noise_multiplier"] * math.sqrt(3 * 64) * 2 / 40)
    assert plan["recommended"] == min(plan["modes"], key=lambda m: m["noise_to_signal"])["mode"]

    data = npz_file(tmp_path / "d.npz", n=40)
    runs = {}
    for name, dp in (("dp", DPConfig(max_grad_norm=3.0, delta=1e-5, target_epsilon=2.0, seed=1)), ("clear", None)):
        runs[name] = finetune(base, data, tmp_path / name, FinetuneConfig(train="stats-head:64", val_fraction=0.0,
                                                                          device="cpu", dp=dp)).model_path
    (entry,) = read_kind(runs["dp"], "model").meta["privacy"]
    assert entry["noise_multiplier"] == pytest.approx(stats["noise_multiplier"])
    noisy, clear = (load_file(str(p.parent / "statistics.safetensors")) for p in (runs["dp"], runs["clear"]))
    measured = float(np.linalg.norm(noisy["sufficient.sums"] - clear["sufficient.sums"]))
    assert measured == pytest.approx(stats["noise_norms"]["sums"], rel=0.3)  # 128 coordinates: sd of the norm ~6%


def test_too_few_units_are_warned_and_bad_counts_refused(tmp_path: Path) -> None:
    net, spec = build_base("test_efficientnet", num_classes=2, in_chans=1, img_size=32, seed=0)
    save_model(net, spec, tmp_path / "base.safetensors")
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(tmp_path / "base.safetensors"), "--units", "3",
                                 "--epsilon", "0.5", "--mode", "head"])
    assert r.exit_code == 0, r.output
    assert "recommended: head" in r.stdout and "noise exceeds its signal" in r.stdout
    r = CliRunner().invoke(app, ["plan-dp", "--base", str(tmp_path / "base.safetensors"), "--units", "0",
                                 "--epsilon", "1"])
    assert isinstance(r.exception, ConfigError) and r.exception.field == "units"
