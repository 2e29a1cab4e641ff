"""Streaming merge: `base + λ·combine(vectors)`, holding one accumulator and one vector file at a time.

Every vector is checked (format, base identity, task, labels, keys, shapes, dtypes) before any tensor is
read, and every vector's sha256 is re-computed while it streams, so a corrupted file never lands in a model.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from taskvec.errors import FileFormatError, MismatchError, check_range
from taskvec.io.files import Digest, Header, check_output, read_kind
from taskvec.io.layout import check_against_base, is_statistic
from taskvec.io.tensors import TORCH_TO_ST, all_finite, tensor_bytes
from taskvec.merging.methods import MergeMethod, dare_drop, dare_seed, get_method
from taskvec.models.spec import ModelSpec, save_model
from taskvec.privacy.ledger import PrivacyBudget, check_merge_budget
from taskvec.progress import Track, no_track


@dataclass
class MergeReport:
    path: Path
    identity: str
    method: str
    scale: float
    density: float | None
    vectors: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)


def check_vectors(base: Header, paths: Sequence[str | os.PathLike[str]]) -> list[Header]:
    """Validate every vector against the base from headers alone; fail fast naming the file and field."""
    if not paths:
        raise FileFormatError("no vectors given")
    headers: list[Header] = []
    seen: dict[str, Path] = {}
    for p in paths:
        h = read_kind(p, "vector")
        m = h.meta
        check_against_base(h, base)
        if m["sha256"] in seen:
            raise MismatchError(
                f"{h.path}: same vector as {seen[m['sha256']]} (sha256 {m['sha256'][:12]}); give it once"
            )
        seen[m["sha256"]] = h.path
        headers.append(h)
    return headers


def _stream(header: Header, f: Any, keys: Iterable[str], dig: Digest) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, fp32 tensor) for `keys`, feeding the original bytes to the vector's digest."""
    for k in keys:
        t = f.get_tensor(k)
        dig.update(k, TORCH_TO_ST[t.dtype], tuple(t.shape), tensor_bytes(t))
        t = t.to(torch.float32)
        if not all_finite(t):
            raise FileFormatError(f"{header.path}: tensor {k} holds NaN or Inf")
        yield k, t


def _verify(header: Header, dig: Digest) -> None:
    if dig.hexdigest() != header.meta["sha256"]:
        raise FileFormatError(f"{header.path}: content does not match its sha256; the file is corrupted")


@dataclass
class Accumulator:
    """Σ cᵢ·fᵢ(τᵢ) over delta keys and per-key sums of statistics: the whole state of a linear merge."""

    deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    stat_counts: dict[str, int] = field(default_factory=dict)

    def add_stat(self, k: str, t: torch.Tensor) -> None:
        self.stats[k] = self.stats[k] + t if k in self.stats else t.clone()
        self.stat_counts[k] = self.stat_counts.get(k, 0) + 1


def accumulate_linear(
    method: MergeMethod, headers: Sequence[Header], density: float | None, seed: int, track: Track[Any],
    acc: Accumulator | None = None, coefs: Sequence[float] | None = None,
) -> Accumulator:
    """Add each vector into one accumulator, one file open at a time.

    An incremental merge passes the running `acc` and the coefficients of the new vectors."""
    assert method.coefficients is not None
    if coefs is None:
        coefs = method.coefficients([h.meta.get("samples") for h in headers])
    acc = Accumulator() if acc is None else acc
    for h, c in track(zip(headers, coefs), "merging", len(headers)):
        dig = Digest()
        stats = set(h.meta.get("statistics", []))
        with safe_open(str(h.path), "pt") as f:
            for k, t in _stream(h, f, sorted(h.tensors), dig):
                if k in stats:
                    acc.add_stat(k, t)
                    continue
                if method.drop:
                    assert density is not None
                    t = dare_drop(t, density, dare_seed(seed, h.meta["sha256"], k))
                if k in acc.deltas:
                    acc.deltas[k].add_(t, alpha=c)
                else:
                    acc.deltas[k] = t.mul_(c)
        _verify(h, dig)
    return acc


