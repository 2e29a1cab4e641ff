"""The mechanism registry: every mechanism module found and declared in one place, and a new mechanism added as
one registered class (validated, verified and composed by a merge budget with no other code naming it)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest
from headers import vector_header

from taskvec.errors import PrivacyError
from taskvec.io.files import Header
from taskvec.privacy import mechanism
from taskvec.privacy.budget import BASIC_COMPOSITION, PrivacyBudget, check_merge_budget
from taskvec.privacy.entries import name_model, validate_ledger, verify_ledger
from taskvec.privacy.mechanism import Composition, Contribution, Entry, Mechanism, compositions, mechanisms, register
from taskvec.privacy.mechanisms.gaussian_output import gaussian_output_entries


def test_every_mechanism_module_is_registered_with_its_declarations() -> None:
    found = mechanisms()
    assert list(found) == ["dp-sgd", "gaussian-output", "gaussian-sum"]  # in the order of their modules
    for name, m in found.items():
        assert m.name == name and type(m).__module__.startswith("taskvec.privacy.mechanisms.")
        assert m.sensitivities and set(m.units) <= set(mechanism.UNITS)
        assert set(m.sensitivities) <= set(mechanism.RELATIONS)
    assert found["dp-sgd"].composition is found["gaussian-sum"].composition  # one accountant over all steps
    assert compositions() == [found["dp-sgd"].composition, found["gaussian-output"].composition]
    assert [m.releases_model for m in found.values()] == [True, False, True]


class _Additive(Composition):
    """Releases added up (basic composition), each vector's release counted."""

    description = "adding them up when all are toy releases"

    def distinct(self, found: Sequence[tuple[Contribution, Entry]]) -> list[Entry]:
        return [e for _, e in found]

    def compose(self, entries: Sequence[Entry]) -> tuple[float, float, str]:
        return sum(e["epsilon"] for e in entries), sum(e["delta"] for e in entries), BASIC_COMPOSITION


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> type[Mechanism]:
    """A mechanism a test module adds (ε = 1/z per release), registered as a mechanism module registers its own;
    the registry is restored afterwards."""
    monkeypatch.setattr(mechanism, "_REGISTRY", dict(mechanisms()))

    @register
    class Toy(Mechanism):
        name = "toy"
        units = ("patient",)
        sensitivities = {"add-remove": 1.0}
        composition = _Additive()

        def epsilon(self, entry: Entry) -> float:
            return entry["steps"] / entry["noise_multiplier"]

        def problem(self, entry: Entry) -> tuple[str, str] | None:
            return None if entry["sample_rate"] == 1 else ("sample_rate", "a toy release takes every unit")

    return Toy


def _toy_entry(z: float = 4.0, **kw: Any) -> Entry:
    return {"mechanism": "toy", "unit": "patient", "relation": "add-remove", "epsilon": 1 / z, "delta": 1e-6,
            "accountant": "toy", "noise_multiplier": z, "sample_rate": 1.0, "steps": 1, "clip": 1.0, "run_id": None,
            **kw}


def test_a_new_mechanism_is_one_registered_class(toy: type[Mechanism]) -> None:
    assert verify_ledger([_toy_entry()], "v") == [_toy_entry()]
    with pytest.raises(PrivacyError, match="^v: privacy entry 0: a toy entry must be add-remove per patient, got "
                                           "add-remove per image, which no run records") as err:
        validate_ledger([_toy_entry(unit="image")], "v")
    assert err.value.field == "unit"
    with pytest.raises(PrivacyError, match="a toy release takes every unit") as err:
        validate_ledger([_toy_entry(sample_rate=0.5)], "v")
    assert err.value.field == "sample_rate"
    with pytest.raises(PrivacyError, match="claims epsilon 0.5, but its parameters give 0.25"):
        verify_ledger([_toy_entry(epsilon=0.5)], "v")
    assert "model" not in name_model([_toy_entry()], "ab" * 32)[0]

    def header(name: str, run: str, ledger: list[Entry]) -> Header:
        return vector_header(name, run=run, privacy=ledger)

    rec = check_merge_budget([header("a", "r1", [_toy_entry()]), header("b", "r2", [_toy_entry(2.0)])],
                             PrivacyBudget(1.0, "patient"))
    assert rec["contributors"]["h"] == {"epsilon": 0.75, "delta": 2e-6, "vectors": 2, "earlier": 0, "runs": 2,
                                        "composition": BASIC_COMPOSITION}
    assert "adding them up when all are toy releases" in rec["composition"]


def test_kinds_of_release_compose_apart_and_add(toy: type[Mechanism]) -> None:
    """A contributor with a toy release in one run and export noise in another: no one kind covers both
    vectors, so each run's own bound is added (basic composition)."""
    site = gaussian_output_entries([2.0], 1.0, 1e-5, "r2")
    headers = [vector_header("a", run="r1", privacy=[_toy_entry()]), vector_header("b", run="r2", privacy=site)]
    spent = check_merge_budget(headers, PrivacyBudget(unit="patient"))["contributors"]["h"]
    assert spent["epsilon"] == pytest.approx(0.25 + site[1]["epsilon"]) and spent["composition"] == BASIC_COMPOSITION
    assert math.isclose(spent["delta"], 1e-6 + 1e-5)


def test_a_name_is_registered_once(toy: type[Mechanism]) -> None:
    with pytest.raises(TypeError, match="'toy' is registered twice"):
        register(toy)
