"""Data vectors: `finetuned − base` for floating parameters, optionally clipped and noised, as safetensors.

Deltas are computed in fp32. Integer buffers never enter a vector. BatchNorm running statistics are stored
as values (merged by averaging), not as deltas. Export-time noise is added in fp32 before any cast.

A DP release (a vector whose ledger is not empty) carries nothing computed from the private data except its
noised tensors (or the DP-SGD model they come from) and what the user declared public: no norms of the
un-noised delta, no identity of the un-noised model, no sample count unless one is passed explicitly.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from taskvec.errors import FileFormatError, PrivacyConfigError, PrivacyError
from taskvec.io.files import FLOAT_DTYPES, Header, check_output, file_digest, now, read_header, read_kind
from taskvec.io.layout import check_against_base, is_statistic
from taskvec.io.schema import MAX_COUNT, BaseRef, LedgerEntry, ModelHeader, VectorHeader, check_contributor
from taskvec.io.tensors import CAST_DTYPES, TORCH_TO_ST, all_finite, save_tensors, state_digest
from taskvec.models.spec import resolve_model_path
from taskvec.privacy.ledger import locked_releases, read_releases, record_release, releases_path
from taskvec.privacy.mechanisms.gaussian_output import NoiseRequest, gaussian_output_entries
from taskvec.training.modes import VectorLayout, parse_mode


@dataclass
class ExportReport:
    """What an export did. The norms are of the un-noised delta: for the site's eyes only, never in the file
    of a noised vector."""

    path: Path
    sha256: str
    num_params: int
    pre_clip_norm: float
    post_clip_norm: float
    expected_noise_norm: float
    privacy: list[dict[str, Any]]
    statistics: int
    warnings: list[str] = field(default_factory=list)


def _check_finetuned(base: Header, ft: Header) -> None:
    if ft.kind == "vector":
        raise FileFormatError(f"{ft.path}: is a data vector; export takes a fine-tuned model or state_dict")
    check_against_base(ft, base)


def read_deltas(
    base: Header, ft: Header
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(fp32 deltas, fp32 values of the BatchNorm statistics that changed, the vector's layout fields).

    Only what the run's training mode carries (its `training.train` record, `taskvec.training.modes`): every
    key, a subset, and deltas the mode factors (a merged adapter's, as its exact low-rank factors)."""
    layout = VectorLayout.from_record((_model_of(ft).training or {}).get("train"))
    deltas: dict[str, torch.Tensor] = {}
    stats: dict[str, torch.Tensor] = {}
    with safe_open(str(base.path), "pt") as fb, safe_open(str(ft.path), "pt") as ff:
        for k in sorted(base.tensors):
            skipped = not layout.carries(k) and not is_statistic(k)  # not trained: no delta
            if base.tensors[k].dtype not in FLOAT_DTYPES or skipped:
                continue
            t = ff.get_tensor(k).to(torch.float32)
            if not all_finite(t):
                raise FileFormatError(f"{ft.path}: tensor {k} holds NaN or Inf; the fine-tuning diverged")
            b = fb.get_tensor(k).to(torch.float32)
            if is_statistic(k):
                if not torch.equal(t, b):  # frozen statistics are the base's: nothing to carry
                    stats[k] = t
            else:
                deltas.update(layout.encode(k, t - b))
    factors = {k: {"rank": r, "shape": list(base.tensors[k].shape)} for k, r in layout.factored.items()}
    return deltas, stats, {"train": layout.mode, "subset": layout.subset, "factors": factors}


def l2_norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


def clip_(tensors: dict[str, torch.Tensor], clip: float | None) -> tuple[float, float]:
    """Scale the tensors, as one vector, to L2 norm ≤ `clip` in place; return the norm before and after."""
    pre = l2_norm(tensors)
    if clip is None or pre <= clip:
        return pre, pre
    for t in tensors.values():
        t.mul_(clip / pre)
    return pre, clip


def draw_noise(shape: torch.Size, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, σ²) per coordinate (fp32). The one place export noise comes from: audits replace it in tests."""
    return torch.randn(shape, generator=generator, dtype=torch.float32) * sigma


def add_noise_(tensors: dict[str, torch.Tensor], sigma: float, generator: torch.Generator) -> None:
    """The Gaussian mechanism's noise, added in place to every tensor."""
    for t in tensors.values():
        t.add_(draw_noise(t.shape, sigma, generator))


def _check_history(earlier: list[dict[str, Any]], noised: bool, force: bool, where: Path, record: Path) -> None:
    """Refuse an export that would make the run's earlier claims false."""
    before = [r["noise_multiplier"] is not None for r in earlier]
    if noised and not all(before):
        raise PrivacyError(
            f"{where}: this run was already exported without export-time noise (see {record}); a noised export "
            "cannot give a site-level guarantee for data already released without it", path=where)
    if not noised and any(before) and not force:
        raise PrivacyError(
            f"{where}: this run was exported with noise before (see {record}); sharing an un-noised vector of it "
            "would make those vectors' guarantees false. Pass `force` to export it anyway", path=where,
            field="force")


