"""Privacy maths and the privacy ledger.

Every guarantee taskvec records is one ledger entry naming its mechanism, its unit of privacy (image,
patient, site), its neighbouring relation (add-remove: one unit's data present or absent; replace-one: one
unit's data changed) and how ε was computed. Nothing without noise is ever recorded as DP.

Export-time noise (`gaussian-output`) releases clip(Δ) + N(0, (z·C)²) once per export, Δ the site's whole
delta clipped to L2 norm C. Two entries describe it: against the site's data being absent (Δ = 0) the
sensitivity is C; against *any* change of the site's data (a patient or an image added, removed or
replaced included) it is 2C, since two clipped deltas lie in one ball of radius C. ε is the analytic
Gaussian mechanism's (Balle & Wang 2018), the exports of one run composed exactly (Gaussian DP).

A `gaussian-sum` (the class-means head, `taskvec.training.class_means`) releases once the sum of per-unit
vectors of L2 norm at most `max_grad_norm` plus N(0, (z·max_grad_norm)²) per coordinate: one DP-SGD step at
sampling rate 1, accounted by the same accountants and composed with DP-SGD runs over their steps. Both are
add-remove at the image or patient unit (any other label is refused: no honest run records it); each names the
model it released (`model`, its content identity, a DP output itself) and whether its noise came from a given
seed (`seeded`: reproducible, so not secret; a merge refuses it unless allowed, for tests).

A merge counts every distinct noised release and every distinct training of a contributor unless the files
themselves prove one includes another (`check_merge_budget`), so copying a model file and exporting or
training again elsewhere never makes two releases count as one.

The site is trusted to describe its own mechanism: every ε is recomputed from the entry's parameters, but a
ledger edited with its ε recomputed (a noise multiplier raised, a unit changed) passes. Signatures authenticate
who sent a file, not what it says.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from taskvec.errors import PrivacyConfigError, PrivacyError, check_range
from taskvec.io.lineage import is_sha

ANALYTIC_GAUSSIAN = "analytic-gaussian (Balle & Wang 2018)"
PRV = "opacus-prv (Gopi et al. 2021)"
RDP = "opacus-rdp (fallback: PRV failed)"
RDP_LARGE = "opacus-rdp (PRV's grid over its limit)"
DP_SGD_ACCOUNTANTS = (PRV, RDP, RDP_LARGE)
# PRV discretises the privacy loss on a grid growing with ε and √steps, ~170 bytes a point at its peak: 2M points
# is ~350 MB and a few seconds. A noise multiplier of 0.05 at rate 0.5 over 50 steps would need 49M points (19 GB).
MAX_PRV_POINTS = 2_000_000
MECHANISMS = ("dp-sgd", "gaussian-sum", "gaussian-output")
SUBSAMPLED_GAUSSIAN = ("dp-sgd", "gaussian-sum")  # accounted by Opacus's accountants, (z, rate, steps) each
UNITS = ("image", "patient", "site")
TRAINING_UNITS = ("image", "patient")  # a subsampled-Gaussian entry's unit: what one clipped contribution is
RELATIONS = ("add-remove", "replace-one")
SENSITIVITY = {"add-remove": 1.0, "replace-one": 2.0}  # export noise: × clip
LEDGER_FIELDS = (
    "mechanism", "unit", "relation", "epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps",
    "run_id",
)
RELEASES_FILE = "privacy_releases.json"
GDP_COMPOSITION = "gaussian-dp (Dong, Roth & Su 2019)"
BASIC_COMPOSITION = "basic (ε and δ add)"
EPSILON_TOLERANCE = 1e-3  # relative: a recomputed ε further from the recorded one is refused


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def analytic_gaussian_delta(epsilon: float, noise_multiplier: float) -> float:
    """δ(ε) of one Gaussian mechanism with σ = noise_multiplier × sensitivity (Balle & Wang 2018, Thm 8)."""
    mu = 1.0 / noise_multiplier
    a = _phi(mu / 2 - epsilon / mu)
    b_arg = -mu / 2 - epsilon / mu
    b = math.exp(epsilon + math.log(_phi(b_arg))) if _phi(b_arg) > 0 else 0.0
    return max(a - b, 0.0)


def _bisect(f: Any, lo: float, hi: float, iters: int = 200) -> float:
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid):
            hi = mid
        else:
            lo = mid
    return hi


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Smallest ε such that the Gaussian mechanism with this noise multiplier is (ε, δ)-DP."""
    _check_delta(delta)
    check_range("noise_multiplier", noise_multiplier, low=0, error=PrivacyConfigError)
    if analytic_gaussian_delta(0.0, noise_multiplier) <= delta:
        return 0.0
    hi = 1.0
    while analytic_gaussian_delta(hi, noise_multiplier) > delta:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return _bisect(lambda e: analytic_gaussian_delta(e, noise_multiplier) <= delta, 0.0, hi)


