"""Privacy budgets: what a merge accepts (`PrivacyBudget`) and the composed ε of each contributor
(`check_merge_budget`), every ledger verified first.

A merge counts every distinct noised release and every distinct training of a contributor unless the files
themselves prove one includes another, so copying a model file and exporting or training again elsewhere never
makes two releases count as one. Releases of one kind compose as their mechanisms declare
(`taskvec.privacy.mechanism.Composition`); releases of different kinds, or runs composed apart, add (basic
composition).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from taskvec.errors import PrivacyConfigError, PrivacyError, check_range
from taskvec.io.files import Header
from taskvec.io.schema import ModelHeader, VectorSummary
from taskvec.privacy.entries import best_guarantee, verify_ledger
from taskvec.privacy.mechanism import RELATIONS, UNITS, Composition, Contribution, Entry, compositions, mechanism_of

BASIC_COMPOSITION = "basic (ε and δ add)"


@dataclass(frozen=True)
class PrivacyBudget:
    """What a merge accepts: every contributor's composed ε for changes of one `unit` under `relation` at
    most `max_epsilon`; `require_dp` refuses vectors without any guarantee. A vector whose noise came from a
    given seed (`seeded`) is refused unless `allow_seeded_noise` (tests only: such noise is not secret)."""

    max_epsilon: float | None = None
    unit: str | None = None
    relation: str = "add-remove"
    require_dp: bool = False
    allow_seeded_noise: bool = False

    def check(self) -> None:
        if self.max_epsilon is not None:
            check_range("max_epsilon", self.max_epsilon, low=0, error=PrivacyConfigError)
            if self.unit is None:
                raise PrivacyConfigError(
                    f"unit must name what `max_epsilon` {self.max_epsilon:g} protects: image, patient or site",
                    field="unit")
        if self.unit is not None and self.unit not in UNITS:
            raise PrivacyConfigError(f"unit must be one of {', '.join(UNITS)}, got {self.unit!r}", field="unit",
                                     got=self.unit)
        if self.relation not in RELATIONS:
            raise PrivacyConfigError(f"relation must be one of {', '.join(RELATIONS)}, got {self.relation!r}",
                                     field="relation", got=self.relation)


SINGLE = "single run"
_Bound = tuple[float, float, str, int]  # (ε, δ, how, runs composed)


def _bound(vectors: Sequence[Contribution], composition: Composition, unit: str, relation: str) -> _Bound | None:
    """The vectors' releases of one kind composed (`composition`): each vector's covering entry of that kind, the
    distinct ones composed; None when a vector has none."""
    found = []
    for v in vectors:
        e = best_guarantee([e for e in v.ledger if mechanism_of(e).composition is composition], unit, relation)
        if e is None:
            return None
        found.append((v, e))
    entries = composition.distinct(found)
    if len(entries) == 1:
        return entries[0]["epsilon"], entries[0]["delta"], SINGLE, 1
    return (*composition.compose(entries), len(entries))


def _tightest(vectors: Sequence[Contribution], unit: str, relation: str) -> list[_Bound]:
    """The bound of every kind of release that all the vectors carry."""
    return [b for b in (_bound(vectors, c, unit, relation) for c in compositions()) if b]


def _contributor_epsilon(vectors: Sequence[Contribution], unit: str, relation: str) -> _Bound:
    """(ε, δ, how, runs) of one contributor's vectors, the smallest of: every training composed (when all
    vectors are DP-SGD), every noised release composed (when all are noised), and each run's own bound added
    (basic composition: ε and δ add; runs may use the same data). A tie goes to the tight ones (their δ, the
    largest of the runs', is never above the sum). `runs`: the trainings or export histories composed."""
    groups: dict[Any, list[Contribution]] = {}
    for i, v in enumerate(vectors):
        groups.setdefault(v.run if v.run is not None else ("vector", i), []).append(v)
    options = _tightest(vectors, unit, relation)
    each = [min(_tightest(g, unit, relation), key=lambda b: b[0], default=None)
            for g in groups.values()] if len(groups) > 1 else []
    if each and all(each):
        found = [b for b in each if b]
        options.append((sum(b[0] for b in found), sum(b[1] for b in found), BASIC_COMPOSITION,
                        sum(b[3] for b in found)))
    return min(options, key=lambda b: b[0], default=(math.inf, 1.0, "none", len(groups)))


def earlier_history(base: ModelHeader, contributor: str | None, unit: str, own: Sequence[Header] = (),
                    relation: str = "add-remove", *, include_lineage: bool = True, seeded: bool = False
                    ) -> tuple[tuple[tuple[float, float, int], ...], list[str]]:
    """(noise multiplier, sample rate, steps) of each distinct earlier release on a run's units, as a merge's
    budget composes them with a DP-SGD run on `base` (one accountant over all steps): the `prior` of a run whose
    target ε spans them; and warnings. The releases are `contributor`'s already merged into `base` (its lineage,
    the merger's record; read when `include_lineage` and a `contributor` is named) and the site's own earlier
    vectors `own` (its record), each counted once whether the lineage lists it or not; the warnings name the
    contributor's releases left out and files released under another name. A release that does not compose that
    way (no guarantee per `unit`, or one of another kind) is refused: its share cannot be calibrated for; so is one
    whose noise came from a given seed unless this run's does too (`seeded`: tests), since its ε does not hold."""
    from taskvec.privacy.mechanisms.dp_sgd import DpSgd

    found, warnings = [], []
    lineage = base.merged_summaries()
    mine = [(k, v) for k, v in lineage if v.contributor == contributor]
    include_lineage = include_lineage and contributor is not None
    files = {h.vector.sha256 for h in own}
    if include_lineage:
        found = [_composable(v.sha256, v.run_id, v.privacy, f"v{k} input {v.sha256[:12]}", unit, relation, seeded)
                 for k, v in mine]
        if not found and not own:
            warnings.append(f"the base's lineage holds no release of contributor {contributor!r}: this run is "
                            "calibrated as the first release from these units (if there were earlier ones, give "
                            "those vectors as earlier releases)")
    elif left := [f"v{k} input {v.sha256[:12]}" for k, v in mine if v.sha256 not in files]:
        warnings.append(f"the base's lineage lists release(s) of contributor {contributor!r} that this run does not "
                        f"count ({', '.join(left)}): its total ε leaves them out (include_lineage counts them)")
    listed = {v.sha256: v.contributor for _, v in lineage}
    for h in own:
        vec = h.vector
        found.append(_composable(vec.sha256, vec.run_id, vec.privacy, str(h.path), unit, relation, seeded))
        if contributor is not None and vec.contributor != contributor:
            warnings.append(f"{h.path}: released as contributor {vec.contributor!r}, this run as {contributor!r}: "
                            "counted here, but a merge budgets the two names apart")
        elif include_lineage and listed.get(vec.sha256) != contributor:
            where = "not in the base's lineage" if vec.sha256 not in listed else \
                f"in the base's lineage under contributor {listed[vec.sha256]!r}"
            warnings.append(f"{h.path}: {where}; counted from the file")
    entries = DpSgd.composition.distinct(found)
    return tuple((e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries), warnings


def _composable(sha256: str, run: str | None, ledger: list[Entry], where: str, unit: str, relation: str,
                seeded: bool) -> tuple[Contribution, Entry]:
    """The release's guarantee per `unit` that composes with DP-SGD, else a PrivacyError (also for seeded noise
    unless `seeded`)."""
    from taskvec.privacy.mechanisms.dp_sgd import DpSgd

    e = best_guarantee([e for e in verify_ledger(ledger, where) if mechanism_of(e).composition is DpSgd.composition],
                       unit, relation)
    if e is None:
        raise PrivacyError(f"{where} has no DP-SGD or Gaussian-sum guarantee per {unit} ({relation}) that composes "
                           "with this run; leave it out of this run's budget and give this run its own target ε",
                           field="include_lineage")
    if e.get("seeded") and not seeded:
        raise PrivacyError(f"{where}: its noise came from a given seed, so it is not secret and its ε does not hold; "
                           "release it again without `DPConfig.seed`", path=where, field="seeded")
    return Contribution(sha256, run, [e]), e


def _check_seeded(ledger: list[Entry], where: str, budget: PrivacyBudget) -> None:
    for i, e in enumerate(ledger):
        if e.get("seeded") and not budget.allow_seeded_noise:
            raise PrivacyError(
                f"{where}: privacy entry {i} ({e['mechanism']}) drew its noise from a given seed, so it is not secret "
                "and its ε does not hold; retrain without `DPConfig.seed` (PrivacyBudget(allow_seeded_noise=True) "
                "is for tests)", path=where, field="seeded")


def _check_one_name(new: Mapping[str, list[Contribution]], earlier: Sequence[tuple[str, VectorSummary]]) -> None:
    """Refuse a run or a released model that the vectors here (or with one of them, the base's lineage) list under
    two contributor names: each name's budget would then count only its share of the releases."""
    def origins(run: str | None, ledger: Sequence[Entry]) -> set[str]:
        return ({f"run {run}"} if run else set()) | {f"model {e['model']}" for e in ledger if e.get("model")}

    names: dict[str, set[str]] = {}
    for who, given in new.items():
        for c in given:
            for o in origins(c.run, c.ledger):
                names.setdefault(o, set()).add(who)
    for _, v in earlier:
        for o in origins(v.run_id, v.privacy) & set(names):
            names[o].add(v.contributor)
    for origin, holders in sorted(names.items()):
        if len(holders) > 1:
            raise PrivacyError(f"{origin} is released under contributors {', '.join(sorted(holders))}: one site's "
                               "releases compose under one name; export them again with one `contributor`",
                               field="contributor", got=sorted(holders))


def check_merge_budget(headers: Sequence[Header], budget: PrivacyBudget,
                       earlier: Sequence[tuple[str, VectorSummary]] = ()) -> dict[str, Any]:
    """Verify every vector's ledger (ε recomputed from its parameters; seeded noise refused unless the budget
    allows it) and enforce `budget`, composing per contributor its vectors and its `earlier` releases, (where,
    summary) of the vectors already merged into the base's lineage (the merged model is a function of all of
    them); return the record a merge saves. `headers` are vector `Header`s. Every distinct noised release and
    every distinct training is counted unless the files prove one includes another (`Composition.distinct`
    of each kind), however the model files were copied. Without `budget.unit` the contributors are composed
    per the finest (unit, relation) that all their guarantees cover, if there is one (`composed_per`). Contributors
    without a vector here are not checked again. The ledgers are the sites' own descriptions of their
    mechanisms, trusted as such."""
    budget.check()
    vectors: dict[str, list[Contribution]] = {}
    for h in headers:
        v = h.vector
        ledger = verify_ledger(v.privacy, str(h.path))
        if not ledger and (budget.require_dp or budget.max_epsilon is not None):
            why = "`require_dp`" if budget.require_dp else f"`max_epsilon` {budget.max_epsilon:g}"
            raise PrivacyError(f"{h.path}: carries no DP guarantee (ε = ∞); it is refused by {why}",
                               path=h.path, field="privacy")
        _check_seeded(ledger, str(h.path), budget)
        vectors.setdefault(v.contributor, []).append(Contribution(v.sha256, v.run_id, ledger))
    _check_one_name(vectors, earlier)
    unit, relation = (budget.unit, budget.relation) if budget.unit is not None else _common_guarantee(
        [c.ledger for given in vectors.values() for c in given]
        + [v.privacy for _, v in earlier if v.contributor in vectors])
    record: dict[str, Any] = {**asdict(budget), "composed_per": None, "contributors": {}}
    if unit is None:
        return record
    record["composed_per"] = {"unit": unit, "relation": relation}
    before: dict[str, int] = {}
    for where, summary in earlier:
        who = summary.contributor
        if who in vectors:
            ledger = verify_ledger(summary.privacy, where)
            _check_seeded(ledger, where, budget)
            run = summary.run_id or next((e["run_id"] for e in ledger if e["run_id"]), None)
            vectors[who].append(Contribution(summary.sha256, run, ledger))
            before[who] = before.get(who, 0) + 1
    for who, given in vectors.items():
        eps, delta, how, runs = _contributor_epsilon(given, unit, relation)
        record["contributors"][who] = {"epsilon": eps, "delta": delta, "vectors": len(given),
                                       "earlier": before.get(who, 0), "runs": runs, "composition": how}
        if budget.max_epsilon is not None and eps > budget.max_epsilon:
            raise PrivacyError(_over_budget(who, eps, delta, len(given), runs, budget, before.get(who, 0)),
                               field="max_epsilon", expected=budget.max_epsilon, got=eps)
    kinds = ", ".join(f"by {c.description}" for c in compositions())
    record["composition"] = ("per contributor, its new vectors and its releases already in the base's lineage, "
                             "every distinct training and noised release counted unless the files prove one includes "
                             f"another: composed {kinds}, else basically (ε and δ add); contributors in parallel")
    return record


def _common_guarantee(ledgers: Sequence[Sequence[Entry]]) -> tuple[str | None, str]:
    """The finest (unit, relation) that the ledgers name and that every ledger with a guarantee covers, so that a
    merge without a budget's unit still composes each contributor's releases; (None, "add-remove") if none."""
    ledgers = [led for led in ledgers if led]
    named = {(e.get("unit"), e.get("relation")) for led in ledgers for e in led}
    known = [(u, r) for u, r in named if u in UNITS and r in RELATIONS]
    for unit, relation in sorted(known, key=lambda p: (UNITS.index(p[0]), RELATIONS.index(p[1]))):
        if all(best_guarantee(led, unit, relation) for led in ledgers):
            return unit, relation
    return None, "add-remove"


def _over_budget(who: str, eps: float, delta: float, n: int, runs: int, budget: PrivacyBudget,
                 earlier: int = 0) -> str:
    what = f"per {budget.unit} ({budget.relation})"
    if math.isinf(eps):
        return (f"contributor {who!r}: no guarantee {what} covers its vector(s) (an image-level ε does not bound "
                f"a patient without group privacy; a site add-remove ε bounds no patient; a release without DP "
                f"is ε = ∞), so ε = ∞ > `max_epsilon` {budget.max_epsilon:g}")
    lineage = f" ({earlier} already in the base's lineage)" if earlier else ""
    composed = f", {n} vectors{lineage} from {runs} runs composed" if n > 1 else ""
    return (f"contributor {who!r}: ε = {eps:.4g} {what} at δ = {delta:.2g}{composed}, above `max_epsilon` "
            f"{budget.max_epsilon:g}")
