"""`taskvec audit`: a membership-inference attack on a model, to see what DP protects."""

from __future__ import annotations

from pathlib import Path

import typer
from taskvec.cli.console import console, print_json


def audit(
    model: Path = typer.Argument(..., help="Model file or run directory to attack."),
    members: Path = typer.Option(..., help="Data the model was trained on (any layout `finetune` reads)."),
    non_members: Path = typer.Option(..., "--non-members", help="Data from the same source it never saw."),
    members_split: str = typer.Option("all", "--members-split", help="train | val | test | all"),
    non_members_split: str = typer.Option("all", "--non-members-split", help="train | val | test | all"),
    reference: Path | None = typer.Option(
        None, help="The base the model was fine-tuned from: adds the difficulty-calibrated attack."
    ),
    device: str = typer.Option("cpu", help="cpu | cuda | mps"),
    batch_size: int = typer.Option(64, "--batch-size"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Membership inference: ROC AUC and TPR at 1% FPR of telling training images from unseen ones."""
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


def register(app: typer.Typer) -> None:
    app.command()(audit)
