"""Incremental (asynchronous) merging: a new vector updates the merged model without re-reading the old ones.

A linear merge is `Σ cᵢ·fᵢ(τᵢ)`. For `sum` and `dare` the coefficients never change; for `mean` (1/n) and
`weighted` (nᵢ/Σn) every old coefficient is scaled by the same factor when vectors arrive, so the running
sum is rescaled once and the new vectors are added. Non-linear methods (`ties`) are recomputed.

A state directory holds one merge recipe (base, method, density, seed) and every version it produced::

    accumulator.safetensors   the running sum (fp32) and statistics sums, with the vectors it holds
    history.json              the recipe and every version: vector hashes, scale, model identity, time
    merged-v1.safetensors     the versions, each a taskvec model recording its vectors
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from taskvec.errors import FileFormatError, MismatchError, check_range
from taskvec.io.files import (
    FORMAT,
    FORMAT_VERSION,
    Header,
    atomic_output,
    check_output,
    now,
    read_header,
    read_kind,
    write_json,
)
from taskvec.merging.methods import MergeMethod, get_method
from taskvec.merging.stream import (
    Accumulator,
    MergeReport,
    accumulate_linear,
    accumulate_tensorwise,
    check_vectors,
    save_merged,
)
from taskvec.privacy.ledger import PrivacyBudget, check_merge_budget
from taskvec.progress import Track, no_track

STATE_FILE = "accumulator.safetensors"
HISTORY_FILE = "history.json"
LOCK_FILE = ".taskvec-state.lock"


@dataclass
class IncrementalReport:
    """What an incremental merge did: `mode` is `incremental`, `recomputed` or `up to date`."""

    path: Path
    version: int
    mode: str
    added: list[str]
    merge: MergeReport | None = None
    notes: list[str] = field(default_factory=list)


def _rescale_factor(method: MergeMethod, old: Sequence[int | None], all_samples: Sequence[int | None]) -> float | None:
    """The factor taking the old vectors' coefficients to their coefficients among all vectors, if one exists."""
    assert method.coefficients is not None
    before, after = method.coefficients(list(old)), method.coefficients(list(all_samples))[: len(old)]
    if any(b == 0 for b in before):
        return None
    ratio = after[0] / before[0]
    return ratio if all(math.isclose(a / b, ratio, rel_tol=1e-12) for a, b in zip(after, before)) else None


def _load_history(state: Path, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    p = state / HISTORY_FILE
    if not p.exists():
        return []
    try:
        d = json.loads(p.read_text())
        saved, versions = d["recipe"], d["versions"]
    except (ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"{p}: unreadable ({e}); use a new `state` directory", path=p) from None
    if saved["base"] != recipe["base"]:
        raise MismatchError(
            f"{state}: holds merges of base {saved['base'][:12]}, not {recipe['base'][:12]}; "
            "use a new `state` directory", path=state, field="base", expected=recipe["base"], got=saved["base"]
        )
    if saved != recipe:
        diff = ", ".join(f"{k} {saved.get(k)!r}" for k in recipe if saved.get(k) != recipe[k])
        raise MismatchError(f"{state}: was built with {diff}; pass the same settings or use a new `state` directory",
                            path=state)
    return list(versions)


def _load_accumulator(state: Path, recipe: dict[str, Any]) -> tuple[Accumulator, list[dict[str, Any]]] | None:
    p = state / STATE_FILE
    if not p.exists():
        return None
    from safetensors.torch import load_file

    h = read_header(p)
    if h.kind != "merge-state":
        raise FileFormatError(f"{p}: not a taskvec merge state; use a new `state` directory", path=p)
    diff = ", ".join(f"{k} {h.meta.get(k)!r}" for k in recipe if h.meta.get(k) != recipe[k])
    if diff:  # history.json may be gone: the state's own recipe decides
        raise MismatchError(f"{p}: was built with {diff}; pass the same settings or use a new `state` directory",
                            path=p)
    tensors = load_file(str(p))
    stats = set(h.meta["statistics"])
    acc = Accumulator(
        deltas={k: v for k, v in tensors.items() if k not in stats},
        stats={k: v for k, v in tensors.items() if k in stats},
        stat_counts=dict(h.meta["stat_counts"]),
    )
    return acc, list(h.meta["vectors"])


def _save_accumulator(state: Path, acc: Accumulator, recipe: dict[str, Any], headers: Sequence[Header]) -> None:
    from taskvec.io.tensors import save_tensors

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kind": "merge-state", **recipe,
        "vectors": [{"sha256": h.meta["sha256"], "samples": h.meta.get("samples")} for h in headers],
        "statistics": sorted(acc.stats), "stat_counts": acc.stat_counts, "created": now(),
    }
    save_tensors({**acc.deltas, **acc.stats}, state / STATE_FILE, meta, force=True)


