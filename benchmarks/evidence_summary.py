"""Summarise simulation reports (results.json) into one markdown table per data set, for docs/results.

Usage: python benchmarks/evidence_summary.py [--metric NAME,...] [--per-seed] evidence/breastmnist [...]
A report of `simulate --seeds` shows each model's mean ± sd over the seeds (single sites: the mean of the
sites' means, and the range of those means). One table per metric: the simulation's primary metric, or those
of `--metric` (metrics every row records, e.g. auroc,balanced_accuracy). `--per-seed` adds, per metric, each
seed's best single site, merges and centralised run (from its `seedN/results.json`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def summary(results: dict, metric: str | None = None) -> str:
    """One markdown table of `metric` (default: the primary one) per ε, from a simulation's results.json."""
    rows, metric = results["rows"], metric or results["metric"]

    def value(r: dict) -> float:  # every row records the primary metric among its metrics too
        return r["metrics"][metric]

    def cell(r: dict) -> str:
        sd = r.get("metrics_sd", {}).get(metric)
        return f"{value(r):.3f}" + (f" ± {sd:.3f}" if sd is not None else "")

    base = cell(rows[0])
    eps_values = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    lines = [f"| ε | base | single sites: mean (min–max) | {' | '.join(_methods(rows))} | centralised |",
             "|---|---|---|" + "---|" * len(_methods(rows)) + "---|"]
    for eps in [None, *eps_values]:
        sel = [r for r in rows if r["epsilon"] == eps]
        local = [value(r) for r in sel if r["group"] == "local"]
        merged = {r["name"].removesuffix("" if eps is None else f"-eps{eps:g}"): cell(r)
                  for r in sel if r["group"] in ("merged", "calibrated")}
        central = next(cell(r) for r in sel if r["group"] == "centralised")
        lines.append(
            f"| {'∞ (no DP)' if eps is None else f'{eps:g}'} | {base} | {sum(local) / len(local):.3f} "
            f"({min(local):.3f}–{max(local):.3f}) | "
            + " | ".join(merged[m] for m in _methods(rows)) + f" | {central} |"
        )
    return f"{metric} on the test split:\n\n" + "\n".join(lines)


def per_seed(folder: Path, metric: str | None = None) -> str:
    """One markdown table of `metric` per seed and ε: the best single site (the largest site value of this
    metric), each merge and centralised, from the `seedN/results.json` under `folder`."""
    found = folder.glob("seed*/results.json")
    seeds = sorted((int(f.parent.name[4:]), f) for f in found if f.parent.name[4:].isdigit())
    if not seeds:
        raise SystemExit(f"{folder}: no seedN/results.json for --per-seed")
    lines: list[str] = []
    for seed, path in seeds:
        results = json.loads(path.read_text())
        rows, name = results["rows"], metric or results["metric"]
        if not lines:
            lines = [f"| seed | ε | best single site | {' | '.join(_methods(rows))} | centralised |",
                     "|---|---|---|" + "---|" * len(_methods(rows)) + "---|"]
        for eps in [None, *sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})]:
            sel = {r["name"].removesuffix("" if eps is None else f"-eps{eps:g}"): r for r in rows
                   if r["epsilon"] == eps}
            best = max(r["metrics"][name] for r in sel.values() if r["group"] == "local")
            central = next(r for r in sel.values() if r["group"] == "centralised")
            lines.append(f"| {seed} | {'∞' if eps is None else f'{eps:g}'} | "
                         f"{best:.3f} | " + " | ".join(f"{sel[m]['metrics'][name]:.3f}" for m in _methods(rows))
                         + f" | {central['metrics'][name]:.3f} |")
    return f"{metric or 'the primary metric'} per seed:\n\n" + "\n".join(lines)


def _methods(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if r["epsilon"] is None and r["group"] in ("merged", "calibrated")]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metric", type=lambda s: s.split(","), default=[None],
                    help="the metrics to tabulate, comma-separated (default: the simulation's primary metric)")
    ap.add_argument("--per-seed", action="store_true", help="add each seed's table (best single site, merges)")
    ap.add_argument("folders", nargs="+", type=Path)
    args = ap.parse_args()
    for folder in args.folders:
        print(f"### {folder.name}\n")
        results = json.loads((folder / "results.json").read_text())
        for metric in args.metric:
            print(summary(results, metric))
            print()
        for metric in args.metric if args.per_seed else ():
            print(per_seed(folder, metric))
            print()
