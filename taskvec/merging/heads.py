"""Vectors of sufficient statistics (`taskvec.training.sufficient`): their export, the checks a merge makes of
them, and the head an `lda-head` or `ridge-head` merge solves from their sums.

A statistics vector carries the tensors `sufficient.counts`, `.sums`, `.moments` and `.log_norms` (float64)
and a header record `sufficient`: the features they describe (`features`: the backbone's content identity,
architecture, feature dimension, projection), the weight and bias keys of the layer solved (`head`: a
classifier, or a segmentation head's convolution, whose weight is the solved matrix reshaped), the clip of the
projected unit features (null without DP), the unit and the sd of each tensor's noise (`noise_std`, null
without DP; the sum's sd is √Σ σᵢ² over the vectors). Statistics are summed only when every record agrees
on the features, the head and the clip, and the features' backbone is the merge base's; weight vectors and
statistics vectors are never merged together. The sums are exact (float64, no weighting or staleness
discount: the counts weigh each site, and the features are checked to be the base's). The merged model is the
base with that layer replaced by base + λ·(solved − base) (λ = 1: the solved head).
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
           "features.projection.seed", "head", "clip")  # what statistics summed together must share


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
    backbone = backbone_identity(base, first["head"])
    if first["features"]["backbone"] != backbone:
        raise MismatchError(f"{stats[0].path}: sufficient.features.backbone is {first['features']['backbone'][:12]}, "
                            f"base {base.path}'s is {backbone[:12]}: they describe another backbone's features",
                            path=stats[0].path, field="sufficient.features.backbone")


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
    head = sufficient.SOLVERS[solver](stats, proj, strength, noise_std(headers))
    with open_regular(base.path) as f:
        for key, value in zip(record["head"], head):
            t = base.tensors[key]
            f.seek(base.data_start + t.start)
            deltas[key] = (value.ravel() - as_float64(f.read(t.end - t.start), t.dtype)).astype(np.float32)


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
