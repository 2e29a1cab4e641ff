"""Split one dataset into K simulated sites: iid, label-skewed (Dirichlet), or by a group column."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taskvec.errors import ConfigError, TaskvecError, check_range

SPLIT_HELP = ("iid | dirichlet:ALPHA (label skew) | by-group:COLUMN (whole groups to one site each: patient_id, "
              "tcga (the tissue-source site in TCGA file names) or any column of a CSV, e.g. by-group:hospital)")


def split_iid(n: int, sites: int, seed: int) -> list[np.ndarray]:
    """Shuffle and cut into `sites` near-equal parts."""
    _check(n, sites)
    return [np.sort(p) for p in np.array_split(np.random.default_rng(seed).permutation(n), sites)]


def split_dirichlet(labels: Sequence[int], sites: int, alpha: float, seed: int, tries: int = 100) -> list[np.ndarray]:
    """Label skew: each class is shared among sites with proportions ~ Dirichlet(alpha); every site non-empty."""
    y = np.asarray(labels)
    _check(len(y), sites)
    check_range("alpha", alpha, low=0)
    rng = np.random.default_rng(seed)
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(sites)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * sites))[:-1] * len(idx)).astype(int)
            for s, chunk in enumerate(np.split(idx, cuts)):
                parts[s].extend(chunk.tolist())
        if all(parts):
            return [np.sort(np.array(p, dtype=int)) for p in parts]
    raise TaskvecError(f"dirichlet:{alpha} left a site empty in {tries} tries; use a larger alpha or fewer sites")


def split_by_group(groups: Sequence[str], sites: int) -> list[np.ndarray]:
    """Whole groups (hospital, scanner, tissue source) to sites, largest first to the smallest site."""
    g = np.asarray([str(x) for x in groups])
    names, counts = np.unique(g, return_counts=True)
    _check(len(g), sites)
    if len(names) < sites:
        raise ConfigError(f"sites must be at most the {len(names)} groups ({', '.join(names)}), got {sites}",
                          field="sites", expected=f"<= {len(names)}", got=sites)
    load = [0] * sites
    members: list[list[str]] = [[] for _ in range(sites)]
    for name, count in sorted(zip(names, counts), key=lambda t: (-t[1], t[0])):
        s = int(np.argmin(load))
        members[s].append(name)
        load[s] += int(count)
    return [np.flatnonzero(np.isin(g, m)) for m in members]


def split_sites(split: str, sites: int, seed: int, labels: Sequence[int] | None = None,
                groups: Sequence[str] | None = None, n: int | None = None) -> list[np.ndarray]:
    """Parse `iid`, `dirichlet:ALPHA` or `by-group:COLUMN` and split accordingly."""
    kind, _, arg = split.partition(":")
    if kind == "iid":
        total = n if n is not None else len(labels if labels is not None else groups or [])
        return split_iid(total, sites, seed)
    if kind == "dirichlet":
        if labels is None:
            raise TaskvecError("dirichlet splits need class labels (classification data)")
        try:
            alpha = check_range("alpha", float(arg), low=0)
        except ValueError:
            raise ConfigError(f"split dirichlet:ALPHA needs a number > 0, got {split!r}", field="split",
                              got=split) from None
        return split_dirichlet(labels, sites, alpha, seed)
    if kind == "by-group":
        if groups is None:
            raise ConfigError(f"split {split}: the data has no group column {arg!r}", field="split", got=split)
        return split_by_group(groups, sites)
    raise ConfigError(f"split must be iid, dirichlet:ALPHA or by-group:COLUMN, got {split!r}", field="split",
                      got=split)


def _check(n: int, sites: int) -> None:
    if sites < 1:
        raise ConfigError(f"sites must be >= 1, got {sites}", field="sites", expected=">= 1", got=sites)
    if n < sites:
        raise TaskvecError(f"{n} samples cannot be split into {sites} sites")
