"""`benchmarks/two_stage.py` end to end on a tiny random model: both stages run at ε and without DP, the
merge's composed ε is the total (stage 2 calibrated to spend what stage 1 left), and a second run reuses the first's
results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from taskvec import evaluate
from taskvec.simulation.synthetic import write_classification_npz

ROOT = Path(__file__).resolve().parents[1]


def test_two_stages_compose_under_the_total_and_rerun_from_the_cache(tmp_path: Path) -> None:
    data = write_classification_npz(tmp_path / "d.npz", n_train=90, n_val=10, n_test=40, size=32, seed=2)
    command = [sys.executable, str(ROOT / "benchmarks" / "two_stage.py"), "--data", str(data), "--sites", "2",
               "--arch", "test_efficientnet", "--weights", "none", "--num-classes", "2", "--in-chans", "1",
               "--img-size", "32", "--stats-dim", "4", "--steps", "2", "--epsilons", "4", "--stats-share", "0.5",
               "--seeds", "0,1", "--device", "cpu", "--cache", str(tmp_path / "cache")]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (root,) = (tmp_path / "cache").iterdir()
    for seed in (0, 1):
        no_dp, dp = (json.loads((root / f"seed{seed}" / e / "row.json").read_text()) for e in ("no-dp", "eps4"))
        assert no_dp["epsilon"] is None and no_dp["spent"] is None
        assert dp["epsilon"] == 4 and 0.97 * 4 <= dp["spent"] <= 4  # stage 2 spends what stage 1 left
        assert all(0 <= r[s]["auroc"] <= 1 for r in (no_dp, dp) for s in ("stage1", "stage2"))
    for i, site in enumerate(dp["sites"]):  # each site's own stage-2 model, as evaluate scores it
        model = root / "seed1" / "eps4" / "stage2" / f"site{i}" / "model.safetensors"
        assert site["auroc"] == pytest.approx(evaluate(model, data, "test", device="cpu").metrics["auroc"])
    table = first.stdout
    assert "| 4 | " in table and "| ∞ | – |" in table
    best = max(dp["sites"], key=lambda m: m["auroc"])
    seed0 = json.loads((root / "seed0" / "eps4" / "row.json").read_text())
    best0 = max(seed0["sites"], key=lambda m: m["auroc"])
    mean_best = f"{(best['auroc'] + best0['auroc']) / 2:.3f} ± "
    main, per_seed = (block.splitlines() for block in table.split("\n\n")[1:4:2])
    assert main[-1].split(" | ")[6].startswith(mean_best)
    assert per_seed[-1].split(" | ")[2] == (f"{dp['stage2']['auroc']:.3f} / {dp['stage2']['balanced_accuracy']:.3f} "
                                           f"against {best['auroc']:.3f} / {best['balanced_accuracy']:.3f} |")
    (root / "seed0" / "no-dp" / "stage1" / "merged.safetensors").unlink()  # reused results: nothing is rebuilt
    (root / "seed0" / "eps4" / "row.json").write_text(json.dumps({k: v for k, v in seed0.items() if k != "sites"}))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and not (root / "seed0" / "no-dp" / "stage1" / "merged.safetensors").exists()
    assert json.loads((root / "seed0" / "eps4" / "row.json").read_text()) == seed0  # a row without sites: filled in
    assert again.stdout == table
    at = command.index("--epsilons") + 1
    more = subprocess.run([*command[:at], "2,4", *command[at + 1:]], capture_output=True, text=True,
                          timeout=600)  # one more ε: the rows it has are reused
    assert more.returncode == 0 and not (root / "seed0" / "no-dp" / "stage1" / "merged.safetensors").exists()
    rows = more.stdout.split("\n\n")[1].splitlines()
    assert rows[-1] == main[-1] and rows[-2].startswith("| 2 | ")


def test_stage_two_with_a_frozen_head_keeps_the_statistics_head(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    data = write_classification_npz(tmp_path / "d.npz", n_train=60, n_val=10, n_test=30, size=32, seed=3)
    command = [sys.executable, str(ROOT / "benchmarks" / "two_stage.py"), "--data", str(data), "--sites", "2",
               "--arch", "test_efficientnet", "--weights", "none", "--num-classes", "2", "--in-chans", "1",
               "--img-size", "32", "--stats-dim", "4", "--steps", "2", "--epsilons", "4", "--seeds", "0",
               "--head", "frozen", "--device", "cpu", "--cache", str(tmp_path / "cache")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "with head frozen" in done.stdout
    (root,) = (tmp_path / "cache").iterdir()
    for eps in ("no-dp", "eps4"):
        head = load_file(root / "seed0" / eps / "stage1" / "merged.safetensors")
        names = [k for k in head if k.startswith("classifier.")]
        for i in (0, 1):
            site = load_file(root / "seed0" / eps / "stage2" / f"site{i}" / "model.safetensors")
            assert names and all((site[k] == head[k]).all() for k in names)
            assert any((site[k] != head[k]).any() for k in site if not k.startswith("classifier."))
