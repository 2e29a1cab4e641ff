"""The merge: `base + λ·combine(vectors)`, from a `MergePlan` to the merged model file, with numpy (no torch).

Read top to bottom: a `MergePlan` is validated once (method parameters, λ, seed, privacy budget) and opens its
inputs (every vector checked against the base from headers alone, the budget checked, before any tensor is
read); `accumulate` reads the vectors, a method without consensus one file at a time into one running sum,
the others tensor by tensor in chunks, so memory does not grow with the number of vectors; `save_merged`
writes `base + λ·combined` with the plan and every input recorded. The arithmetic is in `methods.py`.

The base may be a merged version N (`taskvec.io.schema`): a vector against any version K of its lineage is
accepted, scaled by its staleness weight (1 + N − K)^(−a) before it is combined, and the merged file is
version N+1 with the lineage extended by the base.

Every byte used is read once from one open file into private memory, and that same memory is hashed on
helper threads while the merge sums it (hashlib releases the GIL): a vector whose bytes do not match its
sha256 fails the merge before anything is written. `diagnose` is one more streaming pass that flags vectors
far from the coordinate-wise median (scaled, sign-flipped, noise).

Modules, in the order a merge uses them: `plan.py` (the plan and the input checks), `reading.py` (hashed
reads), `accumulate.py` (the sums and consensus), `diagnose.py`, and this one (writing, `merge_vectors`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from taskvec.errors import ConfigError, FileFormatError, TaskvecError
from taskvec.io.files import Digest, Header, check_output, now
from taskvec.io.schema import MergeRecord, ModelHeader, VectorSummary
from taskvec.io.tensors_np import as_float32, from_float32, non_finite, save_arrays
from taskvec.merging.accumulate import Combined, accumulate
from taskvec.merging.diagnose import diagnose
from taskvec.merging.heads import is_statistics, solve
from taskvec.merging.methods import Array
from taskvec.merging.plan import MergePlan
from taskvec.progress import Track, no_track

if TYPE_CHECKING:
    from taskvec.merging.calibrate import Calibrator


@dataclass
class MergeReport:
    """What a merge wrote: the file, its identity, λ, and the record it carries (plan, inputs, extras)."""

    path: Path
    identity: str
    method: str
    scale: float
    record: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def vectors(self) -> list[dict[str, Any]]:
        return list(self.record["vectors"])


def vector_summaries(plan: MergePlan, base: Header, headers: Sequence[Header]) -> list[dict[str, Any]]:
    """What a merged model records of each input vector: identity, contributor, samples, privacy ledger, file,
    run, and the version it was fine-tuned from with its staleness d and weight s = (1 + d)^(−a)."""
    n = base.model.number
    _, scales = plan.weights(base, headers)
    return [VectorSummary(v.sha256, v.contributor, v.privacy, v.samples, h.path.name, v.run_id, v.base.number,
                          n - v.base.number, float(s), True if is_statistics(h) else None).to_json()
            for h, v, s in zip(headers, (h.vector for h in headers), scales)]


def merged_arrays(bh: Header, comb: Combined, scale: float) -> Iterator[tuple[str, str, tuple[int, ...], Array]]:
    """(key, dtype, shape, bytes as an array) of `base + λ·combined`, statistics' values, base values otherwise;
    in base dtypes, key by key in sorted order (the deltas are used up)."""
    with open(bh.path, "rb", buffering=0) as fb:
        for k in sorted(bh.tensors):
            t = bh.tensors[k]
            fb.seek(bh.data_start + t.start)
            raw = bytearray(t.end - t.start)
            if fb.readinto(raw) != len(raw):
                raise FileFormatError(f"{bh.path}: truncated while reading {k}")
            if k in comb.deltas:
                d = comb.deltas.pop(k)
                with np.errstate(over="ignore"):  # overflow to ±inf is refused below, with its remedy
                    d *= np.float32(scale)
                    d += as_float32(raw, t.dtype)
            elif k in comb.stats:
                d = comb.stats[k]
            else:
                yield k, t.dtype, t.shape, np.frombuffer(raw, np.uint8)
                continue
            out = np.ascontiguousarray(from_float32(d, t.dtype))
            if non_finite(out, t.dtype):
                raise TaskvecError(f"{k}: the merged weights overflow {t.dtype} (λ = {scale:g}); merge at a "
                                   "smaller λ, or leave out the vector of outsized values (`taskvec inspect` "
                                   "shows each one's norm)", field="scale", got=scale)
            yield k, t.dtype, t.shape, out


def save_merged(bh: Header, comb: Combined, headers: Sequence[Header], out: str | os.PathLike[str], *,
                plan: MergePlan, scale: float | None = None, force: bool = False,
                extra: dict[str, Any] | None = None) -> MergeReport:
    """Write `base + scale·combined` (scale: the plan's λ unless calibrated) as a taskvec model file recording
    the plan, every input vector and `extra`."""
    from taskvec import __version__

    scale = plan.scale if scale is None else scale
    record = {**plan.record(bh, headers), "scale": scale, "vectors": vector_summaries(plan, bh, headers),
              **(extra or {})}
    arrays: dict[str, tuple[str, tuple[int, ...], Array]] = {}
    digest = Digest()
    for k, dtype, shape, a in merged_arrays(bh, comb, scale):
        arrays[k] = (dtype, shape, a)
        digest.update(k, dtype, shape, np.ascontiguousarray(a).data.cast("B"))
    identity = digest.hexdigest()
    base = bh.model
    # `source`: the weights the lineage started from (what `finetune` defaults its mode by)
    header = ModelHeader(identity=identity, model=base.model, created=now(), taskvec_version=__version__,
                         source=base.source, parent=base.identity, version=base.number + 1,
                         lineage=base.child_lineage(), merge=MergeRecord.from_json(record))
    save_arrays(arrays, out, header, force=force)
    warnings = []
    if any(not v["privacy"] for v in record["vectors"]):
        warnings.append("some inputs carry no DP guarantee (see `taskvec inspect`)")
    return MergeReport(Path(out), identity, plan.method, scale, record, warnings)


def merge_vectors(
    vectors: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    plan: MergePlan | None = None,
    *,
    force: bool = False,
    track: Track[Any] = no_track,
    diagnostics: bool = False,
    calibrate: Calibrator | None = None,
    select: Calibrator | None = None,
    contributions: Calibrator | None = None,
    **options: Any,
) -> MergeReport:
    """Merge data vectors into `base + λ·combine(vectors)` and save it as a taskvec model file.

    `plan` (else `MergePlan.create(vectors, base, **options)`: method, params, density, scale, seed, budget,
    exclude_outliers) says how. `diagnostics` (implied by the plan's `exclude_outliers`) records
    `diagnose`. The three hooks take a `taskvec.merging.calibrate.Calibrator` on the merger's validation data:
    `select` chooses the method and λ, `calibrate` chooses λ, `contributions` records each vector's
    leave-one-out value. Nothing is written when anything fails.
    """
    check_output(out, force, inputs=[base, *vectors])
    plan = plan or MergePlan.create(vectors, base, **options)
    bh, headers = plan.open()
    extra: dict[str, Any] = {}
    if diagnostics or plan.exclude_outliers:
        found = diagnose(headers, track)
        extra["diagnostics"] = [vars(d) for d in found]
        if plan.exclude_outliers:
            flagged = {d.sha256 for d in found if d.flag}
            extra["excluded"] = [{"sha256": d.sha256, "contributor": d.contributor, "reason": d.flag}
                                 for d in found if d.flag]
            headers = [h for h in headers if h.vector.sha256 not in flagged]
            plan.check_inputs(bh, headers)
    scale = None
    if plan.recipe.head is not None and (select is not None or contributions is not None):
        raise ConfigError("a merge that solves a head from statistics takes no method selection or leave-one-out "
                          "contributions", field="select" if select is not None else "contributions")
    if select is not None:
        plan, comb, scale, extra["selection"] = select.select(plan, bh, headers)
    else:
        comb = accumulate(plan, bh, headers, track).combined(plan.recipe)
        solve(comb.deltas, bh, headers, plan.recipe)
        if calibrate is not None:
            scale, extra["calibration"] = calibrate(bh, comb)
    if contributions is not None:
        extra["contributions"] = contributions.contributions(plan, bh, headers, plan.scale if scale is None else scale)
    report = save_merged(bh, comb, headers, out, plan=plan, scale=scale, force=force, extra=extra)
    chosen = [k for k in ("selection", "calibration", "contributions") if k in extra]
    if chosen and any(h.vector.privacy for h in headers):
        report.warnings.append(
            f"the {' and '.join(chosen)} recorded in the merged model (with λ and any re-estimated BatchNorm "
            "statistics) are computed from the merger's data without noise: the model's DP guarantees cover the "
            "sites' vectors, not that data; use data that may be disclosed")
    return report
