"""Accumulating: `combine(vectors)` per key, in memory that does not grow with the number of vectors. A method
without consensus reads one file at a time into one running sum; a consensus method goes tensor by tensor with
every file open, in chunks of all vectors' values."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from taskvec.errors import FileFormatError, TaskvecError
from taskvec.io.files import Header
from taskvec.io.layout import SUFFICIENT, is_statistic, vector_keys
from taskvec.merging.heads import check_exact
from taskvec.merging.methods import Array, Recipe, Sparsify, Windows, stock_factor, vector_seed
from taskvec.merging.plan import MergePlan
from taskvec.merging.reading import Reading, VectorFile
from taskvec.progress import Track, no_track

WORKERS = min(8, os.cpu_count() or 1)  # threads computing a consensus chunk's column blocks and ranks
BLOCK = 1 << 15  # columns: the least a worker's block of a chunk holds


@dataclass
class Accumulator:
    """A merge's running state: Σ wᵢ·sᵢ(τᵢ) per delta key (with consensus: the combined tensor), Σ τᵢ/‖τᵢ‖ per key
    (Model Stock), Σ wᵢ, the vector count, and per-key sums of BatchNorm statistics. All arrays are flat."""

    sums: dict[str, Array] = field(default_factory=dict)
    units: dict[str, Array] = field(default_factory=dict)
    weight: float = 0.0
    count: int = 0
    stats: dict[str, Array] = field(default_factory=dict)
    stat_counts: dict[str, int] = field(default_factory=dict)

    def add_stat(self, k: str, x: Array) -> None:
        self.stats[k] = self.stats[k] + x if k in self.stats else x.copy()
        self.stat_counts[k] = self.stat_counts.get(k, 0) + 1

    def combined(self, recipe: Recipe) -> Combined:
        """`combine(vectors)` per key, computed in place (the accumulator is used up)."""
        for k, s in self.sums.items():
            f = 1.0 / self.weight if recipe.normalize else 1.0
            if recipe.stock:
                f *= stock_factor(float(np.dot(self.units[k], self.units[k])), self.count)
            if f != 1.0:
                s *= np.float32(f)
        stats = {k: (v / self.stat_counts[k]).astype(np.float32) for k, v in self.stats.items()}
        return Combined(self.sums, stats)


@dataclass
class Combined:
    """The combined deltas (flat float32 per key) and the statistics' values (the vectors' mean, or re-estimated)."""

    deltas: dict[str, Array]
    stats: dict[str, Array]


def _add(sums: dict[str, Array], k: str, x: Array, w: float) -> None:
    if k not in sums:
        sums[k] = np.array(x, dtype=np.float32) if w == 1 else x * np.float32(w)
    elif w == 1:
        sums[k] += x
    else:
        sums[k] += x * np.float32(w)


def accumulate(plan: MergePlan, base: Header, headers: Sequence[Header], track: Track[Any] = no_track,
               acc: Accumulator | None = None) -> Accumulator:
    """Read the vectors into `acc` (a new one by default; an incremental merge passes its running state), each
    delta times its staleness weight sᵢ (see `MergePlan.weights`)."""
    recipe = plan.recipe
    weights, scales = plan.weights(base, headers)
    acc = Accumulator() if acc is None else acc
    with Reading(headers) as reading:
        if recipe.streams:
            _stream(plan, recipe, reading, weights, scales, acc, track)
        else:
            _by_tensor(plan, recipe, reading, weights, scales, acc, track)
        reading.verify()
    if recipe.streams and not recipe.sparsify:  # NaN/Inf anywhere reaches the sums; name the file only then
        for k, s in acc.sums.items():
            if not np.isfinite(s).all():
                raise _nonfinite(headers, k)
    return acc


def _stream(plan: MergePlan, recipe: Recipe, reading: Reading, weights: Array, scales: Array, acc: Accumulator,
            track: Track[Any]) -> None:
    """Σ wᵢ·sᵢ·sparsify(τᵢ) (sᵢ the staleness weight), one vector file at a time."""
    sp = recipe.sparsify
    for f, w, s in track(zip(reading.files, weights, scales), "merging", len(weights)):
        h = f.header
        stats = set(h.vector.statistics)
        for k in vector_keys(h):  # a subset vector lacks keys (zero deltas); factored keys are expanded
            if k in SUFFICIENT:  # sufficient statistics: exact float64 sums, neither weighted nor discounted
                x = f.read(k, wide=True)
                check_exact(h, k, x)
                acc.sums[k] = acc.sums[k] + x if k in acc.sums else x.copy()
                continue
            x = f.read_delta(k)
            if k in stats:
                acc.add_stat(k, x)
                continue
            if sp is not None:
                if not np.isfinite(x).all():
                    raise FileFormatError(f"{h.path}: tensor {k} holds NaN or Inf")
                x = sp.whole(x[None], [vector_seed(plan.seed, h.vector.sha256, k)])[0]
            if recipe.stock:
                norm = float(np.linalg.norm(x))
                if norm > 0:
                    _add(acc.units, k, x, 1 / norm)
                elif k not in acc.units:
                    acc.units[k] = np.zeros(x.size, np.float32)
            _add(acc.sums, k, x, float(w * s))  # sparsifying commutes with a positive scale
        acc.weight += float(w)
        acc.count += 1


def _by_tensor(plan: MergePlan, recipe: Recipe, reading: Reading, weights: Array, scales: Array, acc: Accumulator,
               track: Track[Any]) -> None:
    """Consensus: tensor by tensor with every file open, in chunks of all vectors' values (each scaled by its
    staleness weight after sparsifying, with which scaling commutes). A chunk is combined on a driver thread,
    in column blocks on worker threads (numpy releases the GIL), while the next one is read; each coordinate's
    result does not depend on the split."""
    assert recipe.consensus is not None
    sp = recipe.sparsify
    files = reading.files
    carried = [set(vector_keys(f.header)) for f in files]
    keys = sorted(set().union(*carried))
    with ThreadPoolExecutor(WORKERS) as pool, ThreadPoolExecutor(1) as driver:
        for k in track(keys, "merging", len(keys)):
            if is_statistic(k):
                for f in files:
                    if k in f.header.tensors:
                        acc.add_stat(k, f.read(k))
                continue
            if not all(k in f.header.tensors for f in files):  # factored or missing somewhere: whole tensors
                acc.sums[k] = _whole(plan, recipe, files, carried, k, weights, scales)
                continue
            numel = files[0].header.tensors[k].numel
            seeds = [vector_seed(plan.seed, f.header.vector.sha256, k) for f in files]
            windows = None  # else from the rows of the one chunk, each a vector's whole tensor
            if sp is not None and sp.ranked and numel > reading.step:  # one more (unhashed) read of each tensor
                windows = sp.stack(pool.map(partial(_ranked, sp, key=k), files))
            out = np.empty(numel, np.float32)
            pending: deque[Future[None]] = deque()  # the chunk being combined while the next one is read
            for start, stop, x in reading.chunks(k, numel):
                pending.append(driver.submit(_chunk, out[start:stop], pool, recipe, x, windows, seeds, start,
                                             weights, scales))
                if len(pending) > 1:
                    pending.popleft().result()
            for fut in pending:
                fut.result()
            acc.sums[k] = out
    acc.weight += float(weights.sum())
    acc.count += len(files)


def _ranked(sp: Sparsify, f: VectorFile, key: str) -> tuple[float, float]:
    """`sp.window` of file `f`'s whole tensor `key`, read once more (unhashed) into memory of its own."""
    mags = f.read(key, verify=False)
    return sp.window(np.abs(mags, out=mags))


