"""`taskvec plan-dp`: what a DP run will look like at a site, from public numbers and its count of units, before
it touches the data (`taskvec.training.planning`)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from taskvec.cli.console import console, print_json
from taskvec.privacy import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM, DEFAULT_SAMPLE_RATE


def plan_dp(
    base: Path = typer.Option(..., help="The base model file the site would fine-tune."),
    units: int = typer.Option(..., help="The site's count of units (images, or patients). The recommended P and "
                              "mode show in released vectors: give a count the site may disclose (e.g. rounded)."),
    epsilon: float = typer.Option(..., help="Target ε of the run."),
    delta: float = typer.Option(DEFAULT_DELTA, help="δ of the guarantee."),
    clip: float = typer.Option(DEFAULT_MAX_GRAD_NORM, "--max-grad-norm", help="Clip C of each unit's contribution."),
    sample_rate: float = typer.Option(DEFAULT_SAMPLE_RATE, "--sample-rate", help="DP-SGD's sampling rate q."),
    stats_dim: int | None = typer.Option(None, "--stats-dim", help="P of the statistics head's mode "
                                         "(`stats-head:P`); default: the recommended P."),
    sites: int = typer.Option(1, "--sites", help="Sites of about as many units whose statistics a merge will sum "
                              "(for the recommended P)."),
    steps: int | None = typer.Option(None, help="DP-SGD's optimiser steps, as `finetune --steps` (default: its own)."),
    stats_share: float | None = typer.Option(
        None, "--stats-share", help="Plan two stages under the one ε: the statistics head at this share of it, each "
                                    "DP-SGD mode from it at the rest (`finetune --epsilon-includes-lineage`)."),
    mode: list[str] | None = typer.Option(None, "--mode", help="Modes to predict (repeat); default: every DP-SGD "
                                          "mode without a count and the statistics head."),
    as_json: bool = typer.Option(False, "--json", help="Print the prediction as JSON."),
) -> None:
    """Predict a DP run before it runs: each mode's noise, its noise-to-signal ratio and the recommended mode.

    Each mode's noise multiplier for the target ε, its per-step noise-to-signal ratio z·√d/(q·N) (DP-SGD) or its
    class-sum ratio z·√p·k/(a_S·N) (statistics head), the recommended mode (and the DP-SGD mode to run from a
    recommended statistics head, when its steps' noise allows) and the recommended P of the statistics head."""
    from taskvec.training.planning import STAGE_SHARE
    from taskvec.training.planning import plan_dp as predict

    plan = predict(base, units, epsilon, delta, clip=clip, sample_rate=sample_rate, stats_dim=stats_dim,
                   sites=sites, modes=mode or None, steps=steps, stats_share=stats_share)
    if as_json:
        print_json(asdict(plan))
        return
    stages = "" if stats_share is None else f" (statistics at {stats_share:g} of it, DP-SGD at the rest)"
    table = Table(title=f"{units} units, ε = {epsilon:g}{stages}, δ = {delta:g}, clip {clip:g}, q = {sample_rate:g}")
    for col in ("mode", "noise multiplier", "steps", "coordinates", "noise / signal"):
        table.add_column(col)
    for p in plan.modes:
        table.add_row(p.mode, f"{p.noise_multiplier:.3g}", str(p.steps), f"{p.coordinates:,}",
                      f"{p.noise_to_signal:.3g}")
    console.print(table)
    console.print(f"recommended: {plan.recommended}")
    if plan.stats_dim is not None:
        console.print(f"recommended statistics head: stats-head:{plan.stats_dim}")
    if plan.then is not None:
        share = f"{stats_share:g}" if stats_share is not None else f"{STAGE_SHARE:g} (--stats-share)"
        ratio = f"{plan.then_noise_to_signal:.3g}"
        console.print(f"then: {plan.then} from the model {plan.recommended} gives (merged over the sites), under the "
                      f"same ε (finetune --epsilon-includes-lineage): step noise / signal {ratio} with the statistics "
                      f"at {share} of ε. On PBC this second stage raised AUROC at every ratio measured (0.71 to 4.0), "
                      "and balanced accuracy on iid sites at up to 1.54.")
    for w in plan.warnings:
        console.print(f"warning: {w}", style="yellow")


def register(app: typer.Typer) -> None:
    app.command("plan-dp")(plan_dp)
