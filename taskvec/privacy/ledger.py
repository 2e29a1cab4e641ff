"""Privacy maths and the privacy ledger.

Every guarantee taskvec records is one ledger entry that names its mechanism, its unit of privacy and
how ε was computed. Nothing without noise is ever recorded as DP.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskvec.errors import PrivacyConfigError, PrivacyError, check_range

ANALYTIC_GAUSSIAN = "analytic-gaussian (Balle & Wang 2018)"
MECHANISMS = ("dp-sgd", "gaussian-output")
UNITS = ("image", "patient", "site")
LEDGER_FIELDS = (
    "mechanism", "unit", "epsilon", "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "run_id"
)
RELEASES_FILE = "privacy_releases.json"


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


def gaussian_output_entry(
    noise_multiplier: float, clip: float, delta: float, run_id: str | None,
    earlier: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Ledger entry for an export-time Gaussian release of a site's whole clipped contribution.

    `earlier` are the noised releases of the same run before this one: ε is that of all of them composed,
    `steps` counts them, and the entry lists the earlier ones.
    """
    zs = [r["noise_multiplier"] for r in earlier] + [noise_multiplier]
    entry: dict[str, Any] = {
        "mechanism": "gaussian-output",
        "unit": "site",
        "epsilon": gaussian_epsilon(composed_noise_multiplier(zs), delta),
        "delta": delta,
        "accountant": ANALYTIC_GAUSSIAN,
        "noise_multiplier": noise_multiplier,
        "sample_rate": 1.0,
        "steps": len(zs),
        "clip": clip,
        "run_id": run_id,
    }
    if earlier:
        entry["composition"] = f"{len(zs)} releases of this run, composed exactly as Gaussian (GDP)"
        entry["earlier_releases"] = list(earlier)
    return entry


def dp_sgd_entry(
    *, epsilon: float, delta: float, accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
    max_grad_norm: float, unit: str, run_id: str | None,
) -> dict[str, Any]:
    """Ledger entry for DP-SGD training (Poisson-subsampled Gaussian mechanism, `steps` times)."""
    entry = {
        "mechanism": "dp-sgd", "unit": unit, "epsilon": epsilon, "delta": delta, "accountant": accountant,
        "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "steps": steps,
        "max_grad_norm": max_grad_norm, "run_id": run_id,
    }
    validate_ledger([entry])
    return entry


