"""Summarise simulation reports (results.json) into one markdown table per data set, for docs/results.

Usage: python benchmarks/evidence_summary.py evidence/breastmnist [evidence/monuseg ...]
A report of `simulate --seeds` shows each model's mean ± sd over the seeds (single sites: the mean of the
sites' means, and the range of those means).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _v(r: dict) -> str:
    return f"{r['value']:.3f}" + (f" ± {r['value_sd']:.3f}" if r.get("value_sd") is not None else "")


def summary(results: dict) -> str:
    rows, metric = results["rows"], results["metric"]
    base = _v(rows[0])
    eps_values = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    lines = [f"| ε | base | single sites: mean (min–max) | {' | '.join(_methods(rows))} | centralised |",
             "|---|---|---|" + "---|" * len(_methods(rows)) + "---|"]
    for eps in [None, *eps_values]:
        sel = [r for r in rows if r["epsilon"] == eps]
        local = [r["value"] for r in sel if r["group"] == "local"]
        merged = {r["name"].removesuffix("" if eps is None else f"-eps{eps:g}"): _v(r)
                  for r in sel if r["group"] in ("merged", "calibrated")}
        central = next(_v(r) for r in sel if r["group"] == "centralised")
        lines.append(
            f"| {'∞ (no DP)' if eps is None else f'{eps:g}'} | {base} | {sum(local) / len(local):.3f} "
            f"({min(local):.3f}–{max(local):.3f}) | "
            + " | ".join(merged[m] for m in _methods(rows)) + f" | {central} |"
        )
    return f"{metric} on the test split:\n\n" + "\n".join(lines)


def _methods(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if r["epsilon"] is None and r["group"] in ("merged", "calibrated")]


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(f"### {Path(folder).name}\n")
        print(summary(json.loads((Path(folder) / "results.json").read_text())))
        print()
