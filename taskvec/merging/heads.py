"""Vectors of sufficient statistics (`taskvec.training.sufficient`): their export, the checks a merge makes of
them, and the head an `lda-head` or `ridge-head` merge solves from their sums.

A statistics vector carries the tensors `sufficient.counts`, `.sums`, `.moments` and `.log_norms` (float64)
and a header record `sufficient`: the features they describe (`features`: the backbone's content identity,
architecture, feature dimension, projection), the weight and bias keys of the layer solved (`head`: a
classifier, or a segmentation head's convolution, whose weight is the solved matrix reshaped), the clip of the
projected unit features (null without DP; under DP each site's own, around its `centre`), the unit and the sd
of each tensor's noise (`noise_std`, null without DP; the sum's sd is √Σ σᵢ² over the vectors). Statistics
are summed only when every record agrees on the features and the head, the features' backbone is the merge
base's, the head is the layer a statistics head solves on the base, and the clip and noise sds are those the
vector's release implies (none without a release; then counts are non-negative and the moments positive
semidefinite). Weight vectors and
statistics vectors are never merged together, nor statistics onto a version whose head was already solved from
statistics (the new head would drop them: every site's statistics are merged at once, onto the base). The
sums are exact (float64, no weighting or staleness discount: the counts weigh each site, and the features are
checked to be the base's). The merged model is the base with that layer replaced by base + λ·(solved − base)
(λ = 1: the solved head).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from taskvec.errors import ConfigError, FileFormatError, MismatchError
from taskvec.io.files import Digest, Header, digest, now, open_regular
from taskvec.io.layout import SUFFICIENT
from taskvec.io.schema import BaseRef, VectorHeader
from taskvec.io.tensors_np import as_float64, save_arrays
from taskvec.merging.methods import Recipe
from taskvec.training import sufficient

CHECKED = ("features.backbone", "features.arch", "features.dim", "features.projection.dim",
           "features.projection.seed", "head")  # what statistics summed together must share


def is_statistics(h: Header) -> bool:
    """Whether a vector carries sufficient statistics rather than weight deltas."""
    return "sufficient" in h.meta


def _field(record: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        record = record.get(part) if isinstance(record, dict) else None  # type: ignore[assignment]
    return record


def backbone_identity(h: Header, head: Sequence[str]) -> str:
    """Content identity of a model file's tensors outside its classifier (`head`): what its features depend
    on. Equals `taskvec.io.tensors.state_digest` of the same tensors."""
    d = Digest()
    with open_regular(h.path) as f:
        for name in sorted(set(h.tensors) - set(head)):
            t = h.tensors[name]
            f.seek(h.data_start + t.start)
            d.update(name, t.dtype, t.shape, f.read(t.end - t.start))
    return d.hexdigest()


def check_statistics(base: Header, headers: Sequence[Header], recipe: Recipe, method: str) -> None:
    """Refuse statistics mixed with weight vectors, statistics under a method that does not solve a head (or
    weights under one that does), and statistics of different features or of another backbone than `base`'s."""
    stats = [h for h in headers if is_statistics(h)]
    weights = [h for h in headers if not is_statistics(h)]
    if stats and weights:
        raise MismatchError(f"{weights[0].path}: carries weight deltas, {stats[0].path} sufficient statistics; a "
                            "merge takes one kind (merge the statistics into a head, then vectors against it)",
                            path=weights[0].path, field="sufficient")
    if stats and recipe.head is None:
        raise ConfigError(f"{stats[0].path}: carries sufficient statistics, which a head-solving method merges, "
                          f"not {method}", field="method", got=method)
    if weights and recipe.head is not None:
        raise ConfigError(f"method {method} solves a head from sufficient statistics; {weights[0].path} carries "
                          "weight deltas", field="method", got=method)
    if not stats:
        return
    first = stats[0].meta["sufficient"]
    for h in stats[1:]:
        record = h.meta["sufficient"]
        for fld in CHECKED:
            if _field(record, fld) != _field(first, fld):
                raise MismatchError(f"{h.path}: sufficient.{fld} is {str(_field(record, fld))[:16]}, "
                                    f"{stats[0].path} has {str(_field(first, fld))[:16]}: statistics of different "
                                    "features are never summed", path=h.path, field=f"sufficient.{fld}")
    for h in stats:
        _check_noise(h)
    if any(v.statistics for _, v in base.model.merged_summaries()):
        raise MismatchError(
            f"{base.path}: its head was already solved from sufficient statistics; a head-solving merge onto it "
            "would replace that head with these vectors' alone. Merge every site's statistics in one merge onto "
            "the base they describe (or add them one by one to an incremental merge's state)",
            path=base.path, field="base")
    from taskvec.training.modes.stats_head import solved_keys_of  # torch and timm: statistics merges only

    if first["features"]["arch"] != base.model.arch:
        raise MismatchError(f"{stats[0].path}: sufficient.features.arch is {first['features']['arch']}, base "
                            f"{base.path}'s is {base.model.arch}", path=stats[0].path, field="sufficient.features.arch")
    solved = solved_keys_of(base.model)
    if list(first["head"]) != solved:
        raise MismatchError(f"{stats[0].path}: sufficient.head is {first['head']}, but on base {base.path} a "
                            f"statistics head solves {solved}", path=stats[0].path, field="sufficient.head")
    backbone = backbone_identity(base, first["head"])
    if first["features"]["backbone"] != backbone:
        raise MismatchError(f"{stats[0].path}: sufficient.features.backbone is {first['features']['backbone'][:12]}, "
                            f"base {base.path}'s is {backbone[:12]}: they describe another backbone's features",
                            path=stats[0].path, field="sufficient.features.backbone")


