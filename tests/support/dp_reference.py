"""The independent reference for ε in tests: dp-accounting's PLD accountant, and a DP-SGD ledger entry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dp_accounting as dpa
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

ADD_REMOVE = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def pld_epsilon(event: Any, delta: float, relation: Any = ADD_REMOVE, interval: float = 1e-4) -> float:
    """ε of a DpEvent (a list of them: their composition) at δ, by dp-accounting's PLD accountant."""
    if isinstance(event, Sequence):
        event = dpa.ComposedDpEvent(list(event))
    acc = PLDAccountant(neighboring_relation=relation, value_discretization_interval=interval)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def dp_sgd_steps(z: float, q: float, steps: int) -> Any:
    """`steps` Poisson-subsampled Gaussian steps: DP-SGD as dp-accounting describes it."""
    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), steps)


def dp_sgd_test_entry(unit: str, accountant: str, z: float = 1.1, q: float = 0.05, steps: int = 120) -> dict[str, Any]:
    """A valid DP-SGD ledger entry (δ 1e-5, clip 1, run `r`) with ε by the accountant named."""
    from taskvec.privacy.accounting import accountant_epsilon
    from taskvec.privacy.ledger import dp_sgd_entry

    eps = accountant_epsilon(accountant, z, q, steps, 1e-5)
    return dp_sgd_entry(epsilon=eps, delta=1e-5, accountant=accountant, noise_multiplier=z, sample_rate=q,
                        steps=steps, max_grad_norm=1.0, unit=unit, run_id="r")
