"""Data vectors: `finetuned − base` for floating parameters, optionally clipped and noised, as safetensors.

Deltas are computed in fp32. Integer buffers never enter a vector. BatchNorm running statistics are stored
as values (merged by averaging), not as deltas. Export-time noise is added in fp32 before any cast.
"""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from taskvec.errors import ConfigError, FileFormatError, PrivacyConfigError, PrivacyError, check_range
from taskvec.io.files import (
    FLOAT_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    Header,
    check_output,
    file_digest,
    now,
    read_header,
    read_kind,
)
from taskvec.io.layout import check_against_base, is_statistic
from taskvec.io.tensors import CAST_DTYPES, TORCH_TO_ST, all_finite, save_tensors, state_digest
from taskvec.models.spec import resolve_model_path
from taskvec.privacy.ledger import (
    gaussian_noise_multiplier,
    gaussian_output_entry,
    read_releases,
    record_release,
    releases_path,
)


@dataclass
class ExportReport:
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


def _resolve_noise(
    clip: float | None, noise_multiplier: float | None, epsilon: float | None, delta: float | None
) -> float | None:
    if clip is not None:
        check_range("clip", clip, low=0, error=PrivacyConfigError)
    if noise_multiplier is not None and epsilon is not None:
        raise PrivacyConfigError("noise_multiplier and `epsilon` exclude each other: give one",
                                 field="noise_multiplier")
    if (noise_multiplier is not None or epsilon is not None) and clip is None:
        raise PrivacyConfigError("clip is needed for noise to give a guarantee: it is the sensitivity", field="clip")
    if epsilon is not None:
        if delta is None:
            raise PrivacyConfigError("delta is needed with `epsilon` (for example 1e-5)", field="delta")
        return gaussian_noise_multiplier(epsilon, delta)
    if noise_multiplier is not None:
        check_range("noise_multiplier", noise_multiplier, low=0, error=PrivacyConfigError)
        if delta is None:
            raise PrivacyConfigError("delta is needed with `noise_multiplier` to report ε (for example 1e-5)",
                                     field="delta")
    return noise_multiplier


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
    seed: int | None = None,
    force: bool = False,
) -> ExportReport:
    """Write the data vector `finetuned − base` to `out` and return what was done.

    With `clip` the whole delta is scaled to L2 norm ≤ clip. With a noise multiplier Z (or ε, δ) every
    coordinate gets N(0, (Z·clip)²): one release of the Gaussian mechanism with sensitivity `clip` over
    the site's whole contribution, accounted with the analytic Gaussian mechanism. Statistics
    (BatchNorm running mean/var) carry no noise, so a noised export leaves them out.

    Every export is recorded in `privacy_releases.json` beside the fine-tuned model, keyed by its run id
    (or content identity); the ε of a noised export is that of all noised exports of the run composed.
    """
    check_output(out, force)
    if dtype not in CAST_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(CAST_DTYPES)}, got {dtype!r}", field="dtype",
                          expected=list(CAST_DTYPES), got=dtype)
    z = _resolve_noise(clip, noise_multiplier, epsilon, delta)
    bh = read_kind(base, "model")
    fh = read_header(resolve_model_path(finetuned))
    _check_finetuned(bh, fh)
    training = fh.meta.get("training", {})
    samples = samples if samples is not None else training.get("samples")
    if samples is not None and samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}", field="samples", expected=">= 1", got=samples)
    warnings: list[str] = []
    record = releases_path(fh.path)
    run_key = str(fh.meta.get("run_id") or fh.meta.get("identity") or file_digest(fh))
    earlier = read_releases(record, run_key)
    if z is not None and any(r["noise_multiplier"] is None for r in earlier):
        raise PrivacyError(
            f"{fh.path}: this run was already exported without export-time noise (see {record}); a new noised "
            "export cannot give a site-level guarantee for data already released without it"
        )
    if z is None and any(r["noise_multiplier"] is not None for r in earlier):
        warnings.append("this run was exported with noise before: once this un-noised vector is shared, the "
                        "site-level guarantee of the earlier vectors no longer holds")

    deltas: dict[str, torch.Tensor] = {}
    stats: dict[str, torch.Tensor] = {}
    with safe_open(str(bh.path), "pt") as fb, safe_open(str(fh.path), "pt") as ff:
        for k in sorted(bh.tensors):
            if bh.tensors[k].dtype not in FLOAT_DTYPES:
                continue
            ft = ff.get_tensor(k).to(torch.float32)
            if not all_finite(ft):
                raise FileFormatError(f"{fh.path}: tensor {k} holds NaN or Inf; the fine-tuning diverged")
            if is_statistic(k):
                stats[k] = ft
            else:
                deltas[k] = ft - fb.get_tensor(k).to(torch.float32)

    pre = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas.values()))
    post = pre
    if clip is not None and pre > clip:
        factor = clip / pre
        for d in deltas.values():
            d.mul_(factor)
        post = clip
    num = sum(d.numel() for d in deltas.values())
    privacy = list(fh.meta.get("privacy", []))
    noise_norm = 0.0
    if z is not None:
        assert clip is not None and delta is not None
        gen = torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))
        sigma = z * clip
        for d in deltas.values():
            d.add_(torch.randn(d.shape, generator=gen, dtype=torch.float32) * sigma)
        noise_norm = sigma * math.sqrt(num)
        privacy.append(gaussian_output_entry(z, clip, delta, fh.meta.get("run_id"), earlier))
        if earlier:
            warnings.append(f"release {len(earlier) + 1} of this run: ε composes over all its noised exports "
                            f"(now {privacy[-1]['epsilon']:.3g}; recorded in {record})")
        if stats:
            warnings.append(
                f"left out {len(stats)} BatchNorm statistics tensors: they would be released without noise; "
                "the merge keeps the base's statistics (or re-estimates them by calibration)"
            )
            stats = {}
    elif clip is not None:
        warnings.append("clipping without noise is not differential privacy; the vector is recorded as 'no DP'")

    cast = CAST_DTYPES[dtype]
    tensors = {k: v.to(cast) for k, v in deltas.items()} | stats
    sha = state_digest(tensors)
    bmodel = bh.meta["model"]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "vector",
        "base": {"identity": bh.meta["identity"], "arch": bmodel["arch"]},
        "task": bmodel["task"],
        "labels": bmodel["labels"],
        "contributor": contributor or training.get("contributor") or "anonymous",
        "samples": samples,
        "created": now(),
        "dtype": TORCH_TO_ST[cast],
        "statistics": sorted(stats),
        "source": {"identity": fh.meta.get("identity"), "run_id": fh.meta.get("run_id")},
        "norm": {"pre_clip": pre, "post_clip": post, "expected_noise": noise_norm},
        "clip": clip,
        "noise_multiplier": z,
        "privacy": privacy,
        "sha256": sha,
    }
    path = save_tensors(tensors, out, meta, force=force)
    record_release(record, run_key, {"vector": sha, "noise_multiplier": z, "clip": clip, "delta": delta,
                                     "created": meta["created"]})
    return ExportReport(path, sha, num, pre, post, noise_norm, privacy, len(stats), warnings)