def _check_noise(h: Header) -> None:
    """Refuse a statistics vector whose clip and noise sds are not those of its ledger's release of noise
    multiplier z: centred (`centre`) at the share ρ = `sufficient.CENTRE_SHARE`, a clip b_c in [b·
    `sufficient.MIN_CENTRE_CLIP`, b] (b the public bound of its features) and σ = `sufficient.noise_std`(z/√(1−ρ),
    b_c); without a centre, the clip b and σ = `noise_std`(z, b); none of them without a release."""
    record = h.meta["sufficient"]
    releases = [e for e in h.vector.privacy if isinstance(e, dict) and e.get("run_id") == h.vector.run_id]
    z = releases[-1].get("noise_multiplier") if releases else None
    features = record["features"]
    share = (record.get("centre") or {}).get("share")
    if z is None:
        if share is not None:
            raise FileFormatError(f"{h.path}: sufficient.centre is {str(record['centre'])[:40]}, but it records no "
                                  "DP release", path=h.path, field="sufficient.centre")
        want: tuple[Any, Any] = (None, None)  # no release: no noise
    elif isinstance(z, (int, float)) and not isinstance(z, bool) and 0 < z < math.inf:
        if share is not None and share != sufficient.CENTRE_SHARE:
            raise FileFormatError(f"{h.path}: sufficient.centre is of share {share}, but a statistics head's centre "
                                  f"release is of share {sufficient.CENTRE_SHARE}", path=h.path,
                                  field="sufficient.centre")
        bound = sufficient.clip_bound(features["dim"], features["projection"]["dim"])
        clip = record.get("clip")
        if share is None or not bound * sufficient.MIN_CENTRE_CLIP <= (clip or 0) <= bound:
            clip = bound  # without a centre the clip is b, with one at most b
        want = (clip, sufficient.noise_std(float(z) / math.sqrt(1 - (share or 0.0)), clip))
    else:
        raise FileFormatError(f"{h.path}: its release's noise_multiplier is {z!r}, not a positive number",
                              path=h.path, field="privacy")
    for fld, got, expected in zip(("clip", "noise_std"), (record.get("clip"), record.get("noise_std")), want):
        if not _close(got, expected):
            why = "it records no DP release" if z is None else f"its release (noise multiplier {z}) implies {expected}"
            raise FileFormatError(f"{h.path}: sufficient.{fld} is {got}, but {why}", path=h.path,
                                  field=f"sufficient.{fld}")


def _close(got: Any, want: Any) -> bool:
    """Whether a recorded number (or dict of them, or None) is the one expected, to float precision."""
    if got is None or want is None:
        return got is want
    if isinstance(want, dict):
        return all(math.isclose(got[k], v, rel_tol=1e-9) for k, v in want.items())
    return math.isclose(got, want, rel_tol=1e-9)


