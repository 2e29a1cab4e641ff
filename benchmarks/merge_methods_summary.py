"""One table from the simulations of benchmarks/merge_methods.sh: each method's test metric (mean ± sd over
seeds) per consortium shape, next to the base, the single sites and centralised training.

Usage: python benchmarks/merge_methods_summary.py OUT_DIR   (folders named SHAPE-seedN, each with results.json)
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    root = Path(sys.argv[1])
    by_shape: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    sizes: dict[str, list[int]] = {}
    metric = "?"
    for f in sorted(root.glob("*-seed*/results.json")):
        shape = f.parent.name.rsplit("-seed", 1)[0]
        res = json.loads(f.read_text())
        metric, sizes[shape] = res["metric"], res["site_samples"]
        rows = [r for r in res["rows"] if r["epsilon"] is None]
        local = [r["value"] for r in rows if r["group"] == "local"]
        by_shape[shape]["single sites (mean)"].append(statistics.mean(local))
        by_shape[shape]["best single site"].append(max(local))
        for r in rows:
            if r["group"] in ("base", "merged", "calibrated", "centralised"):
                by_shape[shape][r["name"]].append(r["value"])
    shapes = sorted(by_shape)
    seeds = {s: len(by_shape[s]["base"]) for s in shapes}
    print(f"{metric} on the test split, mean ± sd over seeds "
          + ", ".join(f"{s}: {seeds[s]} seeds, sites of {min(sizes[s])}–{max(sizes[s])} images" for s in shapes))
    print()
    print("| model | " + " | ".join(shapes) + " |")
    print("|---|" + "---|" * len(shapes))
    names = list(by_shape[shapes[0]])
    for name in names:
        print(f"| {name} | " + " | ".join(cell(by_shape[s][name]) for s in shapes) + " |")


if __name__ == "__main__":
    main()
