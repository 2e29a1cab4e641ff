"""`benchmarks/evidence.sh`'s plumbing, with `taskvec` stubbed: one simulation per (experiment, seed) in SEEDS, then
the report over those seeds, summarised."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import typer.main

from taskvec.cli.app import app

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/bin/sh
echo "$@" >> "{log}"
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
mkdir -p "$out" && cat > "$out/results.json" <<'JSON'
{rows}
JSON
"""


def _stubbed(tmp_path: Path, results: dict, seeds: str | None) -> dict[str, str]:
    """The environment that runs a benchmark script with `taskvec` stubbed: each call is logged to
    tmp_path/calls and writes `results` as OUT/results.json."""
    stub = tmp_path / "bin" / "taskvec"
    stub.parent.mkdir()
    stub.write_text(STUB.format(log=tmp_path / "calls", rows=json.dumps(results)))
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "TASKVEC_SHARED": str(tmp_path / "shared")}
    env.pop("SEEDS", None)
    if seeds is not None:
        env["SEEDS"] = seeds
    return env


@pytest.mark.parametrize("seeds", [None, "1", "0,2"])
def test_one_simulation_per_seed_then_the_report_over_them(tmp_path: Path, seeds: str | None) -> None:
    rows = [{"name": n, "group": g, "epsilon": None, "metric": "auroc", "value": v, "metrics": {"auroc": v}}
            for n, g, v in (("base", "base", 0.5), ("site0", "local", 0.8), ("mean", "merged", 0.9),
                            ("ties", "merged", 0.85), ("centralised", "centralised", 0.95))]
    env = _stubbed(tmp_path, {"metric": "auroc", "rows": rows}, seeds)
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


def test_every_experiment_is_a_simulate_command_line(tmp_path: Path) -> None:
    """Every experiment of the grid, GPU-sized ones included, parses as `taskvec simulate` parses it (each option
    known, each number or path a number or path, none given twice, where the last would silently win); a run
    without names leaves out PBC's; an unknown name is refused before anything runs."""
    script = ROOT / "benchmarks" / "evidence.sh"
    names = re.findall(r"^  \[([\w-]+)\]=", script.read_text(), flags=re.M)
    assert {"pbc-nb-e8", "pbc128-all", "mo-pixel-stats"} <= set(names)
    rows = [{"name": n, "group": g, "epsilon": None, "metric": "auroc", "value": 0.5, "metrics": {"auroc": 0.5}}
            for n, g in (("base", "base"), ("site0", "local"), ("mean", "merged"), ("centralised", "centralised"))]
    env = _stubbed(tmp_path, {"metric": "auroc", "rows": rows}, "0")
    done = subprocess.run(["bash", str(script), str(tmp_path / "ev"), *names], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    simulate = typer.main.get_command(app).commands["simulate"]  # type: ignore[attr-defined]
    calls = {}
    for line in (tmp_path / "calls").read_text().splitlines():
        command, *args = shlex.split(line)
        assert command == "simulate", line
        options = [a for a in args if a.startswith("--")]
        assert len(options) == len(set(options)), line
        simulate.make_context("simulate", list(args))  # raises a usage error on an unknown option or a bad value
        calls[args[args.index("--out") + 1]] = args
    ev = tmp_path / "ev"
    assert set(calls) == {str(ev / n / "seed0") for n in names} | {str(ev / n) for n in names}  # runs, reports
    gpu = calls[str(ev / "pbc128-all" / "seed0")]
    assert " ".join(gpu).count("--img-size 128") == 1 and "--target-epsilons 1,3,8" in " ".join(gpu)
    with pytest.raises(Exception, match="No such option"):  # the check above can fail
        simulate.make_context("simulate", [*gpu, "--no-such-option"])
    (tmp_path / "calls").unlink()
    done = subprocess.run(["bash", str(script), str(tmp_path / "all")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "calls").read_text().splitlines()
    runs = {Path(line.split("--out ")[1].split()[0]).parent.name for line in lines if "--seed " in line}
    assert runs == {n for n in names if not n.startswith("pbc")}
    (tmp_path / "calls").unlink()
    done = subprocess.run(["bash", str(script), str(ev), "pbc-nb-e8", "chest"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown experiment chest" in done.stderr and not (tmp_path / "calls").exists()


def test_rounds_runs_the_named_data_sets_then_summarises_them(tmp_path: Path) -> None:
    """`rounds.sh OUT pbc`: one `simulate --rounds 3` per seed on PBC's Dirichlet sites, the report over the seeds,
    then the summary table; an unknown name is refused before anything runs."""
    def row(name: str, group: str, value: float, **extra: int) -> dict:
        return {"name": name, "group": group, "epsilon": None, "value": value,
                "metrics": {"auroc": value, "balanced_accuracy": value / 2}, **extra}

    rows = [row("base", "base", 0.5), row("site0", "local", 0.8), row("site1", "local", 0.7),
            row("mean", "merged", 0.85), row("async-v1", "async", 0.9, version=1, arrivals=2),
            row("centralised", "centralised", 0.95)]
    results = {"metric": "auroc", "rows": rows, "config": {"seed": 0, "rounds": 3}, "test_samples": 10,
               "site_samples": [5, 6], "schedule": {"speeds": [1.0, 2.0]}}
    env = _stubbed(tmp_path, results, "0,1")
    script = str(ROOT / "benchmarks" / "rounds.sh")
    out = tmp_path / "rounds"
    done = subprocess.run(["bash", script, str(out), "pbc"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    *runs, report = (tmp_path / "calls").read_text().splitlines()
    assert [r.split("--seed ")[1] for r in runs] == ["0", "1"]
    assert all("--split dirichlet:0.5" in r and "--rounds 3" in r and "--train norm-bias" in r and
               f"{tmp_path}/shared/data/pbc_blood_cells_128" in r for r in runs)
    assert report.endswith(f"--out {out}/pbc --seeds 0,1")
    assert "| best single site | 0.800 ± 0.000 | 0.400 ± 0.000 |" in done.stdout
    assert "| async v1 (2 arrivals) | 0.900 ± 0.000 | 0.450 ± 0.000 |" in done.stdout
    (tmp_path / "calls").unlink()
    done = subprocess.run(["bash", script, str(out), "chest"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "unknown data set chest" in done.stderr and not (tmp_path / "calls").exists()