def validate_ledger(ledger: Any, where: str = "ledger") -> list[dict[str, Any]]:
    """Check every entry against the schema; a guarantee without noise or clipping is refused."""
    if not isinstance(ledger, list):
        raise PrivacyError(f"{where}: privacy ledger must be a list of mechanisms")
    for i, e in enumerate(ledger):
        what = f"{where}: privacy entry {i}"
        if not isinstance(e, dict):
            raise PrivacyError(f"{what} is not an object")
        missing = [f for f in LEDGER_FIELDS if f not in e]
        if missing:
            raise PrivacyError(f"{what} lacks {', '.join(missing)}")
        if e["mechanism"] not in MECHANISMS:
            raise PrivacyError(f"{what}: unknown mechanism {e['mechanism']!r} (known: {', '.join(MECHANISMS)})")
        if e["unit"] not in UNITS:
            raise PrivacyError(f"{what}: unknown unit {e['unit']!r} (known: {', '.join(UNITS)})")
        if not _positive(e["noise_multiplier"]):
            raise PrivacyError(f"{what}: noise multiplier {e['noise_multiplier']!r}; without noise there is no DP")
        if not _positive(e.get("max_grad_norm", e.get("clip"))):
            raise PrivacyError(f"{what}: no clipping bound (max_grad_norm or clip); noise without it gives no DP")
        if not (isinstance(e["epsilon"], (int, float)) and 0 <= e["epsilon"] < math.inf):
            raise PrivacyError(f"{what}: epsilon must be a finite number >= 0, got {e['epsilon']!r}")
        if not (isinstance(e["delta"], (int, float)) and 0 < e["delta"] < 1):
            raise PrivacyError(f"{what}: delta must be in (0, 1), got {e['delta']!r}")
        if not (isinstance(e["sample_rate"], (int, float)) and 0 < e["sample_rate"] <= 1):
            raise PrivacyError(f"{what}: sample_rate must be in (0, 1], got {e['sample_rate']!r}")
        if not (isinstance(e["steps"], int) and e["steps"] >= 1):
            raise PrivacyError(f"{what}: steps must be an integer >= 1, got {e['steps']!r}")
    return ledger


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def strongest_guarantee(ledger: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry with the smallest ε, or None without DP.

    Each entry holds on its own (export noise is post-processing of a DP-SGD model, and a site-level
    guarantee implies the patient- and image-level ones), so the smallest ε bounds the vector.
    """
    return min(ledger, key=lambda e: e["epsilon"], default=None)


def check_budget(ledgers: Sequence[tuple[str, Any]], max_epsilon: float | None, require_dp: bool) -> None:
    """Refuse inputs (name, ledger) whose ledger is malformed, or above the budget ε, or without DP when
    `require_dp` or a budget is given (no guarantee is ε = ∞)."""
    if max_epsilon is not None:
        check_range("max_epsilon", max_epsilon, low=0, error=PrivacyConfigError)
    for name, ledger in ledgers:
        best = strongest_guarantee(validate_ledger(ledger, name))
        if best is None and (require_dp or max_epsilon is not None):
            raise PrivacyError(f"{name}: carries no DP guarantee (ε = ∞); it is refused by "
                               f"{'`require_dp`' if require_dp else f'`max_epsilon` {max_epsilon:g}'}", path=name)
        if best is not None and max_epsilon is not None and best["epsilon"] > max_epsilon:
            raise PrivacyError(f"{name}: its best guarantee is ε = {best['epsilon']:.4g} per {best['unit']} "
                               f"({best['mechanism']}), above the budget `max_epsilon` {max_epsilon:g}", path=name,
                               field="epsilon", expected=max_epsilon, got=best["epsilon"])


def check_files_budget(paths: Sequence[str | os.PathLike[str]], max_epsilon: float | None, require_dp: bool) -> None:
    """`check_budget` over vector files, from their headers alone."""
    from taskvec.io.files import read_kind

    check_budget([(str(p), read_kind(p, "vector").meta.get("privacy", [])) for p in paths], max_epsilon, require_dp)


def releases_path(model_file: str | os.PathLike[str]) -> Path:
    """Where exports of the models in a directory are recorded: `privacy_releases.json` beside them."""
    return Path(model_file).parent / RELEASES_FILE


def read_releases(record: Path, key: str) -> list[dict[str, Any]]:
    """Earlier exports of the run `key` recorded in `record` (a run's releases compose)."""
    if not record.exists():
        return []
    try:
        runs = json.loads(record.read_text())["runs"]
    except (ValueError, KeyError, TypeError) as e:
        raise PrivacyError(f"{record}: unreadable release record ({e}); it is needed to compose exports") from None
    return list(runs.get(key, []))


def record_release(record: Path, key: str, release: dict[str, Any]) -> None:
    """Append one export of run `key` to the record (rewritten atomically)."""
    from taskvec.io.files import write_json

    runs = json.loads(record.read_text())["runs"] if record.exists() else {}
    runs.setdefault(key, []).append(release)
    write_json(record, {"format": "taskvec-releases", "version": 1, "runs": runs})


def summarize_ledger(ledger: list[dict[str, Any]]) -> str:
    """One line for humans: 'no DP' or each mechanism's (ε, δ) and unit."""
    if not ledger:
        return "no DP"
    return "; ".join(
        f"{e['mechanism']} ε={e['epsilon']:.3g} δ={e['delta']:.1e} per {e['unit']}" for e in ledger
    )
