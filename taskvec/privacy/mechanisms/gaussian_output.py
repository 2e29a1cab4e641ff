"""`gaussian-output`: export-time noise, clip(Δ) + N(0, (z·C)²) released once per export, Δ the site's whole
delta clipped to L2 norm C (`NoiseRequest`: clip, and a noise multiplier or the ε to reach).

Two entries describe it: against the site's data being absent (Δ = 0) the sensitivity is C (site add-remove);
against *any* change of the site's data (a patient or an image added, removed or replaced included) it is 2C
(site replace-one), since two clipped deltas lie in one ball of radius C. ε is the analytic Gaussian
mechanism's (Balle & Wang 2018), each entry listing the noise multipliers of its run's exports (`releases`),
composed exactly as Gaussian DP; a contributor's export histories compose the same way (Dong, Roth & Su 2019).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from taskvec.errors import PrivacyConfigError, check_range
from taskvec.io.schema import is_positive
from taskvec.privacy.accounting import (
    ANALYTIC_GAUSSIAN,
    GDP_COMPOSITION,
    composed_noise_multiplier,
    gaussian_epsilon,
    gaussian_noise_multiplier,
)
from taskvec.privacy.mechanism import Composition, Contribution, Entry, Mechanism, register


@dataclass(frozen=True)
class NoiseRequest:
    """Export-time privacy options: clip to `clip`; noise by `noise_multiplier`, or by the one that brings
    the run's exports to `epsilon` (site level, add-remove) at `delta`."""

    clip: float | None = None
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float | None = None

    @property
    def noised(self) -> bool:
        return self.noise_multiplier is not None or self.epsilon is not None

    def check(self) -> None:
        if self.clip is not None:
            check_range("clip", self.clip, low=0, error=PrivacyConfigError)
        if self.noise_multiplier is not None and self.epsilon is not None:
            raise PrivacyConfigError("noise_multiplier and `epsilon` exclude each other: give one",
                                     field="noise_multiplier")
        if not self.noised:
            return
        if self.clip is None:
            raise PrivacyConfigError("clip is needed with noise: without clipping noise gives no guarantee "
                                     "(the clip is the sensitivity)", field="clip")
        if self.delta is None:
            given = "noise_multiplier" if self.noise_multiplier is not None else "epsilon"
            raise PrivacyConfigError(f"delta is needed with `{given}` (for example 1e-5)", field="delta")
        check_range("delta", self.delta, low=0, high=1, error=PrivacyConfigError)
        if self.noise_multiplier is not None:
            check_range("noise_multiplier", self.noise_multiplier, low=0, error=PrivacyConfigError)
        if self.epsilon is not None:
            check_range("epsilon", self.epsilon, low=0, error=PrivacyConfigError)

    def solve(self, earlier: list[float]) -> float:
        """The noise multiplier of this release, given the run's earlier noised releases."""
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        assert self.epsilon is not None and self.delta is not None
        return remaining_noise_multiplier(self.epsilon, self.delta, earlier)


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


class Exports(Composition):
    """Noised releases composed exactly: μ-GDP, μ² = Σ (sensitivity/σ)²."""

    description = f"{GDP_COMPOSITION} when all are export noise"

    def distinct(self, found: Sequence[tuple[Contribution, Entry]]) -> list[Entry]:
        """Entries whose release lists together hold every noised release of the vectors. Per run (a vector
        without a run id is a run of its own) the longest list stands for all only when the files prove they
        are one history: every list a prefix of it and no two distinct vectors (by sha256) with lists of one
        length, so they are distinct releases of it and no more than it lists. Otherwise (a model file copied
        and exported in two places, two trainings of one run folder) each distinct vector's whole list counts."""
        runs: dict[Any, dict[Any, Entry]] = {}
        for i, (v, e) in enumerate(found):
            runs.setdefault(v.run if v.run is not None else ("vector", i), {}).setdefault(v.sha256 or i, e)
        histories = []
        for run in runs.values():
            entries = list(run.values())
            longest = max(entries, key=lambda e: (e["steps"], e["epsilon"]))
            lengths = [len(e["releases"]) for e in entries]
            one = all(e["releases"] == longest["releases"][:n] for e, n in zip(entries, lengths))
            histories += [longest] if one and len(set(lengths)) == len(lengths) else entries
        return histories

    def compose(self, entries: Sequence[Entry]) -> tuple[float, float, str]:
        mu = math.sqrt(sum((GaussianOutput.sensitivities[e["relation"]] / composed_noise_multiplier(e["releases"])) ** 2
                           for e in entries))
        delta = max(e["delta"] for e in entries)
        return gaussian_epsilon(1 / mu, delta), delta, GDP_COMPOSITION


@register
class GaussianOutput(Mechanism):
    name = "gaussian-output"
    units = ("site",)  # the whole delta is clipped: one patient can move it by 2C, which site replace-one bounds
    sensitivities = {"add-remove": 1.0, "replace-one": 2.0}  # × clip: two clipped deltas lie in one ball
    composition = Exports()

    def epsilon(self, entry: Entry) -> float:
        return _epsilon(entry["releases"], entry["relation"], entry["delta"])

    def problem(self, entry: Entry) -> tuple[str, str] | None:
        zs = entry.get("releases")
        if not (isinstance(zs, list) and len(zs) == entry["steps"] and all(map(is_positive, zs))
                and zs[-1] == entry["noise_multiplier"]):
            return "releases", "releases must list the noise multiplier of each of the run's `steps` releases"
        if entry.get("sensitivity", None) != self.sensitivities[entry["relation"]] * entry.get("clip", math.nan):
            factor = self.sensitivities[entry["relation"]]
            return "sensitivity", f"sensitivity must be {factor:g} × clip for {entry['relation']}"
        return None


def gaussian_output_entries(
    noise_multipliers: Sequence[float], clip: float, delta: float, run_id: str | None,
    declared_public: Sequence[str] = (),
) -> list[Entry]:
    """The two ledger entries of an export-time Gaussian release, the last of `noise_multipliers` (the
    run's noised exports in order, all composed): site add-remove (sensitivity C) and site replace-one
    (sensitivity 2C, which bounds every patient- and image-level change too)."""
    zs = [float(z) for z in noise_multipliers]
    return [{
        "mechanism": GaussianOutput.name,
        "unit": "site",
        "relation": relation,
        "epsilon": _epsilon(zs, relation, delta),
        "delta": delta,
        "accountant": ANALYTIC_GAUSSIAN,
        "noise_multiplier": zs[-1],
        "sample_rate": 1.0,
        "steps": len(zs),
        "releases": zs,
        "clip": clip,
        "sensitivity": GaussianOutput.sensitivities[relation] * clip,
        "run_id": run_id,
        "declared_public": list(declared_public),
    } for relation in GaussianOutput.sensitivities]


def _epsilon(releases: Sequence[float], relation: str, delta: float) -> float:
    return gaussian_epsilon(composed_noise_multiplier(releases) / GaussianOutput.sensitivities[relation], delta)