def merge_incremental(
    vectors: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    state: str | os.PathLike[str],
    *,
    method: str = "sum",
    scale: float = 1.0,
    density: float | None = None,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    force: bool = False,
    track: Track[Any] = no_track,
    budget: PrivacyBudget = PrivacyBudget(),
) -> IncrementalReport:
    """Merge `vectors` into the next version in `state`, reading only the vectors the state does not hold yet.

    The version is `state/merged-vN.safetensors` (also copied to `out` when given); with nothing new and the
    same scale, the latest version stands and nothing is written but `out`. `budget` is checked and
    recorded as in a full merge.
    """
    if out is not None:
        check_output(out, force)
    m = get_method(method)
    density = m.default_density if density is None else density
    if m.default_density is not None and density is not None:
        check_range("density", density, low=0, high=1, high_open=False)
    state_dir = Path(state)
    if not state_dir.parent.is_dir():
        raise FileFormatError(f"{state_dir.parent}: no such directory for `state`", path=state_dir.parent)
    state_dir.mkdir(exist_ok=True)
    bh = read_kind(base, "model")
    headers = check_vectors(bh, vectors)
    spent = check_merge_budget(headers, budget)
    recipe = {
        "base": bh.meta["identity"], "method": method,
        "density": density if m.default_density is not None else None, "seed": seed if m.drop else None,
    }
    with FileLock(str(state_dir / LOCK_FILE)):
        history = _load_history(state_dir, recipe)
        current = [h.meta["sha256"] for h in headers]
        if (history and set(history[-1]["vectors"]) == set(current) and history[-1]["scale"] == scale
                and history[-1].get("privacy_budget") == spent):
            latest = history[-1]
            path = state_dir / latest["file"]
            if out is not None:
                _copy(path, out, force)
            return IncrementalReport(path, latest["version"], "up to date", [])
        acc, ordered, mode, notes = _update(m, bh, headers, state_dir, recipe, density, seed, track)
        held = set(history[-1]["vectors"]) if history else set()
        version = (history[-1]["version"] if history else 0) + 1
        while (state_dir / f"merged-v{version}.safetensors").exists():
            version += 1
        path = state_dir / f"merged-v{version}.safetensors"
        report = save_merged(
            bh, acc, ordered, path, method=method, scale=scale, density=density, seed=seed,
            extra={"version": version, "privacy_budget": spent},
        )
        added = [s for s in (h.meta["sha256"] for h in ordered) if s not in held]
        history.append({
            "version": version, "file": path.name, "identity": report.identity, "scale": scale, "mode": mode,
            "vectors": [h.meta["sha256"] for h in ordered], "added": added, "privacy_budget": spent, "created": now(),
        })
        write_json(state_dir / HISTORY_FILE, {"recipe": recipe, "versions": history})
    if out is not None:
        _copy(path, out, force)
    return IncrementalReport(path, version, mode, added, report, notes)


def _update(
    m: MergeMethod, bh: Header, headers: Sequence[Header], state: Path, recipe: dict[str, Any],
    density: float | None, seed: int, track: Track[Any],
) -> tuple[Accumulator, list[Header], str, list[str]]:
    """The accumulator for `headers`: the stored one plus the new vectors, or recomputed; saved before use."""
    if not m.linear:
        return accumulate_tensorwise(m, headers, density, track), list(headers), "recomputed", [
            f"{m.name} is not linear: recomputed from all {len(headers)} vectors"
        ]
    by_sha = {h.meta["sha256"]: h for h in headers}
    loaded = _load_accumulator(state, recipe)
    notes: list[str] = []
    acc, old = Accumulator(), []
    if loaded is not None:
        gone = [v["sha256"] for v in loaded[1] if v["sha256"] not in by_sha]
        if gone:
            notes.append(f"{len(gone)} vectors of the state are not in this selection: recomputed from all")
        else:
            acc, old = loaded[0], [by_sha[v["sha256"]] for v in loaded[1]]
    held = {h.meta["sha256"] for h in old}
    new = [h for h in headers if h.meta["sha256"] not in held]
    if old:
        samples = [h.meta.get("samples") for h in [*old, *new]]
        factor = _rescale_factor(m, samples[: len(old)], samples)
        if factor is None:
            notes.append(f"{m.name}: the old coefficients cannot be rescaled: recomputed from all")
            acc, old, new = Accumulator(), [], list(headers)
        elif factor != 1.0:
            for t in acc.deltas.values():
                t.mul_(factor)
    assert m.coefficients is not None
    coefs = m.coefficients([h.meta.get("samples") for h in [*old, *new]])
    accumulate_linear(m, new, density, seed, track, acc=acc, coefs=coefs[len(old):])
    _save_accumulator(state, acc, recipe, [*old, *new])
    return acc, [*old, *new], "incremental" if old else "recomputed", notes


def _copy(src: Path, out: str | os.PathLike[str], force: bool) -> None:
    with atomic_output(out, force) as tmp:
        shutil.copyfile(src, tmp)
