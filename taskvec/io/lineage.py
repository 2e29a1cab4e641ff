"""Versions and lineage of merged models, and a vector's position in them (the contract in ASYNC_SCHEMA.md).

The original base is version 0 (a model file without `version` is version 0). A model merged onto version N
is version N+1 and records `parent` (vN's identity) and `lineage`: every ancestor from the root to the parent,
`[{"version": 0, "identity": ...}, {"version": 1, "identity": ..., "vectors": [...]}, ...]`, each merged
ancestor with the vector summaries it merged. A vector records its base's position: `base.version` K and
`base.lineage`, the identities of v0..vK-1. Pure metadata checks; no tensor is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def is_sha(x: Any) -> bool:
    """A 64-character lowercase hex digest."""
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _is_index(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _summaries_problem(vectors: Any) -> str | None:
    """What is wrong with a list of merged-vector summaries (None when nothing is)."""
    if not isinstance(vectors, list):
        return "is not a list"
    for i, v in enumerate(vectors):
        ok = (isinstance(v, dict) and is_sha(v.get("sha256")) and isinstance(v.get("contributor"), str)
              and isinstance(v.get("privacy", []), list))
        if not ok:
            return f"entry {i} lacks a sha256, contributor or privacy list"
    return None


def model_problem(m: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, what is wrong) with a model's `version`, `lineage`, `parent` and `merge.vectors`, or None."""
    merge = m.get("merge")
    if merge is not None:
        bad = _summaries_problem(merge.get("vectors", [])) if isinstance(merge, dict) else "is not an object"
        if bad:
            return "merge.vectors", bad
    if "version" not in m:
        return ("lineage", "is given without a version") if m.get("lineage") else None
    n = m["version"]
    if not _is_index(n):
        return "version", f"must be a whole number >= 0, got {n!r}"
    lineage = m.get("lineage", [])
    if not isinstance(lineage, list) or len(lineage) != n:
        return "lineage", f"must list the {n} ancestors v0..v{n - 1} of version {n}"
    for i, e in enumerate(lineage):
        if not isinstance(e, dict) or e.get("version") != i:
            return "lineage", f"entry {i} is not version {i}"
        if not is_sha(e.get("identity")):
            return "lineage", f"entry {i} (v{i}) has no valid identity"
        if i == 0 and "vectors" in e:
            return "lineage", "the root v0 merged no vectors, yet its entry lists some"
        bad = _summaries_problem(e.get("vectors")) if i else None
        if bad:
            return "lineage", f"entry {i} (v{i}): vectors {bad}"
    ids = [e["identity"] for e in lineage]  # may repeat: a merge at λ = 0 has its parent's tensors
    if n and m.get("parent") != ids[-1]:
        return "parent", f"must be the last lineage identity (v{n - 1} {ids[-1][:12]}), got {str(m.get('parent'))[:12]}"
    if n and merge is None:
        return "merge", f"version {n} records no merge"
    return None


def vector_problem(m: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field, what is wrong) with a vector's `base.version` and `base.lineage`, or None."""
    base = m.get("base")
    if not isinstance(base, dict) or "version" not in base:
        return ("base.lineage", "is given without base.version") if isinstance(base, dict) and base.get(
            "lineage") else None
    k = base["version"]
    if not _is_index(k):
        return "base.version", f"must be a whole number >= 0, got {k!r}"
    lineage = base.get("lineage", [])
    if not (isinstance(lineage, list) and len(lineage) == k and all(map(is_sha, lineage))):
        return "base.lineage", f"must list the identities of the {k} versions before its base v{k}"
    return None


def model_version(m: Mapping[str, Any]) -> int:
    """A (validated) model's version: 0 unless it records one."""
    return int(m.get("version", 0))


def versions(m: Mapping[str, Any]) -> list[str]:
    """Identities of a (validated) model's versions v0..vN, the model itself last."""
    return [e["identity"] for e in m.get("lineage", [])] + [m["identity"]]


def describe_versions(ids: Sequence[str]) -> str:
    """`v0 1a2b3c4d5e6f, v1 ...`: versions for a message."""
    return ", ".join(f"v{i} {s[:12]}" for i, s in enumerate(ids))


def child_lineage(m: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The lineage of a model merged onto the (validated) model `m`: m's lineage, then m itself (with the
    vectors it merged unless it is the root)."""
    n = model_version(m)
    entry: dict[str, Any] = {"version": n, "identity": m["identity"]}
    if n:
        entry["vectors"] = m["merge"]["vectors"]
    return [*m.get("lineage", []), entry]


def merged_summaries(m: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(version it went into, summary) of every vector already in (validated) model `m`: every lineage entry's
    vectors and m's own merge, each sha256 once."""
    found = [(e["version"], v) for e in m.get("lineage", []) for v in e.get("vectors", [])]
    found += [(model_version(m), v) for v in (m.get("merge") or {}).get("vectors", [])]
    first: dict[str, tuple[int, dict[str, Any]]] = {}
    for k, v in found:
        first.setdefault(v["sha256"], (k, v))
    return list(first.values())


def merged_vectors(m: Mapping[str, Any]) -> dict[str, int]:
    """sha256 → the version each vector already in (validated) model `m` went into."""
    return {v["sha256"]: k for k, v in merged_summaries(m)}


def vector_base(m: Mapping[str, Any]) -> tuple[int, list[str]]:
    """(version, identities of v0..vK-1) of a (validated) vector's base: (0, []) unless it records them."""
    base = m["base"]
    return int(base.get("version", 0)), list(base.get("lineage", []))


DEFAULT_STALENESS = 0.5  # FedBuff's 1/sqrt(1 + staleness)
STALENESS_RULE = "s = (1 + d)^(-a), d = N - K (FedBuff, Nguyen et al. 2022; FedAsync, Xie et al. 2019)"


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's / FedAsync's polynomial discount s = (1 + d)^(−a) of a vector `d` versions behind."""
    return float((1 + staleness) ** -exponent)
