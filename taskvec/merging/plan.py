"""The merge plan: everything a merge depends on, validated once from headers alone (method and parameters,
λ, seed, staleness, privacy budget), and the checks of the input vectors against the base and its lineage."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from taskvec.errors import FileFormatError, MismatchError, TaskvecError, check_range, check_seed
from taskvec.io.files import Header, file_digest, read_kind
from taskvec.io.layout import check_against_base
from taskvec.io.lineage import DEFAULT_STALENESS, STALENESS_RULE, describe_versions, staleness_weight
from taskvec.io.schema import VectorSummary
from taskvec.merging.heads import check_statistics
from taskvec.merging.methods import DEFAULT_METHOD, Array, Recipe, get_method, vector_weights
from taskvec.privacy.ledger import PrivacyBudget, check_merge_budget


def check_vectors(base: Header, paths: Sequence[str | os.PathLike[str]]) -> list[Header]:
    """Validate every vector against the base from headers alone; fail fast naming the file and field.

    A vector may be against the base (version N) or any version in its lineage, recording that version's
    position; a vector already merged into one of them is refused."""
    if not paths:
        raise FileFormatError("no vectors given")
    ids = base.model.versions()
    merged = base.model.merged_vectors()
    headers: list[Header] = []
    seen: dict[str, Header] = {}
    for p in paths:
        h = read_kind(p, "vector")
        sha = h.vector.sha256
        check_against_base(h, base, versions=ids)
        _check_position(h, base, ids)
        if sha in merged:
            k = merged[sha]
            raise MismatchError(
                f"{h.path}: already merged into v{k} ({ids[k][:12]}), on which base {base.path} (v{len(ids) - 1}) "
                f"builds (sha256 {sha[:12]}); give only vectors not merged yet", path=h.path, field="sha256")
        if sha in seen:
            for same in (seen[sha], h):  # two files claiming one content: the same vector, or one altered
                if file_digest(same) != sha:
                    raise FileFormatError(f"{same.path}: content does not match its sha256; the file is corrupted",
                                          path=same.path, field="sha256")
            raise MismatchError(f"{h.path}: same vector as {seen[sha].path} (sha256 {sha[:12]}); give it once")
        seen[sha] = h
        headers.append(h)
    return headers


def _check_position(h: Header, base: Header, ids: Sequence[str]) -> None:
    """The version and lineage a vector records for its base must be where that base sits in `base`'s lineage
    (recorded, not looked up: a merge at λ = 0 has its parent's identity, so an identity may sit twice)."""
    identity, version, lineage = h.vector.base.identity, h.vector.base.number, h.vector.base.lineage or []
    if version < len(ids) and ids[version] == identity and lineage == list(ids[:version]):
        return
    k = ids.index(identity)
    fld = "base.version" if version != k else "base.lineage"
    raise MismatchError(
        f"{h.path}: records its base as v{version} with lineage {describe_versions(lineage) or '(none)'}, but "
        f"base {base.path} has {identity[:12]} as v{k} after {describe_versions(ids[:k]) or 'nothing'}",
        path=h.path, field=fld, expected=k, got=version)


def earlier_releases(base: Header) -> list[tuple[str, VectorSummary]]:
    """(where, summary) of every vector already merged into `base` or its lineage, for the privacy budget: its
    sha256, run id and ledger tell distinct releases and trainings apart (`check_merge_budget`)."""
    return [(f"{base.path} (v{k} input {v.sha256[:12]})", v) for k, v in base.model.merged_summaries()]


@dataclass(frozen=True)
class MergePlan:
    """Everything a merge depends on, validated once; full, incremental and calibrated merges take one, and
    the merged file records it whole (`record`). Build it with `MergePlan.create`."""

    vectors: tuple[Path, ...]
    base: Path
    method: str = DEFAULT_METHOD
    params: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0
    seed: int = 0
    budget: PrivacyBudget = field(default_factory=PrivacyBudget)
    exclude_outliers: bool = False
    staleness: float = DEFAULT_STALENESS

    @classmethod
    def create(
        cls, vectors: Sequence[str | os.PathLike[str]], base: str | os.PathLike[str], *, method: str = DEFAULT_METHOD,
        params: Mapping[str, Any] | None = None, density: float | None = None, scale: float = 1.0, seed: int = 0,
        budget: PrivacyBudget | None = None, exclude_outliers: bool = False, staleness: float = DEFAULT_STALENESS,
    ) -> MergePlan:
        """A checked plan: known method, parameters in range (`density` is shorthand for that parameter).

        `staleness` is the exponent a of the weight s = (1 + d)^(−a) of a vector fine-tuned from a version d
        versions older than the base (FedBuff, Nguyen et al. 2022; FedAsync, Xie et al. 2019); 0: no discount."""
        given = dict(params or {})
        if density is not None:
            given["density"] = density
        resolved = get_method(method).resolve(given)
        check_range("scale", scale)
        check_range("staleness", staleness, low=0, low_open=False)
        check_seed(seed)
        budget = budget or PrivacyBudget()
        budget.check()
        return cls(tuple(Path(v) for v in vectors), Path(base), method, resolved, float(scale), seed, budget,
                   exclude_outliers, float(staleness))

    @property
    def recipe(self) -> Recipe:
        return get_method(self.method).recipe(self.params)

    def open(self) -> tuple[Header, list[Header]]:
        """The base and vector headers, each vector checked against the base, the method and the privacy budget
        (no tensor is read)."""
        bh = read_kind(self.base, "model")
        headers = check_vectors(bh, self.vectors)
        self.check_inputs(bh, headers)
        return bh, headers

    def check_inputs(self, base: Header, headers: Sequence[Header]) -> dict[str, Any]:
        """What the method needs of its inputs (enough vectors, sample counts for weighting by samples) and the
        privacy budget (every ε recomputed, seeded noise refused unless allowed, each contributor's new vectors
        composed with its releases already in `base`'s lineage, every distinct release counted): its record."""
        recipe = self.recipe
        if len(headers) < recipe.min_vectors:
            raise TaskvecError(f"method {self.method!r} needs at least {recipe.min_vectors} vectors, "
                               f"got {len(headers)}")
        check_statistics(base, headers, recipe, self.method)
        vector_weights(recipe, [h.vector.samples for h in headers], [str(h.path) for h in headers])
        return check_merge_budget(headers, self.budget, earlier_releases(base))

    def with_method(self, method: str, params: Mapping[str, Any] | None = None, scale: float | None = None
                    ) -> MergePlan:
        """The same plan with another method (its defaults unless `params`) and optionally another λ."""
        return replace(self, method=method, params=get_method(method).resolve(params),
                       scale=self.scale if scale is None else scale)

    def weights(self, base: Header, headers: Sequence[Header]) -> tuple[Array, Array]:
        """Each vector's raw weight wᵢ (1 or its samples) and staleness weight sᵢ = (1 + dᵢ)^(−a), dᵢ = N − Kᵢ
        for a vector fine-tuned from version Kᵢ of the base's lineage, the base being version N."""
        w = vector_weights(self.recipe, [h.vector.samples for h in headers], [str(h.path) for h in headers])
        n = base.model.number
        s = np.array([staleness_weight(n - k, self.staleness) for k in (h.vector.base.number for h in headers)])
        return w, s

    def record(self, base: Header, headers: Sequence[Header]) -> dict[str, Any]:
        """The plan as the merged file records it, with the budget each contributor spends in `headers`."""
        return {
            "method": self.method, "params": dict(self.params), "reference": get_method(self.method).reference,
            "scale": self.scale, "seed": self.seed, "exclude_outliers": self.exclude_outliers,
            "staleness": self.staleness, "staleness_rule": STALENESS_RULE,
            "privacy_budget": check_merge_budget(headers, self.budget, earlier_releases(base)),
        }