def _chunk(out: Array, pool: ThreadPoolExecutor, recipe: Recipe, x: Array, windows: Windows | None, seeds: list[int],
           start: int, weights: Array, scales: Array) -> None:
    """`out` = the consensus of one chunk `x` (a row per vector, columns from `start`), in column blocks on `pool`."""
    sp, consensus = recipe.sparsify, recipe.consensus
    assert consensus is not None
    mapper = pool.map if x.shape[1] >= 2 * BLOCK else map  # small tensors: threads cost more than they save

    def block(a: int) -> Array:
        y = x[:, a:a + width]
        if sp is not None:
            y = sp.apply(y, windows, seeds, start + a)  # type: ignore[arg-type]
        return consensus(_scaled(y, scales), weights)

    if sp is not None and windows is None:
        windows = sp.stack(mapper(lambda row: sp.window(np.abs(row)), x))
    width = max(BLOCK, -(-x.shape[1] // WORKERS))
    for a, values in zip(range(0, x.shape[1], width), mapper(block, range(0, x.shape[1], width))):
        out[a:a + width] = values


def _scaled(x: Array, scales: Array) -> Array:
    """Rows of `x` times their staleness weights (`x` itself when none discounts)."""
    return x if (scales == 1).all() else x * scales.astype(np.float32)[:, None]


def _whole(plan: MergePlan, recipe: Recipe, files: Sequence[VectorFile], carried: Sequence[set[str]], key: str,
           weights: Array, scales: Array) -> Array:
    """Consensus over whole (expanded) deltas of `key`, a zero delta for a vector that does not carry it."""
    assert recipe.consensus is not None
    rows = {i: f.read_delta(key) for i, (f, ks) in enumerate(zip(files, carried)) if key in ks}
    numel = next(iter(rows.values())).size
    x = np.stack([rows.get(i, np.zeros(numel, np.float32)) for i in range(len(files))])
    if not np.isfinite(x).all():
        raise FileFormatError(f"a vector's tensor {key} holds NaN or Inf")
    sp = recipe.sparsify
    if sp is not None:
        x = sp.whole(x, [vector_seed(plan.seed, f.header.vector.sha256, key) for f in files])
    return recipe.consensus(_scaled(x, scales), weights)  # type: ignore[no-any-return]


def _nonfinite(headers: Sequence[Header], key: str) -> TaskvecError:
    """The error for a sum that is not finite: the vector holding NaN/Inf in `key`, else an overflow."""
    with Reading(headers) as reading:
        for f in reading.files:
            if not np.isfinite(f.read(key, verify=False)).all():
                return FileFormatError(f"{f.header.path}: tensor {key} holds NaN or Inf")
    return TaskvecError(f"the merged {key} overflows float32")
