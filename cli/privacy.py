"""`taskvec audit`: a membership-inference attack on a model, to see what DP protects, or (`--canaries`) an
empirical ε of the export mechanism itself."""

from __future__ import annotations

from pathlib import Path

import typer
from taskvec.cli.console import console, print_json


def audit(
    model: Path = typer.Argument(..., help="Model file or run directory to attack (--canaries: a noised vector)."),
    members: Path | None = typer.Option(None, help="Data the model was trained on (any layout `finetune` reads)."),
    non_members: Path | None = typer.Option(None, "--non-members", help="Data from the same source it never saw."),
    canaries: int | None = typer.Option(
        None, help="Audit the export mechanism of a noised vector with this many canaries (e.g. 1000)."
    ),
    max_dim: int = typer.Option(1_000_000, "--max-dim", help="--canaries: coordinates the canaries span."),
    members_split: str = typer.Option("all", "--members-split", help="train | val | test | all"),
    non_members_split: str = typer.Option("all", "--non-members-split", help="train | val | test | all"),
    reference: Path | None = typer.Option(
        None, help="The base the model was fine-tuned from: adds the difficulty-calibrated attack."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda | mps"),
    batch_size: int = typer.Option(64, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Membership inference: ROC AUC and TPR at 1% FPR of telling training images from unseen ones; or,
    with --canaries, claimed vs empirical ε of one export release (Andrew et al. 2024)."""
    from taskvec.cli.console import usage

    if canaries is not None:
        return _canaries(model, canaries, max_dim, as_json)
    if members is None or non_members is None:
        usage("audit needs --members and --non-members (or --canaries N for a noised vector)")
    from taskvec.audits.membership import audit_model
    from taskvec.privacy.ledger import summarize_ledger

    r = audit_model(model, members, non_members, members_split=members_split,
                    non_members_split=non_members_split, reference=reference, device=device,
                    batch_size=batch_size)
    if as_json:
        print_json(r)
        return
    console.print(f"{r['model']}: {r['members']} members, {r['non_members']} non-members; "
                  f"privacy: {summarize_ledger(r['privacy'])}")
    loss = r["mean_loss"]
    console.print(f"mean loss: members {loss['members']:.4g}, non-members {loss['non_members']:.4g}")
    for name, m in r["attacks"].items():
        console.print(f"{name:>10} attack: AUC {m['auc']:.3f}, TPR at 1% FPR {m['tpr_at_1pct_fpr']:.3f}")
    console.print("(AUC 0.5 and TPR 0.01 are chance)")


def _canaries(vector: Path, canaries: int, max_dim: int, as_json: bool) -> None:
    from dataclasses import asdict

    from taskvec.audits.canaries import audit_vector

    a = audit_vector(vector, canaries=canaries, max_dim=max_dim)
    if as_json:
        print_json(asdict(a))
        return
    console.print(f"{vector}: export mechanism, clip {a.clip:g}, noise multiplier {a.noise_multiplier:g}, "
                  f"{a.canaries} canaries over {a.dim:,} coordinates, δ = {a.delta:g}")
    console.print(f"claimed ε (one release, per site, add-remove): {a.claimed_epsilon:.3f}")
    console.print(f"empirical ε estimate (Gaussian fit):          {a.epsilon_estimate:.3f}")
    console.print(f"empirical ε lower bound ({a.confidence:.0%} confidence):   {a.epsilon_lower_bound:.3f}")
    if a.epsilon_lower_bound > a.claimed_epsilon:
        console.print("[bold red]the lower bound exceeds the claim: the mechanism leaks more than it says[/]")


def register(app: typer.Typer) -> None:
    app.command()(audit)
