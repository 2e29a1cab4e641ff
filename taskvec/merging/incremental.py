"""Incremental (asynchronous) merging: a new vector updates the merged model without re-reading the old ones.

A method without consensus keeps raw running sums (Σ wᵢ·sᵢ(τᵢ), Σ wᵢ, Model Stock's Σ τᵢ/‖τᵢ‖, statistics
sums) and normalises only when a version is written, so a new vector is one more term: the old vectors are
never read again. Consensus methods (`ties`, `median`, ...) are recomputed from all vectors. Every version is
written by `save_merged` onto the recipe's base, so it carries the same `version`, `lineage` and staleness
weights as a full merge of its vectors (a vector's weight depends only on its base version and the recipe's).

A state directory holds one recipe (base, method, parameters, seed, staleness) and every version it produced::

    accumulator.safetensors   the running sums (fp32), with the vectors they hold
    history.json              the recipe and every version: vector hashes, scale, model identity, time
    merged-v1.safetensors     the versions, each a taskvec model recording its vectors
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from taskvec.errors import ConfigError, FileFormatError, MismatchError, OutputExistsError
from taskvec.io.files import (
    Header,
    atomic_output,
    check_output,
    make_folder,
    now,
    read_header,
    write_json,
)
from taskvec.io.schema import FORMAT, FORMAT_VERSION
from taskvec.io.tensors_np import save_arrays
from taskvec.merging.accumulate import Accumulator, accumulate
from taskvec.merging.heads import solve
from taskvec.merging.plan import MergePlan
from taskvec.merging.stream import MergeReport, save_merged
from taskvec.progress import Track, no_track

STATE_FILE = "accumulator.safetensors"
HISTORY_FILE = "history.json"
LOCK_FILE = ".taskvec-state.lock"
UNITS = "units/"  # prefix of Model Stock's Σ τᵢ/‖τᵢ‖ in the state file


@dataclass
class IncrementalReport:
    """What an incremental merge did: `mode` is `incremental`, `recomputed` or `up to date`."""

    path: Path
    version: int
    mode: str
    added: list[str]
    merge: MergeReport | None = None
    notes: list[str] = field(default_factory=list)


def _load_history(state: Path, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    p = state / HISTORY_FILE
    if not p.exists():
        return []
    try:
        d = json.loads(p.read_text())
        saved, versions = d["recipe"], d["versions"]
    except (ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"{p}: unreadable ({e}); use a new `state` directory", path=p) from None
    if saved.get("base") != recipe["base"]:
        raise MismatchError(
            f"{state}: holds merges of base {str(saved.get('base'))[:12]}, not {recipe['base'][:12]}; "
            "use a new `state` directory", path=state, field="base", expected=recipe["base"], got=saved.get("base")
        )
    if saved != recipe:
        diff = ", ".join(f"{k} {saved.get(k)!r}" for k in recipe if saved.get(k) != recipe[k])
        raise MismatchError(f"{state}: was built with {diff}; pass the same settings or use a new `state` directory",
                            path=state)
    return list(versions)


def _load_accumulator(state: Path, recipe: dict[str, Any]) -> tuple[Accumulator, list[str]] | None:
    """The stored running sums and the hashes of the vectors they hold (None without a state file)."""
    from safetensors.numpy import load_file

    p = state / STATE_FILE
    if not p.exists():
        return None
    m = read_header(p).meta
    if m.get("kind") != "merge-state" or m.get("recipe") != recipe:
        raise FileFormatError(f"{p}: not a merge state of this recipe; use a new `state` directory", path=p)
    tensors = {k: np.array(v, dtype=np.float64 if v.dtype == np.float64 else np.float32).reshape(-1)
               for k, v in load_file(str(p)).items()}
    stats = set(m["stat_counts"])
    acc = Accumulator(
        sums={k: v for k, v in tensors.items() if k not in stats and not k.startswith(UNITS)},
        units={k[len(UNITS):]: v for k, v in tensors.items() if k.startswith(UNITS)},
        weight=float(m["weight"]), count=int(m["count"]),
        stats={k: tensors[k] for k in stats}, stat_counts=dict(m["stat_counts"]),
    )
    return acc, list(m["vectors"])


def _save_accumulator(state: Path, acc: Accumulator, recipe: dict[str, Any], headers: Sequence[Header]) -> None:
    arrays = {**acc.sums, **{UNITS + k: v for k, v in acc.units.items()}, **acc.stats}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "merge-state", "recipe": recipe,
            "vectors": [h.vector.sha256 for h in headers], "weight": acc.weight, "count": acc.count,
            "stat_counts": acc.stat_counts, "created": now()}
    save_arrays({k: ("F64" if v.dtype == np.float64 else "F32", v.shape, v) for k, v in arrays.items()},
                state / STATE_FILE, meta, force=True)


def merge_incremental(
    vectors: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    state: str | os.PathLike[str],
    plan: MergePlan | None = None,
    *,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    track: Track[Any] = no_track,
    **options: Any,
) -> IncrementalReport:
    """Merge `vectors` into the next version in `state`, reading only the vectors the state does not hold yet.

    `plan` (else `MergePlan.create(vectors, base, **options)`) is checked and recorded as in a full merge,
    privacy budget included. The version is `state/merged-vN.safetensors` (also copied to `out` when given);
    with nothing new and the same λ, the latest version stands and nothing is written but `out`.
    """
    if out is not None:
        check_output(out, force, inputs=[base, *vectors])
        if Path(out).resolve().is_relative_to(Path(state).resolve()):
            raise OutputExistsError(f"{out}: is inside the merge state {state}, whose files the next merge reads; "
                                    "write the copy elsewhere", path=out)
    plan = plan or MergePlan.create(vectors, base, **options)
    if plan.exclude_outliers:
        raise ConfigError("exclude_outliers needs every vector at once: merge in full, not incrementally",
                          field="exclude_outliers")
    state_dir = Path(state)
    make_folder(state_dir)
    bh, headers = plan.open()
    recipe = {"base": bh.model.identity, "method": plan.method, "params": dict(plan.params), "seed": plan.seed,
              "staleness": plan.staleness}
    with FileLock(str(state_dir / LOCK_FILE)):
        history = _load_history(state_dir, recipe)
        current = [h.vector.sha256 for h in headers]
        spent = plan.check_inputs(bh, headers)
        if (history and set(history[-1]["vectors"]) == set(current) and history[-1]["scale"] == plan.scale
                and history[-1].get("privacy_budget") == spent):
            latest = history[-1]
            path = state_dir / latest["file"]
            if out is not None:
                _copy(path, out, force)
            return IncrementalReport(path, latest["version"], "up to date", [])
        acc, ordered, mode, notes = _update(plan, bh, headers, state_dir, recipe, track)
        held = set(history[-1]["vectors"]) if history else set()
        version = (history[-1]["version"] if history else 0) + 1
        while (state_dir / f"merged-v{version}.safetensors").exists():
            version += 1
        path = state_dir / f"merged-v{version}.safetensors"
        comb = acc.combined(plan.recipe)
        solve(comb.deltas, bh, ordered, plan.recipe)
        report = save_merged(bh, comb, ordered, path, plan=plan, extra={"version": version})
        added = [s for s in (h.vector.sha256 for h in ordered) if s not in held]
        history.append({
            "version": version, "file": path.name, "identity": report.identity, "scale": plan.scale, "mode": mode,
            "vectors": [h.vector.sha256 for h in ordered], "added": added, "privacy_budget": spent, "created": now(),
        })
        write_json(state_dir / HISTORY_FILE, {"recipe": recipe, "versions": history})
    if out is not None:
        _copy(path, out, force)
    return IncrementalReport(path, version, mode, added, report, notes)


def _update(plan: MergePlan, base: Header, headers: Sequence[Header], state: Path, recipe: dict[str, Any],
            track: Track[Any]) -> tuple[Accumulator, list[Header], str, list[str]]:
    """The running sums for `headers`: the stored ones plus the new vectors, or recomputed; saved before use."""
    if not plan.recipe.streams:
        return accumulate(plan, base, headers, track), list(headers), "recomputed", [
            f"{plan.method} needs every vector at once: recomputed from all {len(headers)} vectors"
        ]
    by_sha = {h.vector.sha256: h for h in headers}
    loaded = _load_accumulator(state, recipe)
    notes: list[str] = []
    acc, old = Accumulator(), []
    if loaded is not None:
        gone = [s for s in loaded[1] if s not in by_sha]
        if gone:
            notes.append(f"{len(gone)} vectors of the state are not in this selection: recomputed from all")
        else:
            acc, old = loaded[0], [by_sha[s] for s in loaded[1]]
    held = {h.vector.sha256 for h in old}
    new = [h for h in headers if h.vector.sha256 not in held]
    accumulate(plan, base, new, track, acc=acc)
    _save_accumulator(state, acc, recipe, [*old, *new])
    return acc, [*old, *new], "incremental" if old else "recomputed", notes


def _copy(src: Path, out: str | os.PathLike[str], force: bool) -> None:
    with atomic_output(out, force) as tmp:
        shutil.copyfile(src, tmp)
