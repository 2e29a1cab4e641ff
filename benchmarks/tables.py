"""Formatting shared by the benchmark scripts' tables (imported from beside them: `python benchmarks/X.py`)."""

from __future__ import annotations

import statistics


def ms(values: list[float], digits: int = 3) -> str:
    """`mean ± sd` (the sample sd) over seeds to `digits` decimals, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
