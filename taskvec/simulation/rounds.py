"""Asynchronous rounds: play a `Schedule` with real training, re-basing and staleness-weighted merges.

Each arrival is a real fine-tune of the site's data from the model file of the version it started from,
exported against that version; each publication merges its buffer onto the newest version with the
staleness weight `(1 + d) ** -staleness` (d = newest version − the vector's base version) and is evaluated
on the test split. A site's first arrival starts from the base, so it is the one-shot run of that site
(`first`), reused. Every step is a file that is reused when it exists, so a killed simulation resumes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from taskvec.errors import MismatchError
from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector, released_statistics
from taskvec.merging.stream import merge_vectors
from taskvec.privacy.ledger import PrivacyBudget
from taskvec.simulation.schedule import Arrival, Schedule
from taskvec.training.data import ImageDataset
from taskvec.training.loop import METRICS_FILE, FinetuneConfig, finetune

Evaluate = Callable[[str, Path, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RoundsSetup:
    """What every arrival shares: merge `method` and `staleness` exponent, `seed`, and the privacy `budget`
    under which merges report each contributor's composed ε (None: no DP, nothing to compose)."""

    method: str
    staleness: float
    seed: int
    budget: PrivacyBudget | None


def export_site_vector(model: Path | str, base: Path, out: Path, site: int) -> Path:
    """`out`: the vector of `model` against `base` (exported once: re-exporting a DP run would spend its budget
    again). A simulation declares each site's training count public, `weighted` needs it, except for a run whose
    mode releases statistics instead of deltas: those carry their own (noised) counts."""
    header = read_kind(model, "model")
    if not out.exists():
        statistics = released_statistics(header) is not None
        trained = json.loads((Path(model).parent / METRICS_FILE).read_text())["samples"]["train"]
        export_vector(model, base, out, contributor=f"site{site}", samples=None if statistics else trained)
    source, m = read_kind(out, "vector").vector.source or {}, header.model
    if source.get("run_id") != m.run_id or source.get("identity", m.identity) != m.identity:  # replaced since
        raise MismatchError(f"{out}: is not the vector of {model} (another run or model); delete it to export "
                            "that model's vector again", path=out)
    return out


def run_rounds(schedule: Schedule, setup: RoundsSetup, root: Path, base: Path, sites: list[ImageDataset],
               run_cfg: FinetuneConfig, first: list[Path], evaluate: Evaluate,
               progress: Callable[[str], None]) -> list[dict[str, Any]]:
    """Play `schedule` into `root` (`site<i>-r<k>/` runs, `site<i>-r<k>.safetensors` vectors, `v<N>.safetensors`
    versions); return one row per published version. `first[i]` is site i's vector from its one-shot run."""
    root.mkdir(exist_ok=True)
    versions = [base]
    vectors: list[Path] = []
    rows = []
    composed: dict[str, float] = {}  # each site's ε from the newest version holding one of its vectors
    for event in schedule.events():
        if isinstance(event, Arrival):
            vectors.append(first[event.site] if event.round == 0 else
                           _arrival(event, root, versions[event.base_version], sites, run_cfg, progress))
            continue
        path = root / f"v{event.version}.safetensors"
        merged = [vectors[i] for i in event.arrivals]
        if not path.exists():
            _check_distinct(merged)
            progress(f"merging {len(merged)} arrivals into version {event.version}")
            merge_vectors(merged, versions[-1], path, method=setup.method, seed=setup.seed,
                          staleness=setup.staleness, budget=setup.budget or PrivacyBudget())
        versions.append(path)
        extra = _version_record(schedule, event.version)
        if setup.budget is not None:  # a merge composes its contributors' releases over the whole lineage
            merge = read_kind(path, "model").model.merge
            record = merge.privacy_budget if merge is not None else None
            assert record is not None, "a merge with a budget records it"
            composed.update({who: c["epsilon"] for who, c in record["contributors"].items()})
            extra["composed_epsilon"] = dict(sorted(composed.items()))
        rows.append(evaluate(f"async-v{event.version}@{extra['arrivals']}", path, extra))
    return rows


def _check_distinct(vectors: list[Path]) -> None:
    """Refuse a buffer holding one vector twice: two arrivals of a site from one version gave the same tensors,
    as a deterministic run does (one full-batch step without DP), and merging them would count one run twice."""
    seen: dict[str, Path] = {}
    for p in vectors:
        sha = read_kind(p, "vector").vector.sha256
        if sha in seen:
            raise MismatchError(f"{p}: fine-tuning again from the same version gave the same vector as {seen[sha]} "
                                "(a deterministic run, e.g. one full-batch step); give the sites more steps or "
                                "data per run, or fewer rounds", path=p)
        seen[sha] = p


def _arrival(a: Arrival, root: Path, base: Path, sites: list[ImageDataset], run_cfg: FinetuneConfig,
             progress: Callable[[str], None]) -> Path:
    name = f"site{a.site}-r{a.round + 1}"
    progress(f"site{a.site}, arrival {a.round + 1}: fine-tunes from version {a.base_version} "
             f"(t = {a.start:g} to {a.end:g})")
    run = finetune(base, sites[a.site], root / name,
                   replace(run_cfg, contributor=f"site{a.site}", seed=run_cfg.seed + 10 + a.site + 100 * a.round))
    return export_site_vector(run.model_path, base, root / f"{name}.safetensors", a.site)


def _version_record(schedule: Schedule, version: int) -> dict[str, Any]:
    """Where `version` stands in the schedule, for its row: arrivals so far, time, and what it merged."""
    pub = schedule.versions[version - 1]
    arrivals = pub.arrivals[-1] + 1
    merged = [schedule.arrivals[i] for i in pub.arrivals]
    return {
        "version": version, "arrivals": arrivals, "time": pub.time, "final": version == len(schedule.versions),
        "merged": [{"site": a.site, "round": a.round + 1, "base_version": a.base_version,
                    "staleness": version - 1 - a.base_version} for a in merged],
    }
