"""`benchmarks/evidence_summary.py`: the table of a simulation's primary metric, or of another metric its rows
record, with the sd over seeds where the report has one, and each seed's table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _row(name: str, group: str, eps: float | None, auroc: float, bacc: float, sd: float | None = None) -> dict:
    row = {"name": name, "group": group, "method": None, "epsilon": eps, "metric": "auroc", "value": auroc,
           "metrics": {"auroc": auroc, "balanced_accuracy": bacc}}
    return row | ({"value_sd": sd / 2, "metrics_sd": {"auroc": sd / 2, "balanced_accuracy": sd}} if sd else {})


def _summary(folder: Path, *args: str) -> list[str]:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evidence_summary.py"), *args, str(folder)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if line.startswith("| ")]


def test_tables_of_the_primary_metric_and_of_balanced_accuracy(tmp_path: Path) -> None:
    rows = [_row("base", "base", None, 0.5, 0.125),
            _row("site0", "local", None, 0.9, 0.6), _row("site1", "local", None, 0.8, 0.4),
            _row("mean", "merged", None, 0.95, 0.7, sd=0.02), _row("centralised", "centralised", None, 0.97, 0.8),
            _row("site0-eps8", "local", 8.0, 0.7, 0.3), _row("site1-eps8", "local", 8.0, 0.6, 0.2),
            _row("mean-eps8", "merged", 8.0, 0.75, 0.35), _row("centralised-eps8", "centralised", 8.0, 0.85, 0.5)]
    (tmp_path / "results.json").write_text(json.dumps({"metric": "auroc", "rows": rows}))
    assert _summary(tmp_path)[1:] == ["| ∞ (no DP) | 0.500 | 0.850 (0.800–0.900) | 0.950 ± 0.010 | 0.970 |",
                                      "| 8 | 0.500 | 0.650 (0.600–0.700) | 0.750 | 0.850 |"]
    auroc, (header, no_dp, dp) = _summary(tmp_path)[1:], _summary(tmp_path, "--metric", "balanced_accuracy")
    assert _summary(tmp_path, "--metric", "auroc,balanced_accuracy") == [header, *auroc, header, no_dp, dp]
    assert header == "| ε | base | single sites: mean (min–max) | mean | centralised |"
    assert no_dp == "| ∞ (no DP) | 0.125 | 0.500 (0.400–0.600) | 0.700 ± 0.020 | 0.800 |"
    assert dp == "| 8 | 0.125 | 0.250 (0.200–0.300) | 0.350 | 0.500 |"


def test_each_seeds_table_reads_its_own_results(tmp_path: Path) -> None:
    """`--per-seed`: per seed and ε, the best single site (the largest of the sites' values of each metric: site1's
    balanced accuracy in seed 2, site0's AUROC), each merge and centralised, seeds in numeric order (seed10 after
    seed2; a folder such as seed0.bak is not a seed); a folder without seeds is refused."""
    for seed, shift in ((10, 0.0), (2, 0.05)):
        rows = [_row("base", "base", None, 0.5, 0.125),
                _row("site0", "local", None, 0.9 - shift, 0.6), _row("site1", "local", None, 0.8, 0.4 + 5 * shift),
                _row("mean", "merged", None, 0.95 - shift, 0.7), _row("ties", "merged", None, 0.94, 0.65),
                _row("centralised", "centralised", None, 0.97, 0.8),
                _row("site0-eps8", "local", 8.0, 0.7, 0.3), _row("site1-eps8", "local", 8.0, 0.6 + shift, 0.2),
                _row("mean-eps8", "merged", 8.0, 0.75, 0.35), _row("ties-eps8", "merged", 8.0, 0.74 + shift, 0.3),
                _row("centralised-eps8", "centralised", 8.0, 0.85, 0.5)]
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps({"metric": "auroc", "rows": rows}))
    (tmp_path / "results.json").write_text(json.dumps({"metric": "auroc", "rows": rows}))
    (tmp_path / "seed0.bak").mkdir()
    (tmp_path / "seed0.bak" / "results.json").write_text("{}")
    lines = _summary(tmp_path, "--per-seed", "--metric", "auroc,balanced_accuracy")
    header = "| seed | ε | best single site | mean | ties | centralised |"
    assert lines[6:] == [header,
                         "| 2 | ∞ | 0.850 | 0.900 | 0.940 | 0.970 |", "| 2 | 8 | 0.700 | 0.750 | 0.790 | 0.850 |",
                         "| 10 | ∞ | 0.900 | 0.950 | 0.940 | 0.970 |", "| 10 | 8 | 0.700 | 0.750 | 0.740 | 0.850 |",
                         header,
                         "| 2 | ∞ | 0.650 | 0.700 | 0.650 | 0.800 |", "| 2 | 8 | 0.300 | 0.350 | 0.300 | 0.500 |",
                         "| 10 | ∞ | 0.600 | 0.700 | 0.650 | 0.800 |", "| 10 | 8 | 0.300 | 0.350 | 0.300 | 0.500 |"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps({"metric": "auroc", "rows": rows}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "evidence_summary.py"), "--per-seed",
                           str(tmp_path / "other")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no seedN/results.json" in done.stderr
