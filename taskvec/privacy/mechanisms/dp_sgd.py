"""`dp-sgd`: DP-SGD training, `steps` Poisson-subsampled Gaussian steps at rate `sample_rate`, each unit's (an
image's or a patient's) gradient clipped to `max_grad_norm` and N(0, (z·max_grad_norm)²) added to their sum.

Add-remove per image or patient (sensitivity `max_grad_norm`); ε by Opacus's PRV accountant (RDP, named, where
PRV fails or its grid is too large), recomputed by the accountant the entry names. A contributor's trainings
compose by one accountant over all their steps. `SubsampledGaussian` serves every mechanism accounted as such
steps (`gaussian-sum`). The Opacus engine that trains with it is `taskvec.privacy.dpsgd`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from taskvec.privacy.accounting import accountant_epsilon, dp_sgd_epsilon
from taskvec.privacy.entries import validate_ledger
from taskvec.privacy.mechanism import Composition, Contribution, Entry, Mechanism, mechanisms, register


class Trainings(Composition):
    """Trainings composed by one accountant over all their steps (Opacus's PRV, RDP as its fallback)."""

    description = "one accountant over all steps when all are DP-SGD"

    def distinct(self, found: Sequence[tuple[Contribution, Entry]]) -> list[Entry]:
        """Identical entries naming their model are one training; an entry without `model` (older files) is a
        training of its own per vector (never under-counts)."""
        trainings: dict[Any, Entry] = {}
        for i, (_, e) in enumerate(found):
            trainings.setdefault(json.dumps(e, sort_keys=True) if "model" in e else i, e)
        return list(trainings.values())

    def compose(self, entries: Sequence[Entry]) -> tuple[float, float, str]:
        delta = max(e["delta"] for e in entries)
        eps, accountant = dp_sgd_epsilon([(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries],
                                         delta)
        return eps, delta, accountant


class SubsampledGaussian(Mechanism):
    """Poisson-subsampled Gaussian steps over clipped per-unit vectors: what the DP-SGD accountants account."""

    units = ("image", "patient")
    sensitivities = {"add-remove": 1.0}  # × max_grad_norm
    scope_reason = ("no training records (the ledger was edited); export the vector again from the model file its "
                    "training wrote")
    releases_model = True
    composition = Trainings()

    def epsilon(self, entry: Entry) -> float:
        return accountant_epsilon(entry["accountant"], entry["noise_multiplier"], entry["sample_rate"],
                                  entry["steps"], entry["delta"])

    @classmethod
    def entry(cls, *, epsilon: float, delta: float, accountant: str, noise_multiplier: float, sample_rate: float,
              steps: int, max_grad_norm: float, unit: str, run_id: str | None, seeded: bool = False) -> Entry:
        """The ledger entry of `steps` steps (add-remove per `unit`); `seeded`: the noise came from a given seed
        (tests), so it is not secret."""
        entry = {
            "mechanism": cls.name, "unit": unit, "relation": "add-remove", "epsilon": epsilon, "delta": delta,
            "accountant": accountant, "noise_multiplier": noise_multiplier, "sample_rate": sample_rate,
            "steps": steps, "max_grad_norm": max_grad_norm, "run_id": run_id, "seeded": seeded,
        }
        validate_ledger([entry])
        return entry


@register
class DpSgd(SubsampledGaussian):
    name = "dp-sgd"


def dp_sgd_entry(*, mechanism: str = DpSgd.name, **params: Any) -> Entry:
    """`SubsampledGaussian.entry` of the mechanism named (`dp-sgd`, or another accounted as its steps)."""
    found = mechanisms()[mechanism]
    assert isinstance(found, SubsampledGaussian), f"{mechanism} is not accounted as subsampled Gaussian steps"
    return found.entry(**params)