def export_vector(
    finetuned: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    clip: float | None = None,
    noise_multiplier: float | None = None,
    epsilon: float | None = None,
    delta: float | None = None,
    dtype: str = "fp32",
    contributor: str | None = None,
    samples: int | None = None,
    force: bool = False,
) -> ExportReport:
    """Write the data vector `finetuned − base` to `out` and return what was done.

    With `clip` the whole delta is scaled to L2 norm ≤ clip. With a noise multiplier z (or `epsilon`, which
    solves z for what the run's earlier exports left of it) every coordinate gets N(0, (z·clip)²) from a
    secret generator: see `taskvec.privacy.mechanisms.gaussian_output` for the guarantees recorded.
    Statistics (BatchNorm running mean/var) carry no noise, so a noised export leaves them out. `samples`
    declares the sample count public; a DP release carries none otherwise. `force` overwrites `out` and allows
    an un-noised export of a run exported with noise before.

    Every export is recorded, before the vector is written and under a lock, in `privacy_releases.json`
    beside the fine-tuned model, keyed by its run id (or content identity). That record holds this folder's
    exports only: a copy of the model file elsewhere keeps its own, so the ε a vector records (and the one
    `epsilon` aims at) covers its own folder's exports; a merge composes the releases of every copy it is given.
    """
    check_output(out, force, inputs=[finetuned, base])
    if dtype not in CAST_DTYPES:
        raise PrivacyConfigError(f"dtype must be one of {', '.join(CAST_DTYPES)}, got {dtype!r}", field="dtype")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int)
                                or not 1 <= samples <= MAX_COUNT):
        raise PrivacyConfigError(f"samples must be an integer in 1..2**53, got {samples!r}", field="samples")
    request = NoiseRequest(clip, noise_multiplier, epsilon, delta)
    request.check()
    bh = read_kind(base, "model")
    fh = read_header(resolve_model_path(finetuned))
    _check_finetuned(bh, fh)
    contributor = check_contributor(contributor if contributor is not None else
                                    (_model_of(fh).training or {}).get("contributor") or "anonymous")
    released = released_statistics(fh)
    if released is not None:
        return _export_statistics(bh, fh, released, out, request, dtype, contributor, samples, force)
    deltas, stats, layout = read_deltas(bh, fh)
    pre, post = clip_(deltas, clip)
    record = releases_path(fh.path)
    fm = _model_of(fh)
    key = str(fm.run_id or fm.identity or file_digest(fh))
    with locked_releases(record):
        earlier = read_releases(record, key)
        _check_history(earlier, request.noised, force, fh.path, record)
        release = _release(bh, fh, deltas, stats, layout, request, earlier, dtype, contributor, samples, (pre, post))
        record_release(record, key, {"vector": release.header.sha256, "noise_multiplier": release.z, "clip": clip,
                                     "delta": delta, "created": release.header.created})
    path = save_tensors(release.tensors, out, release.header, force=force)
    noise = (release.header.norm or {}).get("expected_noise", 0.0)
    return ExportReport(path, release.header.sha256, sum(d.numel() for d in deltas.values()), pre, post, noise,
                        release.header.privacy, len(release.header.statistics), _warnings(release, clip, earlier))


def _model_of(h: Header) -> ModelHeader:
    """The typed header of a fine-tuned model file; an empty one (no run, no ledger) for a plain state_dict."""
    return h.model if h.kind == "model" else ModelHeader(identity="", model={})


@dataclass
class _Release:
    tensors: dict[str, torch.Tensor]
    header: VectorHeader
    z: float | None
    left_out: int


