"""Formatting shared by the benchmark scripts' tables (imported from beside them: `python benchmarks/X.py`)."""

from __future__ import annotations

import statistics


def ms(values: list[float]) -> str:
    """`mean ± sd` (the sample sd) over seeds to 3 decimals, or the one value."""
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