def check_exact(h: Header, key: str, x: np.ndarray) -> None:
    """Refuse statistics without noise that no data gives: a negative count, or second moments that are not a
    symmetric positive semidefinite matrix (under DP the noise makes both possible)."""
    record = h.meta["sufficient"]
    if record.get("noise_std") is not None:
        return
    if key == sufficient.KEYS["counts"] and (x < 0).any():
        raise FileFormatError(f"{h.path}: {key} holds a negative count without noise", path=h.path, field=key)
    if key == sufficient.KEYS["moments"]:
        p = record["features"]["projection"]["dim"]
        m = x.reshape(p, p)
        scale = max(float(np.abs(m).max()), np.finfo(np.float64).tiny)
        if not np.allclose(m, m.T, rtol=0, atol=1e-9 * scale) or np.linalg.eigvalsh(m).min() < -1e-9 * p * scale:
            raise FileFormatError(f"{h.path}: {key} is not a positive semidefinite matrix, as second moments "
                                  "without noise are", path=h.path, field=key)


def noise_std(headers: Sequence[Header]) -> dict[str, float]:
    """The sd of each summed statistic's noise: √Σ σᵢ² over the vectors."""
    return {k: math.sqrt(sum((h.meta["sufficient"].get("noise_std") or {}).get(k, 0.0) ** 2 for h in headers))
            for k in sufficient.KEYS}


def solve(deltas: dict[str, np.ndarray], base: Header, headers: Sequence[Header], recipe: Recipe) -> None:
    """Replace the summed statistics in a merge's combined `deltas` by the classifier's delta from the base to
    the solved head, in place (nothing to do for weight vectors)."""
    if recipe.head is None:
        return
    record = headers[0].meta["sufficient"]
    features = record["features"]
    k = base.tensors[record["head"][0]].shape[0]
    p = features["projection"]["dim"]
    shapes = {"counts": (k,), "sums": (k, p), "moments": (p, p), "log_norms": (1,)}
    stats = {name: deltas.pop(key).astype(np.float64).reshape(shapes[name])
             for name, key in sufficient.KEYS.items()}
    proj = sufficient.projection(features["projection"]["seed"], features["dim"], p)
    solver, strength = recipe.head
    what = f"{len(headers)} statistics vector(s) ({', '.join(h.path.name for h in headers[:3])})"
    head = sufficient.solve(solver, stats, proj, strength, noise_std(headers), what)
    with open_regular(base.path) as f:
        for key, value in zip(record["head"], head):
            t = base.tensors[key]
            f.seek(base.data_start + t.start)
            delta = value.ravel() - as_float64(f.read(t.end - t.start), t.dtype)
            if np.abs(delta).max(initial=0.0) > np.finfo(np.float32).max:
                raise FileFormatError(f"{what}: the head solved from these statistics is out of float32's range "
                                      "(statistics out of range)", field=key)
            deltas[key] = delta.astype(np.float32)


def export_statistics(base: Header, model: Header, tensors: dict[str, np.ndarray], record: dict[str, Any],
                      out: str | os.PathLike[str], contributor: str | None, force: bool) -> VectorHeader:
    """Write the vector of a statistics run: its tensors (float64) and `record`, checked against `base`."""
    bm, fm = base.model, model.model
    backbone = backbone_identity(base, record["head"])
    if record["features"]["backbone"] != backbone:
        raise MismatchError(f"{model.path}: its statistics describe backbone {record['features']['backbone'][:12]}, "
                            f"base {base.path}'s is {backbone[:12]}", path=model.path,
                            field="sufficient.features.backbone")
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()}
    if set(arrays) != set(SUFFICIENT) or not all(np.isfinite(v).all() for v in arrays.values()):
        raise FileFormatError(f"{model.path}: its statistics are not the {len(SUFFICIENT)} finite tensors "
                              f"{', '.join(SUFFICIENT)}", path=model.path)
    training = fm.training or {}
    header = VectorHeader(
        sha256=digest((k, "F64", arrays[k].shape, arrays[k].data.cast("B")) for k in sorted(arrays)),
        base=BaseRef(bm.identity, bm.arch, bm.number, bm.versions()[:-1]),
        contributor=contributor or training.get("contributor") or "anonymous",
        task=bm.task, labels=bm.labels, samples=None if fm.ledger else training.get("samples"),
        created=now(), dtype="F64", train=(training.get("train") or {}).get("mode"), subset=True, factors={},
        source={"run_id": fm.run_id}, privacy=fm.ledger, declared_public=[] if fm.ledger else None,
        extra={"sufficient": record},
    )
    save_arrays({k: ("F64", v.shape, v) for k, v in arrays.items()}, out, header.to_json(), force=force)
    return header