def gaussian_noise_multiplier(epsilon: float, delta: float) -> float:
    """Smallest noise multiplier that makes one Gaussian release (ε, δ)-DP."""
    _check_delta(delta)
    check_range("epsilon", epsilon, low=0, error=PrivacyConfigError)
    hi = 1.0
    while analytic_gaussian_delta(epsilon, hi) > delta:
        hi *= 2
    return _bisect(lambda z: analytic_gaussian_delta(epsilon, z) <= delta, 0.0, hi)


def _check_delta(delta: float) -> None:
    check_range("delta", delta, low=0, high=1, error=PrivacyConfigError)


def composed_noise_multiplier(noise_multipliers: Sequence[float]) -> float:
    """Noise multiplier of one Gaussian release equivalent to composing these ones.

    A Gaussian release with noise multiplier z is exactly (1/z)-GDP, and GDP composes as
    μ = sqrt(Σ μᵢ²) (Dong, Roth & Su 2019), so k releases are one release with z = (Σ zᵢ⁻²)^(-1/2).
    """
    return 1.0 / math.sqrt(sum(z**-2 for z in noise_multipliers))


def remaining_noise_multiplier(epsilon: float, delta: float, earlier: Sequence[float]) -> float:
    """The noise multiplier of one more release that brings the composed site-level (add-remove) ε of
    `earlier` releases and it to exactly `epsilon`; refused when the earlier ones already spent it."""
    total = gaussian_noise_multiplier(epsilon, delta)
    left = total**-2 - sum(z**-2 for z in earlier)
    if left <= 1e-12 * total**-2:
        spent = gaussian_epsilon(composed_noise_multiplier(earlier), delta)
        raise PrivacyConfigError(
            f"epsilon {epsilon:g} is already spent: the {len(earlier)} earlier noised exports of this run "
            f"compose to ε = {spent:.4g} at δ = {delta:g}", field="epsilon", got=epsilon)
    return left**-0.5


