"""Does a file belong to a base? The one check that export (fine-tuned model against base), merge (vectors
against base) and registry push (vector against the registry's base) share. Reads headers only, no torch."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from taskvec.errors import FileFormatError, MismatchError
from taskvec.io.files import FLOAT_DTYPES, Header, TensorInfo, key_difference
from taskvec.io.lineage import describe_versions

STATISTIC_SUFFIXES = ("running_mean", "running_var")
FACTORS = ("@lora_A", "@lora_B")  # a factored delta of key K is stored as K@lora_A (r × n) and K@lora_B (m × r)
MODEL_FIELDS = ("arch", "task", "num_classes", "labels")
# a statistics vector's tensors
SUFFICIENT = ("sufficient.counts", "sufficient.log_norms", "sufficient.moments", "sufficient.sums")


def is_statistic(name: str) -> bool:
    """BatchNorm running statistics: merged by averaging values, never as deltas."""
    return name.endswith(STATISTIC_SUFFIXES)


def delta_keys(tensors: Mapping[str, TensorInfo]) -> list[str]:
    """Keys that a vector carries as deltas: the base's floating tensors that are not statistics."""
    return sorted(k for k, t in tensors.items() if t.dtype in FLOAT_DTYPES and not is_statistic(k))


def factor_names(key: str) -> tuple[str, str]:
    """The tensor names holding the low-rank factors (A, B) of `key`'s delta, `delta = (B @ A).reshape(shape)`."""
    return key + FACTORS[0], key + FACTORS[1]


def logical_key(name: str) -> str:
    """The base key a vector tensor belongs to (itself, or the key whose factor it is)."""
    return name[: -len(FACTORS[0])] if name.endswith(FACTORS) else name


def vector_keys(h: Header) -> list[str]:
    """The base keys a vector carries, in the order of its sorted tensor names (factored keys once)."""
    return list(dict.fromkeys(logical_key(n) for n in sorted(h.tensors)))


def factor_shapes(key: str, shape: Sequence[int], rank: int) -> dict[str, list[int]]:
    n = 1
    for d in shape[1:]:
        n *= d
    a, b = factor_names(key)
    return {a: [rank, n], b: [shape[0], rank]}


def check_against_base(h: Header, base: Header | Mapping[str, Any], where: str = "",
                       versions: Sequence[str] = ()) -> None:
    """`h` (a data vector, a fine-tuned model or a plain state_dict) must belong to `base`, else a
    `MismatchError` naming the file and the field.

    `base` is the base model's header, or the base record a registry keeps (`identity`, `arch`, `task`,
    `num_classes`, `labels`), which has no tensors to compare layouts with. `where` names the registry the base
    comes from, if any (also for a header built from its record).
    Checked: the base identity `h` records (a vector's `base.identity`, which may also be any of `versions`, the
    identities of the versions v0..vN of a merged base, named in the error; a model's `parent` when it has one);
    task and labels (and arch and num_classes for a model); then, given a header, keys and shapes, and that a
    vector holds floating deltas for exactly the base's floating non-statistics tensors.
    """
    model: Mapping[str, Any]
    if isinstance(base, Header):
        name = f"the base of {where}" if where else f"base {base.path}"  # a registry's address, not a Path of it
        identity, model, tensors = base.model.identity, base.model.model, base.tensors
    else:
        identity, model, name, tensors = base["identity"], base, f"the base of {where}", None
    _check_identity(h, identity, model, name, versions)
    fields: dict[str, Any] = {}
    if h.kind == "model":
        fields = {fld: h.model.model.get(fld) for fld in MODEL_FIELDS}
    elif h.kind == "vector":
        fields = {"task": h.vector.task, "labels": h.vector.labels}
    for fld, got in fields.items():
        if got != model.get(fld):
            raise MismatchError(f"{h.path}: {fld} is {got!r}, {name} has {model.get(fld)!r}",
                                path=h.path, field=fld, expected=model.get(fld), got=got)
    if tensors is not None:
        _check_layout(h, tensors, name)


def _check_identity(h: Header, identity: str, model: Mapping[str, Any], name: str, versions: Sequence[str]) -> None:
    if h.kind == "vector":
        fld, got = "base.identity", h.vector.base.identity
        if got in versions:
            return
    elif h.kind == "model" and h.model.parent is not None:
        fld, got = "parent", h.model.parent
    else:
        return
    if got != identity:
        known = f", versions {describe_versions(versions)}" if versions else ""
        raise MismatchError(
            f"{h.path}: {fld} is {str(got)[:12]}, {name} is {identity[:12]} ({model.get('arch')}){known}; "
            "it was made from another base",
            path=h.path, field=fld, expected=identity, got=got,
        )


