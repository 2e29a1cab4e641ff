"""Diagnostics: one streaming pass that compares every vector with the coordinate-wise median of all of them
and flags the outliers (scaled, sign-flipped, noise or another task's vector)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from taskvec.io.files import Header
from taskvec.io.layout import is_statistic
from taskvec.merging.reading import Reading
from taskvec.progress import Track, no_track


@dataclass
class Diagnosis:
    """One vector against the others: L2 norm, cosine to the coordinate-wise median of all vectors, share of
    coordinates whose sign agrees with the median's (where it is non-zero), and why it is flagged (or None)."""

    file: str
    contributor: str
    sha256: str
    norm: float
    cosine: float
    sign_agreement: float
    flag: str | None = None


SCALED = 10.0  # flagged: norm above this many times the median norm
UNRELATED = 0.25  # flagged: cosine to the median below this fraction of the median cosine


def diagnose(headers: Sequence[Header], track: Track[Any] = no_track) -> list[Diagnosis]:
    """Per-vector diagnostics over the delta tensors, and a one-line reason for each outlier (from 3 vectors on).

    Flags: a norm over 10× the median norm (a scaled vector), a negative cosine to the median direction (a
    sign-flipped vector), a cosine under a quarter of the median cosine (noise, or another task's vector)."""
    n = len(headers)
    dot, sq, agree = np.zeros(n), np.zeros(n), np.zeros(n)
    med_sq, nonzero = 0.0, 0
    with Reading(headers) as reading:
        keys = sorted(set().union(*(h.tensors for h in headers)))
        for k in track(keys, "diagnosing", len(keys)):
            if is_statistic(k):
                for f in reading.files:
                    if k in f.header.tensors:
                        f.read(k)  # hashed, not diagnosed
                continue
            for _, _, x in reading.chunks(k, headers[0].tensors[k].numel):
                x64 = x.astype(np.float64)
                med = np.median(x64, axis=0)
                dot += x64 @ med
                sq += np.einsum("ij,ij->i", x64, x64)
                med_sq += float(med @ med)
                live = med != 0
                nonzero += int(live.sum())
                agree += (np.sign(x64[:, live]) == np.sign(med[live])).sum(1)
        reading.verify()
    norms = np.sqrt(sq)
    cos = dot / np.maximum(norms * math.sqrt(med_sq), 1e-30)
    out = [Diagnosis(str(h.path), h.vector.contributor, h.vector.sha256, float(norms[i]), float(cos[i]),
                     float(agree[i] / max(nonzero, 1))) for i, h in enumerate(headers)]
    if n >= 3:
        med_norm, med_cos = float(np.median(norms)), float(np.median(cos))
        for d in out:
            if d.norm > SCALED * med_norm:
                d.flag = f"norm {d.norm:.3g} is {d.norm / med_norm:.1f}× the median norm (a scaled vector?)"
            elif d.cosine < 0:
                d.flag = (f"points against the median direction (cosine {d.cosine:.2f}, signs agree on "
                          f"{d.sign_agreement:.0%}): a sign-flipped vector?")
            elif d.cosine < UNRELATED * med_cos:
                d.flag = (f"cosine to the median direction {d.cosine:.3f}, under a quarter of the median cosine "
                          f"{med_cos:.3f} (noise, or another task?)")
    return out