def gaussian_output_entries(
    noise_multipliers: Sequence[float], clip: float, delta: float, run_id: str | None,
    declared_public: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """The two ledger entries of an export-time Gaussian release, the last of `noise_multipliers` (the
    run's noised exports in order, all composed): site add-remove (sensitivity C) and site replace-one
    (sensitivity 2C, which bounds every patient- and image-level change too)."""
    zs = [float(z) for z in noise_multipliers]
    return [{
        "mechanism": "gaussian-output",
        "unit": "site",
        "relation": relation,
        "epsilon": gaussian_epsilon(composed_noise_multiplier(zs) / SENSITIVITY[relation], delta),
        "delta": delta,
        "accountant": ANALYTIC_GAUSSIAN,
        "noise_multiplier": zs[-1],
        "sample_rate": 1.0,
        "steps": len(zs),
        "releases": zs,
        "clip": clip,
        "sensitivity": SENSITIVITY[relation] * clip,
        "run_id": run_id,
        "declared_public": list(declared_public),
    } for relation in RELATIONS]


def dp_sgd_entry(
    *, epsilon: float, delta: float, accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
    max_grad_norm: float, unit: str, run_id: str | None, mechanism: str = "dp-sgd", seeded: bool = False,
) -> dict[str, Any]:
    """Ledger entry for DP-SGD training (Poisson-subsampled Gaussian mechanism, `steps` times, add-remove) or,
    as `gaussian-sum`, one noisy sum of the units' bounded vectors (rate 1, one step). `seeded`: the noise came
    from a given seed (tests), so it is not secret."""
    entry = {
        "mechanism": mechanism, "unit": unit, "relation": "add-remove", "epsilon": epsilon, "delta": delta,
        "accountant": accountant, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps,
        "max_grad_norm": max_grad_norm, "run_id": run_id, "seeded": seeded,
    }
    validate_ledger([entry])
    return entry


def name_model(ledger: list[dict[str, Any]], identity: str) -> list[dict[str, Any]]:
    """The ledger with its training entries (`dp-sgd`, `gaussian-sum`) naming the model they released by its
    content identity, so that two trainings (from copies of one run folder, say) are never counted as one."""
    return validate_ledger([{**e, "model": identity} if e.get("mechanism") in SUBSAMPLED_GAUSSIAN else e
                            for e in ledger])


def validate_ledger(ledger: Any, where: str = "ledger") -> list[dict[str, Any]]:
    """Check every entry against the schema; a guarantee without noise or clipping, or one no honest run
    records (a training entry not add-remove per image or patient), is refused. Entries from before `model`
    and `seeded` read as their own training and not seeded."""
    if not isinstance(ledger, list):
        raise PrivacyError(f"{where}: privacy ledger must be a list of mechanisms", path=where, field="privacy")
    for i, e in enumerate(ledger):
        what = f"{where}: privacy entry {i}"
        if not isinstance(e, dict):
            raise PrivacyError(f"{what} is not an object", path=where, field="privacy")
        missing = [f for f in LEDGER_FIELDS if f not in e]
        if missing:
            raise PrivacyError(f"{what} lacks {', '.join(missing)}", path=where, field=missing[0])
        for fld, known in (("mechanism", MECHANISMS), ("unit", UNITS), ("relation", RELATIONS)):
            if e[fld] not in known:
                raise PrivacyError(f"{what}: unknown {fld} {e[fld]!r} (known: {', '.join(known)})", path=where,
                                   field=fld)
        problem = _entry_problem(e)
        if problem:
            raise PrivacyError(f"{what}: {problem[1]}", path=where, field=problem[0])
    return ledger


def _entry_problem(e: dict[str, Any]) -> tuple[str, str] | None:
    if e["mechanism"] in SUBSAMPLED_GAUSSIAN and (e["relation"] != "add-remove" or e["unit"] not in TRAINING_UNITS):
        fld = "relation" if e["relation"] != "add-remove" else "unit"
        return fld, (f"a {e['mechanism']} entry must be add-remove per image or patient, got {e['relation']} per "
                     f"{e['unit']}, which no training records (the ledger was edited); export the vector again "
                     "from the model file its training wrote")
    if "model" in e and not is_sha(e["model"]):
        return "model", f"model must be the released model's identity (64 hex digits), got {e['model']!r}"
    if not isinstance(e.get("seeded", False), bool):
        return "seeded", f"seeded must be true or false, got {e['seeded']!r}"
    if not _positive(e["noise_multiplier"]):
        return "noise_multiplier", f"noise multiplier {e['noise_multiplier']!r}; without noise there is no DP"
    if not _positive(e.get("max_grad_norm", e.get("clip"))):
        return "clip", "no clipping bound (max_grad_norm or clip); noise without it gives no DP"
    if not (_number(e["epsilon"]) and 0 <= e["epsilon"] < math.inf):
        return "epsilon", f"epsilon must be a finite number >= 0, got {e['epsilon']!r}"
    if not (_number(e["delta"]) and 0 < e["delta"] < 1):
        return "delta", f"delta must be in (0, 1), got {e['delta']!r}"
    if not (_number(e["sample_rate"]) and 0 < e["sample_rate"] <= 1):
        return "sample_rate", f"sample_rate must be in (0, 1], got {e['sample_rate']!r}"
    if not (_number(e["steps"]) and isinstance(e["steps"], int) and e["steps"] >= 1):
        return "steps", f"steps must be an integer >= 1, got {e['steps']!r}"
    if e["mechanism"] == "gaussian-output":
        zs = e.get("releases")
        if not (isinstance(zs, list) and len(zs) == e["steps"] and all(map(_positive, zs))
                and zs[-1] == e["noise_multiplier"]):
            return "releases", "releases must list the noise multiplier of each of the run's `steps` releases"
    return None


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _positive(x: Any) -> bool:
    return _number(x) and 0 < x < math.inf


def accountant_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                       delta: float) -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps by the named accountant (`DP_SGD_ACCOUNTANTS`)."""
    return history_epsilon(accountant, [(noise_multiplier, sample_rate, steps)], delta)


def history_epsilon(accountant: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε of DP-SGD runs composed, each (noise multiplier, sample rate, steps), by the named accountant over all
    their steps (Opacus's accountants take such a history). PRV is refused where its grid would pass
    `MAX_PRV_POINTS` (a header naming PRV is hostile input too)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant not in DP_SGD_ACCOUNTANTS:
        raise PrivacyError(f"unknown DP-SGD accountant {accountant!r} (known: {'; '.join(DP_SGD_ACCOUNTANTS)})",
                           field="accountant")
    points = prv_grid_points(history, delta) if accountant == PRV else 0.0
    if points > MAX_PRV_POINTS:
        raise PrivacyError(f"the PRV accountant would need {points:.3g} grid points for this history, over its "
                           f"limit of {MAX_PRV_POINTS:.3g} (memory); such ε is RDP's", field="accountant")
    acc: Any = PRVAccountant() if accountant == PRV else RDPAccountant()
    acc.history = [(float(z), float(q), int(t)) for z, q, t in history]
    with _quiet_rdp():
        return float(acc.get_epsilon(delta))


@contextmanager
def _quiet_rdp() -> Iterator[None]:
    """Silence RDP's warning at large noise (PRV bounds its domain with RDP) and numpy's at sampling rate 1
    (PRV's log(1 - q) is -inf there, which its formula handles)."""
    import warnings

    import numpy as np

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def prv_grid_points(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """Points of the grid Opacus's PRV accountant discretises `history` on at its defaults (ε error 0.01, δ error
    δ/1000), as `PRVAccountant._get_domain` sizes it: the safe domain [-L, L] (from RDP) at mesh
    0.01 / √(T·ln(12/δ error)/2), T the total steps. PRV's memory and time grow with it."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    eps_error, delta_error = 0.01, delta / 1000
    steps = [int(t) for _, _, t in history]
    with _quiet_rdp():
        half = compute_safe_domain_size([PoissonSubsampledGaussianPRV(float(q), float(z)) for z, q, _ in history],
                                        steps, eps_error=eps_error, delta_error=delta_error)
    return 2 * half * math.sqrt(sum(steps) * math.log(12 / delta_error) / 2) / eps_error


def dp_sgd_epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> tuple[float, str]:
    """ε of DP-SGD runs composed over all their steps and the accountant that computed it: PRV, RDP where PRV
    fails (it can, far out in its domain) or its grid would pass `MAX_PRV_POINTS` (RDP only bounds ε from above,
    and such ε is large or the run very long), so every call is bounded in memory and time."""
    try:
        eps = history_epsilon(PRV, history, delta)
        if math.isfinite(eps):
            return eps, PRV
    except PrivacyError:  # the grid over its limit
        return history_epsilon(RDP_LARGE, history, delta), RDP_LARGE
    except (ValueError, RuntimeError, OverflowError, FloatingPointError):
        pass
    return history_epsilon(RDP, history, delta), RDP


def recompute_epsilon(entry: dict[str, Any]) -> float:
    """ε of a (valid) entry from its parameters alone, by the accountant it names."""
    if entry["mechanism"] == "gaussian-output":
        z = composed_noise_multiplier(entry["releases"]) / SENSITIVITY[entry["relation"]]
        return gaussian_epsilon(z, entry["delta"])
    return accountant_epsilon(entry["accountant"], entry["noise_multiplier"], entry["sample_rate"], entry["steps"],
                              entry["delta"])


def verify_ledger(ledger: Any, where: str) -> list[dict[str, Any]]:
    """`validate_ledger`, then every ε recomputed from its parameters: a mismatch is refused (nothing in a
    header is trusted; its hash covers the tensors only). This checks that a ledger is consistent, not that it
    is true: an edited one with its ε recomputed passes (the site describes its own mechanism)."""
    for i, e in enumerate(validate_ledger(ledger, where)):
        try:
            eps = recompute_epsilon(e)
        except PrivacyError as err:
            raise PrivacyError(f"{where}: privacy entry {i}: {err}", path=where, field="epsilon") from None
        if not math.isclose(eps, e["epsilon"], rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9):
            raise PrivacyError(
                f"{where}: privacy entry {i} ({e['mechanism']}) claims epsilon {e['epsilon']:.6g}, but its "
                f"parameters give {eps:.6g} ({e['accountant']}); the header was altered or is wrong",
                path=where, field="epsilon", expected=eps, got=e["epsilon"])
    return ledger  # type: ignore[no-any-return]


def covers(entry: dict[str, Any], unit: str, relation: str) -> bool:
    """Whether an entry bounds changes of one `unit` under `relation`: its own unit and relation, or a
    site-level replace-one entry (any change of the site's data), which bounds every finer change. A
    patient-level entry does not bound image-level add-remove (an added image changes a patient), nor an
    image-level one a patient (that needs group privacy over the patient's images)."""
    if entry["unit"] == "site" and entry["relation"] == "replace-one":
        return True
    return bool(entry["unit"] == unit and entry["relation"] == relation)


def best_guarantee(ledger: Sequence[dict[str, Any]], unit: str, relation: str) -> dict[str, Any] | None:
    """The entry with the smallest ε among those that cover (unit, relation); None if none does.

    Entries hold together: export noise is added to the fine-tuned model, a post-processing of DP-SGD."""
    return min((e for e in ledger if covers(e, unit, relation)), key=lambda e: e["epsilon"], default=None)


# ------------------------------------------------------------------------------------------------ budgets


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


@dataclass(frozen=True)
class _Given:
    """One vector the budget composes: its sha256 (None when unknown: a release of its own), run id, ledger."""

    sha256: str | None
    run: str | None
    ledger: list[dict[str, Any]]


SINGLE = "single run"
_Bound = tuple[float, float, str, int]  # (ε, δ, how, runs composed)


def _best(ledger: list[dict[str, Any]], mechanisms: Sequence[str], unit: str, relation: str) -> dict[str, Any] | None:
    return best_guarantee([e for e in ledger if e["mechanism"] in mechanisms], unit, relation)


def _trainings(vectors: Sequence[_Given], unit: str, relation: str) -> list[dict[str, Any]] | None:
    """The distinct trainings (`dp-sgd`, `gaussian-sum`) the vectors are post-processing of, one covering entry
    each; None when a vector has none. Identical entries naming their model are one training; an entry without
    `model` (older files) is a training of its own per vector (never under-counts)."""
    found: dict[Any, dict[str, Any]] = {}
    for i, v in enumerate(vectors):
        e = _best(v.ledger, SUBSAMPLED_GAUSSIAN, unit, relation)
        if e is None:
            return None
        found.setdefault(json.dumps(e, sort_keys=True) if "model" in e else i, e)
    return list(found.values())


def _dp_sgd_bound(vectors: Sequence[_Given], unit: str, relation: str) -> _Bound | None:
    """Every training composed by one accountant over all their steps (Opacus's PRV, RDP as its fallback)."""
    runs = _trainings(vectors, unit, relation)
    if runs is None:
        return None
    if len(runs) == 1:
        return runs[0]["epsilon"], runs[0]["delta"], SINGLE, 1
    delta = max(e["delta"] for e in runs)
    eps, accountant = dp_sgd_epsilon([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in runs], delta)
    return eps, delta, accountant, len(runs)


def _export_histories(vectors: Sequence[_Given], unit: str, relation: str) -> list[dict[str, Any]] | None:
    """Export entries whose release lists together hold every noised release of the vectors; None when a
    vector has none covering (unit, relation). Per run (a vector without a run id is a run of its own) the
    longest list stands for all only when the files prove they are one history: every list a prefix of it and
    no two distinct vectors (by sha256) with lists of one length, so they are distinct releases of it and no
    more than it lists. Otherwise (a model file copied and exported in two places, two trainings of one run
    folder) each distinct vector's whole list counts."""
    runs: dict[Any, dict[Any, dict[str, Any]]] = {}
    for i, v in enumerate(vectors):
        e = _best(v.ledger, ("gaussian-output",), unit, relation)
        if e is None:
            return None
        runs.setdefault(v.run if v.run is not None else ("vector", i), {}).setdefault(v.sha256 or i, e)
    found = []
    for run in runs.values():
        entries = list(run.values())
        longest = max(entries, key=lambda e: (e["steps"], e["epsilon"]))
        lengths = [len(e["releases"]) for e in entries]
        one = all(e["releases"] == longest["releases"][:n] for e, n in zip(entries, lengths))
        found += [longest] if one and len(set(lengths)) == len(lengths) else entries
    return found


def _export_bound(vectors: Sequence[_Given], unit: str, relation: str) -> _Bound | None:
    """Every noised release composed exactly: μ-GDP, μ² = Σ (sensitivity/σ)² (Dong, Roth & Su 2019)."""
    found = _export_histories(vectors, unit, relation)
    if found is None:
        return None
    if len(found) == 1:
        return found[0]["epsilon"], found[0]["delta"], SINGLE, 1
    mu = math.sqrt(sum((SENSITIVITY[e["relation"]] / composed_noise_multiplier(e["releases"])) ** 2 for e in found))
    delta = max(e["delta"] for e in found)
    return gaussian_epsilon(1 / mu, delta), delta, GDP_COMPOSITION, len(found)


def _contributor_epsilon(vectors: Sequence[_Given], unit: str, relation: str) -> _Bound:
    """(ε, δ, how, runs) of one contributor's vectors, the smallest of: every training composed (when all
    vectors are DP-SGD), every noised release composed (when all are noised), and each run's own bound added
    (basic composition: ε and δ add; runs may use the same data). A tie goes to the tight ones (their δ, the
    largest of the runs', is never above the sum). `runs`: the trainings or export histories composed."""
    groups: dict[Any, list[_Given]] = {}
    for i, v in enumerate(vectors):
        groups.setdefault(v.run if v.run is not None else ("vector", i), []).append(v)
    options = [b for b in (_dp_sgd_bound(vectors, unit, relation), _export_bound(vectors, unit, relation)) if b]
    each = [min((b for b in (_dp_sgd_bound(g, unit, relation), _export_bound(g, unit, relation)) if b),
                key=lambda b: b[0], default=None) for g in groups.values()] if len(groups) > 1 else []
    if each and all(each):
        found = [b for b in each if b]
        options.append((sum(b[0] for b in found), sum(b[1] for b in found), BASIC_COMPOSITION,
                        sum(b[3] for b in found)))
    return min(options, key=lambda b: b[0], default=(math.inf, 1.0, "none", len(groups)))


def _check_seeded(ledger: list[dict[str, Any]], where: str, budget: PrivacyBudget) -> None:
    for i, e in enumerate(ledger):
        if e.get("seeded") and not budget.allow_seeded_noise:
            raise PrivacyError(
                f"{where}: privacy entry {i} ({e['mechanism']}) drew its noise from a given seed, so it is not secret "
                "and its ε does not hold; retrain without `DPConfig.seed` (PrivacyBudget(allow_seeded_noise=True) "
                "is for tests)", path=where, field="seeded")


def check_merge_budget(headers: Sequence[Any], budget: PrivacyBudget,
                       earlier: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> dict[str, Any]:
    """Verify every vector's ledger (ε recomputed from its parameters; seeded noise refused unless the budget
    allows it) and enforce `budget`, composing per contributor its vectors and its `earlier` releases, (where,
    summary) of the vectors already merged into the base's lineage (the merged model is a function of all of
    them); return the record a merge saves. `headers` are vector `Header`s. Every distinct noised release and
    every distinct training is counted unless the files prove one includes another (`_export_histories`,
    `_trainings`), however the model files were copied. Contributors without a vector here are not checked
    again. The ledgers are the sites' own descriptions of their mechanisms, trusted as such."""
    budget.check()
    vectors: dict[str, list[_Given]] = {}
    for h in headers:
        ledger = verify_ledger(h.meta.get("privacy", []), str(h.path))
        if not ledger and (budget.require_dp or budget.max_epsilon is not None):
            why = "`require_dp`" if budget.require_dp else f"`max_epsilon` {budget.max_epsilon:g}"
            raise PrivacyError(f"{h.path}: carries no DP guarantee (ε = ∞); it is refused by {why}",
                               path=h.path, field="privacy")
        _check_seeded(ledger, str(h.path), budget)
        run = (h.meta.get("source") or {}).get("run_id")
        vectors.setdefault(str(h.meta.get("contributor")), []).append(_Given(h.meta.get("sha256"), run, ledger))
    record: dict[str, Any] = {**asdict(budget), "contributors": {}}
    if budget.unit is None:
        return record
    before: dict[str, int] = {}
    for where, v in earlier:
        who = str(v["contributor"])
        if who in vectors:
            ledger = verify_ledger(v.get("privacy", []), where)
            _check_seeded(ledger, where, budget)
            run = v.get("run_id") or next((e["run_id"] for e in ledger if e["run_id"]), None)
            vectors[who].append(_Given(v.get("sha256"), run, ledger))
            before[who] = before.get(who, 0) + 1
    for who, given in vectors.items():
        eps, delta, how, runs = _contributor_epsilon(given, budget.unit, budget.relation)
        record["contributors"][who] = {"epsilon": eps, "delta": delta, "vectors": len(given),
                                       "earlier": before.get(who, 0), "runs": runs, "composition": how}
        if budget.max_epsilon is not None and eps > budget.max_epsilon:
            raise PrivacyError(_over_budget(who, eps, delta, len(given), runs, budget, before.get(who, 0)),
                               field="max_epsilon", expected=budget.max_epsilon, got=eps)
    record["composition"] = ("per contributor, its new vectors and its releases already in the base's lineage, "
                             "every distinct training and noised release counted unless the files prove one includes "
                             f"another: composed by {GDP_COMPOSITION} when all are export noise, by one accountant "
                             "over all steps when all are DP-SGD, else basically (ε and δ add); contributors in "
                             "parallel")
    return record


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


# ------------------------------------------------------------------------------------------ release records


def releases_path(model_file: str | os.PathLike[str]) -> Path:
    """Where exports of the models in a directory are recorded: `privacy_releases.json` beside them."""
    return Path(model_file).parent / RELEASES_FILE


@contextmanager
def locked_releases(record: Path) -> Iterator[None]:
    """Hold the release record's lock: read, decide and record one export without a concurrent one."""
    from filelock import FileLock

    with FileLock(str(record) + ".lock"):
        yield


def read_releases(record: Path, key: str) -> list[dict[str, Any]]:
    """Earlier exports of the run `key` recorded in `record` (a run's releases compose)."""
    if not record.exists():
        return []
    try:
        runs = json.loads(record.read_text())["runs"]
        return list(runs.get(key, []))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PrivacyError(f"{record}: unreadable release record ({e}); it is needed to compose exports",
                           path=record) from None


def record_release(record: Path, key: str, release: dict[str, Any]) -> None:
    """Append one export of run `key` to the record (rewritten atomically; call under `locked_releases`)."""
    from taskvec.io.files import write_json

    runs = json.loads(record.read_text())["runs"] if record.exists() else {}
    runs.setdefault(key, []).append(release)
    write_json(record, {"format": "taskvec-releases", "version": 1, "runs": runs})


def summarize_ledger(ledger: list[dict[str, Any]]) -> str:
    """One line for humans: 'no DP' or each mechanism's (ε, δ), unit and relation, and whether its noise was
    seeded (not secret)."""
    if not ledger:
        return "no DP"
    return "; ".join(
        f"{e['mechanism']} ε={e['epsilon']:.3g} δ={e['delta']:.1e} per {e['unit']} ({e.get('relation', '?')})"
        + (" from seeded noise: not secret" if e.get("seeded") else "")
        for e in ledger
    )