def accumulate_tensorwise(
    method: MergeMethod, headers: Sequence[Header], density: float | None, track: Track[Any]
) -> Accumulator:
    """Combine key by key with every vector open (memory-mapped); only one tensor per vector is read."""
    assert method.tensorwise is not None and density is not None
    acc = Accumulator()
    keys = sorted(set().union(*(h.tensors for h in headers)))
    digs = [Digest() for _ in headers]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(h.path), "pt")) for h in headers]
        for k in track(keys, "merging", len(keys)):
            ts: list[torch.Tensor] = []
            for h, f, d in zip(headers, files, digs):
                if k in h.tensors:
                    ts.extend(t for _, t in _stream(h, f, [k], d))
            if is_statistic(k):
                for t in ts:
                    acc.add_stat(k, t)
            else:
                acc.deltas[k] = method.tensorwise(ts, density)
    for h, d in zip(headers, digs):
        _verify(h, d)
    return acc


def apply_to_base(base: Header, acc: Accumulator, scale: float) -> dict[str, torch.Tensor]:
    """`base + λ·Σ` for deltas, averaged statistics, base values for everything else, in base dtypes."""
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(base.path), "pt") as fb:
        for k in sorted(base.tensors):
            b = fb.get_tensor(k)
            if k in acc.deltas:
                out[k] = acc.deltas.pop(k).mul_(scale).add_(b.to(torch.float32)).to(b.dtype)
            elif k in acc.stats:
                out[k] = (acc.stats[k] / acc.stat_counts[k]).to(b.dtype)
            else:
                out[k] = b
    return out


def vector_summary(h: Header) -> dict[str, Any]:
    """What a merged model records of each input vector."""
    m = h.meta
    return {
        "sha256": m["sha256"],
        "contributor": m["contributor"],
        "samples": m.get("samples"),
        "privacy": m.get("privacy", []),
        "file": h.path.name,
    }


def merge_vectors(
    vectors: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    method: str = "sum",
    scale: float = 1.0,
    density: float | None = None,
    seed: int = 0,
    force: bool = False,
    track: Track[Any] = no_track,
    budget: PrivacyBudget = PrivacyBudget(),
    calibrate: Callable[[Header, Accumulator], tuple[float, dict[str, Any]]] | None = None,
) -> MergeReport:
    """Merge data vectors into `base + scale·combine(vectors)` and save it as a taskvec model file.

    `budget` is checked (every ε recomputed, each contributor's vectors composed) before any tensor is read.
    `calibrate(base, acc) -> (scale, record)` chooses the scale instead (see `taskvec.merging.calibrate`); it may set
    statistics in `acc`, and its record is saved in the merge metadata.
    """
    check_output(out, force)
    m = get_method(method)
    density = m.default_density if density is None else density
    if m.default_density is not None and density is not None:
        check_range("density", density, low=0, high=1, high_open=False)
    bh = read_kind(base, "model")
    headers = check_vectors(bh, vectors)
    spent = check_merge_budget(headers, budget)
    if m.linear:
        acc = accumulate_linear(m, headers, density, seed, track)
    else:
        acc = accumulate_tensorwise(m, headers, density, track)
    extra: dict[str, Any] = {"privacy_budget": spent}
    if calibrate is not None:
        scale, extra["calibration"] = calibrate(bh, acc)
    return save_merged(bh, acc, headers, out, method=method, scale=scale, density=density, seed=seed, force=force,
                       extra=extra)


def save_merged(
    bh: Header, acc: Accumulator, headers: Sequence[Header], out: str | os.PathLike[str], *, method: str,
    scale: float, density: float | None, seed: int, force: bool = False, extra: dict[str, Any] | None = None,
) -> MergeReport:
    """Save `base + scale·acc` as a model file recording the merge and every input vector (`extra` adds to it)."""
    m = get_method(method)
    state = apply_to_base(bh, acc, scale)
    summaries = [vector_summary(h) for h in headers]
    record = {
        "method": method,
        "scale": scale,
        "density": density if m.default_density is not None else None,
        "seed": seed if m.drop else None,
        "vectors": summaries,
        **(extra or {}),
    }
    identity = save_model(
        state, ModelSpec.from_dict(bh.meta["model"]), out,
        extra={"parent": bh.meta["identity"], "merge": record}, force=force,
    )
    warnings = []
    if any(not s["privacy"] for s in summaries):
        warnings.append("some inputs carry no DP guarantee (see `taskvec inspect`)")
    return MergeReport(Path(out), identity, method, scale, record["density"], summaries, warnings)