def _release(
    bh: Header, fh: Header, deltas: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], layout: dict[str, Any],
    request: NoiseRequest,
    earlier: list[dict[str, Any]], dtype: str, contributor: str, samples: int | None,
    norms: tuple[float, float],
) -> _Release:
    """Noise the (clipped) deltas as requested and build the vector's tensors and header."""
    from taskvec.privacy.dpsgd import secret_generator

    fm, base = _model_of(fh), bh.model
    privacy = fm.ledger
    declared = ["samples"] if samples is not None else []
    z, left_out = None, 0
    if request.noised:
        assert request.clip is not None and request.delta is not None
        zs = [r["noise_multiplier"] for r in earlier]
        z = request.solve(zs)
        privacy += _noise_entries(request, [*zs, z], fm.run_id, declared)
        add_noise_(deltas, z * request.clip, secret_generator("cpu"))
        stats, left_out = {}, len(stats)
    training = fm.training or {}
    cast = CAST_DTYPES[dtype]
    tensors = {k: v.to(cast) for k, v in deltas.items()} | stats
    unheld = next((k for k, v in tensors.items() if not all_finite(v)), None)
    if unheld is not None:
        other = "" if dtype == "fp32" else ", or in fp32"
        raise PrivacyConfigError(f"dtype {dtype} does not hold the vector: tensor {unheld} is NaN or Inf after "
                                 f"clipping, noise and casting; export with a smaller clip or noise{other}",
                                 field="dtype", got=dtype)
    if z is None:  # without export noise, these are the released tensors' own (or a DP-SGD model's)
        source, norm = {"run_id": fm.run_id, "identity": fm.identity or None}, {"pre_clip": norms[0],
                                                                                "post_clip": norms[1]}
    else:
        assert request.clip is not None
        source = {"run_id": fm.run_id}
        norm = {"expected_noise": z * request.clip * math.sqrt(sum(d.numel() for d in deltas.values()))}
    header = VectorHeader(
        sha256=state_digest(tensors),
        base=BaseRef(base.identity, base.arch, base.number, base.versions()[:-1]),
        contributor=contributor,
        task=base.task, labels=base.labels,
        samples=samples if privacy or samples is not None else training.get("samples"),
        created=now(), dtype=TORCH_TO_ST[cast], statistics=sorted(stats), **layout,
        source=source, clip=request.clip, noise_multiplier=z, privacy=privacy,
        declared_public=declared if privacy else None, norm=norm,
    )
    return _Release(tensors, header, z, left_out)


def _noise_entries(request: NoiseRequest, zs: list[float], run_id: str | None,
                   declared: list[str]) -> list[dict[str, Any]]:
    """The ledger entries of export noise `zs` (this run's releases, this one last), refused unless each has a
    finite ε: a noise multiplier too small or too large for the accountant gives none."""
    assert request.clip is not None and request.delta is not None
    try:
        entries = gaussian_output_entries(zs, request.clip, request.delta, run_id, declared)
    except ArithmeticError as e:
        entries, problem = [], str(e)
    else:
        problem = "" if all(math.isfinite(e["epsilon"]) for e in entries) else "ε is infinite"
    if problem:
        fld = "noise_multiplier" if request.noise_multiplier is not None else "epsilon"
        raise PrivacyConfigError(f"{fld} {getattr(request, fld):.3g} gives no finite ε (noise multiplier "
                                 f"{zs[-1]:.3g}: {problem}); give a larger noise multiplier or a smaller epsilon",
                                 field=fld, got=getattr(request, fld))
    return entries


def _warnings(release: _Release, clip: float | None, earlier: list[dict[str, Any]]) -> list[str]:
    out = []
    if release.z is None and any(r["noise_multiplier"] is not None for r in earlier):
        out.append("this run was exported with noise before: once this un-noised vector is shared, the guarantees "
                   "of the earlier vectors no longer hold")
    if release.z is not None and earlier:
        eps = LedgerEntry.from_json(release.header.privacy[-2]).epsilon
        out.append(f"release {len(earlier) + 1} of this run: ε composes over all its noised exports (now {eps:.3g} "
                   "per site, add-remove)")
    if release.left_out:
        out.append(f"left out {release.left_out} BatchNorm statistics tensors: they would be released without "
                   "noise; the merge keeps the base's statistics (or re-estimates them by calibration)")
    if release.z is None and clip is not None and not release.header.privacy:
        out.append("clipping without noise is not differential privacy; the vector is recorded as 'no DP'")
    return out


def released_statistics(fh: Header) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The tensors and `sufficient` record a run's mode releases instead of deltas (None: deltas)."""
    if fh.kind != "model":
        return None
    fm = fh.model
    mode = VectorLayout.from_record((fm.training or {}).get("train")).mode
    return parse_mode(mode).release(fh.path, fm.run_id, fm.parent)


def _export_statistics(bh: Header, fh: Header, released: tuple[dict[str, Any], dict[str, Any]],
                       out: str | os.PathLike[str], request: NoiseRequest, dtype: str, contributor: str | None,
                       samples: int | None, force: bool) -> ExportReport:
    """The vector of a statistics run (`taskvec.merging.heads`): released by the run itself, so export adds no
    clip or noise and keeps float64."""
    from taskvec.merging.heads import export_statistics

    refused = [name for name, value in (("clip", request.clip), ("noise_multiplier", request.noise_multiplier),
                                        ("epsilon", request.epsilon), ("samples", samples)) if value is not None]
    if refused or dtype != "fp32":
        fld = refused[0] if refused else "dtype"
        raise PrivacyConfigError(f"{fld} does not apply to a statistics vector: its run released the statistics "
                                 "(noised under DP) and export writes them as they are", field=fld)
    header = export_statistics(bh, fh, *released, out, contributor, force)
    noise = header.extra["sufficient"].get("noise_std") or {}
    expected = math.sqrt(sum(noise.get(k.rsplit(".", 1)[1], 0.0) ** 2 * v.size for k, v in released[0].items()))
    return ExportReport(Path(out), header.sha256, sum(v.size for v in released[0].values()), math.nan, math.nan,
                        expected, header.privacy, 0)
