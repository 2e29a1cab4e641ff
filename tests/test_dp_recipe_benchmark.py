"""`benchmarks/dp_recipe.py` end to end on a tiny random model: each recipe's row (its DP run's ε within the
target, its metrics as `evaluate` scores the model), the table over seeds, and a second run from the cache."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from taskvec import evaluate
from taskvec.simulation.synthetic import write_classification_npz

ROOT = Path(__file__).resolve().parents[1]


def test_recipes_over_seeds_and_a_rerun_from_the_cache(tmp_path: Path) -> None:
    data = write_classification_npz(tmp_path / "d.npz", n_train=60, n_val=10, n_test=40, size=32, seed=1)
    command = [sys.executable, str(ROOT / "benchmarks" / "dp_recipe.py"), "--data", str(data), "--arch",
               "test_efficientnet", "--weights", "none", "--head", "random", "--num-classes", "2", "--labels", "a,b",
               "--in-chans", "1", "--img-size", "32", "--sites", "2", "--site", "1", "--seeds", "0,1",
               "--cache", str(tmp_path / "cache"), "--recipes", "plain:eps=none,steps=3", "private:eps=4,steps=3"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (root,) = (tmp_path / "cache").iterdir()
    rows: dict[str, list[dict]] = {"plain": [], "private": []}
    for seed in (0, 1):
        for folder in sorted((root / f"seed{seed}").iterdir()):
            row = json.loads((folder / "row.json").read_text())
            name = folder.name.rsplit("-", 1)[0]
            rows[name].append(row)
            model = folder / "run" / "model.safetensors"
            assert row["auroc"] == pytest.approx(evaluate(model, data, "test", device="cpu").metrics["auroc"])
            assert row["steps"] == 3
            if name == "private":
                assert row["noise_multiplier"] > 0 and 0.97 * 4 <= row["epsilon"] <= 4
            else:
                assert row["noise_multiplier"] is None and row["epsilon"] is None
    for name, recipe in (("plain", "plain:eps=none,steps=3"), ("private", "private:eps=4,steps=3")):
        auroc = [r["auroc"] for r in rows[name]]
        assert f"| `{recipe}` | 3 |" in first.stdout
        assert f"{statistics.mean(auroc):.3f} ± {statistics.stdev(auroc):.3f}" in first.stdout
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written  # nothing run again
