"""`benchmarks/evidence.sh`'s plumbing, with `taskvec` stubbed: one simulation per (experiment, seed) in SEEDS, then
the report over those seeds, summarised."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
echo "$@" >> "{log}"
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out" && cat > "$out/results.json" <<'JSON'
{rows}
JSON
"""


@pytest.mark.parametrize("seeds", [None, "1", "0,2"])
def test_one_simulation_per_seed_then_the_report_over_them(tmp_path: Path, seeds: str | None) -> None:
    rows = [{"name": n, "group": g, "epsilon": None, "metric": "auroc", "value": v, "metrics": {"auroc": v}}
            for n, g, v in (("base", "base", 0.5), ("site0", "local", 0.8), ("mean", "merged", 0.9),
                            ("ties", "merged", 0.85), ("centralised", "centralised", 0.95))]
    stub = tmp_path / "bin" / "taskvec"
    stub.parent.mkdir()
    stub.write_text(STUB.format(log=tmp_path / "calls", rows=json.dumps({"metric": "auroc", "rows": rows})))
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "TASKVEC_SHARED": str(tmp_path / "shared")}
    env.pop("SEEDS", None)
    if seeds is not None:
        env["SEEDS"] = seeds
    out = tmp_path / "ev"
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "evidence.sh"), str(out), "pbc-nb-e8"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = (seeds or "0,1,2").split(",")
    *runs, report = (tmp_path / "calls").read_text().splitlines()
    assert [r.split("--seed ")[1] for r in runs] == expected
    assert all(f"--out {out}/pbc-nb-e8/seed{s} " in r for r, s in zip(runs, expected, strict=True))
    assert all("--train norm-bias" in r and f"{tmp_path}/shared/data/pbc_blood_cells_128" in r for r in runs)
    assert report.endswith(f"--out {out}/pbc-nb-e8 --seeds {seeds or '0,1,2'}")
    assert "| ∞ (no DP) | 0.500 | 0.800 (0.800–0.800) | 0.900 | 0.850 | 0.950 |" in done.stdout
