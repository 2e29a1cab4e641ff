"""Summarise simulation reports (results.json) into one markdown table per data set, for the README.

Usage: python benchmarks/evidence_summary.py evidence/breastmnist [evidence/monuseg ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summary(results: dict) -> str:
    rows, metric = results["rows"], results["metric"]
    base = rows[0]["value"]
    eps_values = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    lines = [f"| ε | base | single sites: mean (min–max) | {' | '.join(_methods(rows))} | centralised |",
             "|---|---|---|" + "---|" * len(_methods(rows)) + "---|"]
    for eps in [None, *eps_values]:
        sel = [r for r in rows if r["epsilon"] == eps]
        local = [r["value"] for r in sel if r["group"] == "local"]
        merged = {r["name"].removesuffix("" if eps is None else f"-eps{eps:g}"): r["value"]
                  for r in sel if r["group"] in ("merged", "calibrated")}
        central = next(r["value"] for r in sel if r["group"] == "centralised")
        lines.append(
            f"| {'∞ (no DP)' if eps is None else f'{eps:g}'} | {base:.3f} | {sum(local) / len(local):.3f} "
            f"({min(local):.3f}–{max(local):.3f}) | "
            + " | ".join(f"{merged[m]:.3f}" for m in _methods(rows)) + f" | {central:.3f} |"
        )
    return f"{metric} on the test split:\n\n" + "\n".join(lines)


def _methods(rows: list[dict]) -> list[str]:
    return [r["name"] for r in rows if r["epsilon"] is None and r["group"] in ("merged", "calibrated")]


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        print(f"### {Path(folder).name}\n")
        print(summary(json.loads((Path(folder) / "results.json").read_text())))
        print()
