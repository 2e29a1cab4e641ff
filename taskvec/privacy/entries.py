"""The privacy ledger's entries: the fields every entry carries, their validation and verification (ε
recomputed by the entry's own mechanism), which entries cover a unit and relation, and a one-line summary.

Every guarantee taskvec records is one entry naming its mechanism (`taskvec.privacy.mechanisms`), its unit of
privacy (image, patient, site), its neighbouring relation (add-remove: one unit's data present or absent;
replace-one: one unit's data changed) and how ε was computed. Nothing without noise is ever recorded as DP.
A training entry names the model it released (`model`, a random name drawn when the model is saved, so that
every vector of that model counts its training once) and whether its noise came from a given seed (`seeded`:
reproducible, so not secret; a merge refuses it unless allowed).

The site is trusted to describe its own mechanism: every ε is recomputed from the entry's parameters, but a
ledger edited with its ε recomputed (a noise multiplier raised, a unit changed) passes. Signatures authenticate
who sent a file, not what it says.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from taskvec.errors import PrivacyError
from taskvec.io.schema import LedgerEntry
from taskvec.privacy.mechanism import Entry, mechanism_of, mechanisms

EPSILON_TOLERANCE = 1e-3  # relative: a recomputed ε further from the recorded one is refused


def validate_ledger(ledger: Any, where: str = "ledger") -> list[Entry]:
    """Check every entry's common fields (`LedgerEntry`) and its mechanism's own checks; a guarantee without noise
    or clipping, or one no honest run records (a training entry not add-remove per image or patient), is refused.
    Entries from before `model` and `seeded` read as their own training and not seeded."""
    if not isinstance(ledger, list):
        raise PrivacyError(f"{where}: privacy ledger must be a list of mechanisms", path=where, field="privacy")
    known = tuple(mechanisms())
    for i, e in enumerate(ledger):
        what = f"{where}: privacy entry {i}"
        try:
            entry = LedgerEntry.from_json(e)
        except PrivacyError as err:
            sep = " " if err.message.startswith(("is not", "lacks")) else ": "
            raise PrivacyError(f"{what}{sep}{err.message}", path=where, field=err.field) from None
        if entry.mechanism not in known:
            raise PrivacyError(f"{what}: unknown mechanism {entry.mechanism!r} (known: {', '.join(known)})",
                               path=where, field="mechanism")
        mechanism = mechanism_of(e)
        problem = mechanism.scope_problem(e) or mechanism.problem(e)
        if problem:
            raise PrivacyError(f"{what}: {problem[1]}", path=where, field=problem[0])
    trainings = [i for i, e in enumerate(ledger) if mechanism_of(e).releases_model]
    if len(trainings) > 1:  # one model, one training: a second entry could only ever lower the ε read from it
        raise PrivacyError(f"{where}: privacy entries {', '.join(map(str, trainings))} are each a training; a "
                           "released model comes from one", path=where, field="privacy")
    return ledger


def verify_ledger(ledger: Any, where: str) -> list[Entry]:
    """`validate_ledger`, then every ε recomputed from its parameters: a mismatch is refused (nothing in a
    header is trusted; its hash covers the tensors only). This checks that a ledger is consistent, not that it
    is true: an edited one with its ε recomputed passes (the site describes its own mechanism)."""
    for i, e in enumerate(validate_ledger(ledger, where)):
        try:
            eps = mechanism_of(e).epsilon(e)
        except PrivacyError as err:
            raise PrivacyError(f"{where}: privacy entry {i} ({e['mechanism']}): {err.message}", path=where,
                               field="epsilon") from None
        except (ArithmeticError, ValueError) as err:  # parameters no accountant takes (a δ of 1e-300, say)
            raise PrivacyError(f"{where}: privacy entry {i} ({e['mechanism']}): its parameters give no ε ({err})",
                               path=where, field="epsilon") from None
        if not math.isclose(eps, e["epsilon"], rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9):
            raise PrivacyError(
                f"{where}: privacy entry {i} ({e['mechanism']}) claims epsilon {e['epsilon']:.6g}, but its "
                f"parameters give {eps:.6g} ({e['accountant']}); the header was altered or is wrong",
                path=where, field="epsilon", expected=eps, got=e["epsilon"])
    return ledger  # type: ignore[no-any-return]


def name_model(ledger: list[Entry], name: str) -> list[Entry]:
    """The ledger with its training entries naming the model they released: every vector of that model file
    then counts its training once, and two trainings (from copies of one run folder, say) are never counted as
    one. The name is drawn at random when the model is saved, not its content identity, which a noised export of
    the model must not carry (it is covered by the training's ε alone, not by the export noise's)."""
    return validate_ledger([{**e, "model": name} if mechanism_of(e).releases_model else e
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
