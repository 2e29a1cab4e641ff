"""The privacy ledger's entries: the fields every entry carries, their validation and verification (ε
recomputed by the entry's own mechanism), which entries cover a unit and relation, and a one-line summary.

Every guarantee taskvec records is one entry naming its mechanism (`taskvec.privacy.mechanisms`), its unit of
privacy (image, patient, site), its neighbouring relation (add-remove: one unit's data present or absent;
replace-one: one unit's data changed) and how ε was computed. Nothing without noise is ever recorded as DP.
A training entry names the model it released (`model`, its content identity, a DP output itself) and whether
its noise came from a given seed (`seeded`: reproducible, so not secret; a merge refuses it unless allowed).

The site is trusted to describe its own mechanism: every ε is recomputed from the entry's parameters, but a
ledger edited with its ε recomputed (a noise multiplier raised, a unit changed) passes. Signatures authenticate
who sent a file, not what it says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from taskvec.errors import PrivacyError
from taskvec.io.schema import is_sha
from taskvec.privacy.mechanism import RELATIONS, UNITS, Entry, is_number, is_positive, mechanism_of, mechanisms

LEDGER_FIELDS = (
    "mechanism", "unit", "relation", "epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps",
    "run_id",
)
EPSILON_TOLERANCE = 1e-3  # relative: a recomputed ε further from the recorded one is refused


def validate_ledger(ledger: Any, where: str = "ledger") -> list[Entry]:
    """Check every entry against the schema and its mechanism's checks; a guarantee without noise or clipping,
    or one no honest run records (a training entry not add-remove per image or patient), is refused. Entries
    from before `model` and `seeded` read as their own training and not seeded."""
    if not isinstance(ledger, list):
        raise PrivacyError(f"{where}: privacy ledger must be a list of mechanisms", path=where, field="privacy")
    for i, e in enumerate(ledger):
        what = f"{where}: privacy entry {i}"
        if not isinstance(e, dict):
            raise PrivacyError(f"{what} is not an object", path=where, field="privacy")
        missing = [f for f in LEDGER_FIELDS if f not in e]
        if missing:
            raise PrivacyError(f"{what} lacks {', '.join(missing)}", path=where, field=missing[0])
        for fld, known in (("mechanism", tuple(mechanisms())), ("unit", UNITS), ("relation", RELATIONS)):
            if e[fld] not in known:
                raise PrivacyError(f"{what}: unknown {fld} {e[fld]!r} (known: {', '.join(known)})", path=where,
                                   field=fld)
        mechanism = mechanism_of(e)
        problem = mechanism.scope_problem(e) or _common_problem(e) or mechanism.problem(e)
        if problem:
            raise PrivacyError(f"{what}: {problem[1]}", path=where, field=problem[0])
    return ledger


def _common_problem(e: Entry) -> tuple[str, str] | None:
    if "model" in e and not is_sha(e["model"]):
        return "model", f"model must be the released model's identity (64 hex digits), got {e['model']!r}"
    if not isinstance(e.get("seeded", False), bool):
        return "seeded", f"seeded must be true or false, got {e['seeded']!r}"
    if not is_positive(e["noise_multiplier"]):
        return "noise_multiplier", f"noise multiplier {e['noise_multiplier']!r}; without noise there is no DP"
    if not is_positive(e.get("max_grad_norm", e.get("clip"))):
        return "clip", "no clipping bound (max_grad_norm or clip); noise without it gives no DP"
    if not (is_number(e["epsilon"]) and 0 <= e["epsilon"] < math.inf):
        return "epsilon", f"epsilon must be a finite number >= 0, got {e['epsilon']!r}"
    if not (is_number(e["delta"]) and 0 < e["delta"] < 1):
        return "delta", f"delta must be in (0, 1), got {e['delta']!r}"
    if not (is_number(e["sample_rate"]) and 0 < e["sample_rate"] <= 1):
        return "sample_rate", f"sample_rate must be in (0, 1], got {e['sample_rate']!r}"
    if not (is_number(e["steps"]) and isinstance(e["steps"], int) and e["steps"] >= 1):
        return "steps", f"steps must be an integer >= 1, got {e['steps']!r}"
    return None


def verify_ledger(ledger: Any, where: str) -> list[Entry]:
    """`validate_ledger`, then every ε recomputed from its parameters: a mismatch is refused (nothing in a
    header is trusted; its hash covers the tensors only). This checks that a ledger is consistent, not that it
    is true: an edited one with its ε recomputed passes (the site describes its own mechanism)."""
    for i, e in enumerate(validate_ledger(ledger, where)):
        try:
            eps = mechanism_of(e).epsilon(e)
        except PrivacyError as err:
            raise PrivacyError(f"{where}: privacy entry {i}: {err}", path=where, field="epsilon") from None
        if not math.isclose(eps, e["epsilon"], rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9):
            raise PrivacyError(
                f"{where}: privacy entry {i} ({e['mechanism']}) claims epsilon {e['epsilon']:.6g}, but its "
                f"parameters give {eps:.6g} ({e['accountant']}); the header was altered or is wrong",
                path=where, field="epsilon", expected=eps, got=e["epsilon"])
    return ledger  # type: ignore[no-any-return]


def name_model(ledger: list[Entry], identity: str) -> list[Entry]:
    """The ledger with its training entries naming the model they released by its content identity, so that
    two trainings (from copies of one run folder, say) are never counted as one."""
    return validate_ledger([{**e, "model": identity} if mechanism_of(e).releases_model else e
                            for e in validate_ledger(ledger)])


def covers(entry: Entry, unit: str, relation: str) -> bool:
    """Whether an entry bounds changes of one `unit` under `relation`: its own unit and relation, or a
    site-level replace-one entry (any change of the site's data), which bounds every finer change. A
    patient-level entry does not bound image-level add-remove (an added image changes a patient), nor an
    image-level one a patient (that needs group privacy over the patient's images)."""
    if entry["unit"] == "site" and entry["relation"] == "replace-one":
        return True
    return bool(entry["unit"] == unit and entry["relation"] == relation)


def best_guarantee(ledger: Sequence[Entry], unit: str, relation: str) -> Entry | None:
    """The entry with the smallest ε among those that cover (unit, relation); None if none does.

    Entries hold together: export noise is added to the fine-tuned model, a post-processing of DP-SGD."""
    return min((e for e in ledger if covers(e, unit, relation)), key=lambda e: e["epsilon"], default=None)


def summarize_ledger(ledger: list[Entry]) -> str:
    """One line for humans: 'no DP' or each mechanism's (ε, δ), unit and relation, and whether its noise was
    seeded (not secret)."""
    if not ledger:
        return "no DP"
    return "; ".join(
        f"{e['mechanism']} ε={e['epsilon']:.3g} δ={e['delta']:.1e} per {e['unit']} ({e.get('relation', '?')})"
        + (" from seeded noise: not secret" if e.get("seeded") else "")
        for e in ledger
    )
