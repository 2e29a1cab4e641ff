"""`taskvec merge`: from the command line to a `MergePlan` and `taskvec.merging.stream.merge_vectors`.

Follow a merge in three files: this one (options → plan), `taskvec/merging/stream.py` (`merge_vectors`: plan →
reading, accumulating, writing, one module each beside it) and `taskvec/merging/methods.py` (the arithmetic).
The list of methods and their parameters in `--help` comes from the method registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from taskvec.cli.console import FLAGS, console, track, usage, warn
from taskvec.cli.exchange import KEYRING_HELP, ONLY_HELP, TRUST_HELP, UNSIGNED_HELP
from taskvec.errors import ConfigError
from taskvec.io.lineage import DEFAULT_STALENESS, STALENESS_RULE
from taskvec.merging.methods import DEFAULT_METHOD, MERGE_METHODS

STALENESS_HELP = (f"Exponent a of the staleness weight {STALENESS_RULE} of a vector fine-tuned from version K, "
                  "merged onto version N; 0: no discount.")
METHODS_HELP = "Methods (--method NAME, parameters with --param NAME=VALUE):\n\n" + "\n\n".join(
    escape(f"• {m.describe()} ({m.reference})") for m in MERGE_METHODS.values()
)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def parse_params(items: list[str] | None) -> dict[str, str]:
    """`--param NAME=VALUE` options as a dict (values are checked by the method)."""
    params = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"param takes NAME=VALUE, got {item!r}", field="param", got=item)
        params[name.strip()] = value.strip()
    return params


def merge(
    vectors: list[Path] | None = typer.Argument(None, help="Vector files to merge (and/or --registry R)."),
    base: Path | None = typer.Option(
        None, help="The model to merge onto: the base, or a merged version (vectors against it or any version in "
                   "its lineage are accepted). With --registry: default its newest version, taking only vectors not "
                   "merged into it yet."
    ),
    out: Path | None = typer.Option(None, help="Merged model file to write (--incremental: a copy of the version)."),
    method: str = typer.Option(DEFAULT_METHOD, help=f"One of {', '.join(MERGE_METHODS)} (listed below)."),
    param: list[str] | None = typer.Option(None, "--param", "-p", help="A method parameter NAME=VALUE (repeatable)."),
    density: float | None = typer.Option(None, help="Shorthand for --param density=D (dare, ties, breadcrumbs)."),
    scale: float = typer.Option(1.0, help="λ in base + λ·combine(vectors)."),
    seed: int = typer.Option(0, help="Seed of random drops (dare, dare_ties), per vector and tensor."),
    staleness: float = typer.Option(DEFAULT_STALENESS, help=STALENESS_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    registry: str | None = typer.Option(
        None, "--registry", "-r", help="Merge the vectors in this registry (folder or hf://ORG/REPO), each checked."
    ),
    only_contributor: list[str] | None = typer.Option(None, "--only-contributor", help="With --registry: " + ONLY_HELP),
    since: str | None = typer.Option(None, help="With --registry: only vectors pushed at or after this ISO time."),
    incremental: bool = typer.Option(
        False, "--incremental", help="Add only new vectors to the running merge in --state (consensus: recompute)."
    ),
    state: Path | None = typer.Option(None, help="State directory of --incremental: versions merged-vN, history."),
    diagnose: bool = typer.Option(
        False, "--diagnose", help="Report each vector's norm, cosine and sign agreement to the median; flag outliers."
    ),
    exclude_outliers: bool = typer.Option(
        False, "--exclude-outliers", help="Diagnose, and leave flagged vectors out (recorded in the merged file)."
    ),
    calibrate: Path | None = typer.Option(
        None, "--calibrate", help="Choose λ on this validation data (grid search; re-estimates BatchNorm)."
    ),
    select: Path | None = typer.Option(
        None, "--select", help="Choose the method and λ on this validation data (every method, each calibrated)."
    ),
    contributions: Path | None = typer.Option(
        None, "--contributions", help="Leave-one-out value of each vector on this validation data (N+1 merges)."
    ),
    max_epsilon: float | None = typer.Option(
        None, "--max-epsilon", help="Refuse a contributor whose composed ε per --unit is above this (no DP: ε = ∞)."
    ),
    unit: str | None = typer.Option(None, help="What --max-epsilon protects: image | patient | site."),
    relation: str = typer.Option(
        "add-remove", help="Neighbouring relation of --max-epsilon: add-remove | replace-one."
    ),
    require_dp: bool = typer.Option(False, "--require-dp", help="Refuse any vector without a DP guarantee."),
    keyring: Path | None = typer.Option(None, help="With --registry: " + KEYRING_HELP),
    trust: list[str] | None = typer.Option(None, "--trust", help="With --registry: " + TRUST_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="With --registry: " + UNSIGNED_HELP),
) -> None:
    """Merge data vectors into synthetic weights: base + λ·combine(vectors), streaming where the method allows."""
    from taskvec.cli.exchange import merge_inputs, trust_policy
    from taskvec.merging.stream import MergePlan, merge_vectors
    from taskvec.privacy.ledger import PrivacyBudget

    policy = trust_policy(keyring, trust, allow_unsigned)
    paths, base = merge_inputs(vectors, registry, base, only_contributor, since, incremental, state, out, policy)
    if calibrate is not None and select is not None:
        usage("--select already calibrates λ; give --select or --calibrate, not both")
    plan = MergePlan.create(
        paths, base, method=method, params=parse_params(param),
        density=density, scale=scale, seed=seed, budget=PrivacyBudget(max_epsilon, unit, relation, require_dp),
        exclude_outliers=exclude_outliers, staleness=staleness,
    )
    if state is not None:
        if calibrate or select or contributions or diagnose or exclude_outliers:
            usage("--incremental adds vectors to a running merge; merge in full to calibrate, select, diagnose or "
                  "value contributions")
        _incremental(plan, state, out, force)
        return
    assert out is not None
    cal, sel, con = (_calibrator(d, scale) for d in (calibrate, select, contributions))
    r = merge_vectors(plan.vectors, base, out, plan, force=force, track=track, diagnostics=diagnose,
                      calibrate=cal, select=sel, contributions=con)
    _print_record(r.record)
    for w in r.warnings:
        warn(w)
    console.print(f"wrote {r.path}: {r.method} of {len(r.vectors)} vectors, λ={r.scale:g}")
    console.print(f"model identity {r.identity}")


def _calibrator(data: Path | None, scale: float) -> Any:
    if data is None:
        return None
    from taskvec.merging.calibrate import Calibrator

    return Calibrator(data, prefer=scale, track=track)


def _incremental(plan: Any, state: Path, out: Path | None, force: bool) -> None:
    """`taskvec merge --incremental`: the next version in STATE from the vectors it does not hold yet."""
    from taskvec.merging.incremental import merge_incremental

    r = merge_incremental(plan.vectors, plan.base, state, plan, out=out, force=force, track=track)
    for note in r.notes:
        console.print(note)
    if r.merge is None:
        console.print(f"up to date: {r.path} (version {r.version}) already holds these {len(plan.vectors)} vectors")
    else:
        for w in r.merge.warnings:
            warn(w)
        console.print(f"wrote {r.path} (version {r.version}, {r.mode}): {plan.method} of "
                      f"{len(r.merge.vectors)} vectors, {len(r.added)} new, λ={plan.scale:g}")
        console.print(f"model identity {r.merge.identity}")
    if out is not None:
        console.print(f"copied to {out}")


def _print_record(rec: dict[str, Any]) -> None:
    """The tables a merge recorded: privacy per contributor, diagnostics, selection, calibration, contributions."""
    spent = rec.get("privacy_budget") or {}
    if spent.get("contributors"):
        per = spent["composed_per"]
        t = Table("contributor", "ε", "δ", "vectors (in earlier versions)", "composition",
                  title=f"each contributor's releases composed per {per['unit']} ({per['relation']})")
        for who, c in sorted(spent["contributors"].items()):
            t.add_row(who, f"{c['epsilon']:.3g}", f"{c['delta']:.1e}", f"{c['vectors']} ({c['earlier']})",
                      c["composition"])
        console.print(t)
    if "diagnostics" in rec:
        t = Table("contributor", "sha256", "norm", "cos to median", "sign agreement", "flag",
                  title="diagnostics against the coordinate-wise median")
        for d in rec["diagnostics"]:
            t.add_row(d["contributor"], d["sha256"][:12], f"{d['norm']:.4g}", f"{d['cosine']:.3f}",
                      f"{d['sign_agreement']:.0%}", d["flag"] or "")
        console.print(t)
        for d in rec.get("excluded", []):
            warn(f"excluded {d['contributor']} ({d['sha256'][:12]}): {d['reason']}")
    if "selection" in rec:
        s = rec["selection"]
        t = Table("method", "best λ", s["metric"], title=f"selection on {s['data']} ({s['samples']} images)")
        for row in s["candidates"]:
            if "skipped" in row:
                t.add_row(row["method"], "-", f"skipped: {row['skipped']}")
            else:
                mark = " ←" if row["method"] == s["chosen"]["method"] else ""
                t.add_row(row["method"], f"{row['scale']:g}", f"{_fmt(row['value'])}{mark}")
        console.print(t)
        console.print(f"chose {s['chosen']['method']} at λ={s['chosen']['scale']:g} (scores are on the selection "
                      "data, so optimistic)")
    if "calibration" in rec:
        c = rec["calibration"]
        t = Table("λ", c["metric"], title=f"calibration on {c['data']} ({c['samples']} images)")
        for row in c["grid"]:
            mark = " ←" if row["scale"] == c["chosen"] else ""
            t.add_row(f"{row['scale']:g}", f"{_fmt(row['value'])}{mark}")
        console.print(t)
        bn = "BatchNorm statistics re-estimated on it; " if c["batchnorm_reestimated"] else ""
        console.print(f"chose λ={c['chosen']:g} ({bn}scores are on the calibration data, so optimistic)")
    if "contributions" in rec:
        c = rec["contributions"]
        t = Table("contributor", "sha256", f"{c['metric']} without", "value",
                  title=f"leave-one-out on {c['data']} ({c['samples']} images)")
        for s in c["sites"]:
            t.add_row(str(s["contributor"]), s["sha256"][:12], _fmt(s["without"]), _fmt(s["value"]))
        console.print(t)
        console.print(f"{c['metric']} {_fmt(c['with_all'])} with all vectors; value = that minus the score "
                      "without the vector (on the merger's data, so optimistic)")


def register(app: typer.Typer) -> None:
    app.command(epilog=METHODS_HELP)(merge)
    # errors name a method parameter; it is set with --param NAME=VALUE (density also has its own flag)
    FLAGS.update({p.name: f"--param {p.name}" for m in MERGE_METHODS.values() for p in m.params if p.name != "density"})