def _check_layout(h: Header, tensors: Mapping[str, TensorInfo], name: str) -> None:
    expected = {k: list(t.shape) for k, t in tensors.items()}
    if h.kind == "vector":
        stats = set(h.vector.statistics)
        factors = h.vector.factors or {}
        for k, f in factors.items():
            if k in expected:
                expected |= factor_shapes(k, expected[k], int(f["rank"]))
        if "sufficient" in h.meta:
            expected |= sufficient_shapes(h, tensors)
        own = SUFFICIENT if "sufficient" in h.meta else ()  # a weight vector's are unknown keys
        carried = {logical_key(n) for n in h.tensors if n not in stats and n not in own}
        factored = {logical_key(n) for n in h.tensors if n.endswith(FACTORS)}
        base_deltas = delta_keys(tensors)
        # a subset vector carries only what was trained (a key it lacks has a zero delta); others carry all
        diff = key_difference(carried & set(base_deltas) if h.vector.subset else base_deltas, carried)
        if not diff and h.vector.subset and not carried and "sufficient" not in h.meta:
            diff = "it carries no delta at all (in a merge it would count as a site that learnt nothing)"
        if not diff and factored != set(factors):
            diff = f"factors of {', '.join(sorted(factored ^ set(factors))[:5])} do not match its header"
        unknown = sorted(stats - {k for k in tensors if is_statistic(k)})
        if not diff and unknown:
            diff = f"statistics {', '.join(unknown[:5])} are not statistics of the base"
    else:
        diff = key_difference(tensors, h.tensors)
    if diff:
        raise MismatchError(f"{h.path}: keys differ from {name}: {diff}", path=h.path, field="keys")
    for k, t in h.tensors.items():
        if list(t.shape) != expected[k]:
            raise MismatchError(f"{h.path}: shape of {k} is {list(t.shape)}, {name} has {expected[k]}",
                                path=h.path, field=k, expected=expected[k], got=list(t.shape))
        if h.kind == "vector" and t.dtype not in FLOAT_DTYPES:
            raise MismatchError(f"{h.path}: tensor {k} has dtype {t.dtype}, vectors hold floating tensors",
                                path=h.path, field=k, got=t.dtype)
        if h.kind == "vector" and k in SUFFICIENT and t.dtype != "F64":
            raise MismatchError(f"{h.path}: tensor {k} has dtype {t.dtype}, statistics are F64",
                                path=h.path, field=k, got=t.dtype)


def _sufficient_problem(r: Any, tensors: Mapping[str, TensorInfo]) -> str | None:
    """The first invalid field of a `sufficient` record, checked in order (each check may assume the ones
    before it passed), or None."""
    def count(x: Any, low: int = 0) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < float("inf")

    checks = {
        "": lambda: isinstance(r, dict),
        "features": lambda: isinstance(r["features"], dict) and isinstance(r["features"]["projection"], dict),
        "features.backbone": lambda: isinstance(r["features"]["backbone"], str),
        "features.dim": lambda: count(r["features"]["dim"], 1),
        "features.projection.dim": lambda: count(r["features"]["projection"]["dim"], 1)
        and r["features"]["projection"]["dim"] <= r["features"]["dim"],
        "features.projection.seed": lambda: (r["features"]["projection"]["seed"] is None)
        == (r["features"]["projection"]["dim"] == r["features"]["dim"])
        and (r["features"]["projection"]["seed"] is None or count(r["features"]["projection"]["seed"])
             and r["features"]["projection"]["seed"] < 2**64),
        "head": lambda: len(r["head"]) == 2 and all(k in tensors for k in r["head"])
        and len(tensors[r["head"][1]].shape) == 1 and len(tensors[r["head"][0]].shape) in (2, 4)  # linear or conv
        and tensors[r["head"][0]].shape[0] == tensors[r["head"][1]].shape[0]
        and math.prod(tensors[r["head"][0]].shape[1:]) == r["features"]["dim"],
        "clip": lambda: r.get("clip") is None or (number(r["clip"]) and r["clip"] > 0),
        "centre": lambda: r.get("centre") is None or (
            number(r["centre"]["share"]) and 0 < r["centre"]["share"] < 1
            and isinstance(r["centre"]["point"], list)
            and len(r["centre"]["point"]) == r["features"]["projection"]["dim"]
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in r["centre"]["point"])),
        "noise_std": lambda: r.get("noise_std") is None or (
            sorted(r["noise_std"]) == ["counts", "log_norms", "moments", "sums"]
            and all(map(number, r["noise_std"].values()))),
    }
    for fld, ok in checks.items():
        try:
            if ok():
                continue
        except (KeyError, TypeError, IndexError, AttributeError):
            pass
        return fld
    return None


def sufficient_shapes(h: Header, tensors: Mapping[str, TensorInfo]) -> dict[str, list[int]]:
    """The shapes of a statistics vector's tensors, from its `sufficient` record and the base's classifier
    (`taskvec.merging.heads`); a FileFormatError naming the first invalid field of the record."""
    r = h.meta["sufficient"]
    problem = _sufficient_problem(r, tensors)
    if problem is not None:
        fld = f"sufficient.{problem}".rstrip(".")
        raise FileFormatError(f"{h.path}: {fld} is missing or invalid (for the base's classifier or segmentation "
                              "head)", path=h.path, field=fld)
    if set(h.tensors) != set(SUFFICIENT):
        raise MismatchError(f"{h.path}: keys differ from a statistics vector's: "
                            f"{key_difference(SUFFICIENT, h.tensors)}", path=h.path, field="keys")
    k, p = tensors[r["head"][1]].shape[0], r["features"]["projection"]["dim"]
    return {"sufficient.counts": [k], "sufficient.sums": [k, p], "sufficient.moments": [p, p],
            "sufficient.log_norms": [1]}
