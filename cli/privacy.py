"""`taskvec audit`: a membership-inference attack on a model, to see what DP protects, or (`--canaries`) an
empirical ε of the export mechanism itself; `taskvec audit-reconstruction`: can the images be rebuilt from it?"""

from __future__ import annotations

from pathlib import Path

import typer

from taskvec.cli.console import console, device_option, print_json


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
    device: str = device_option(),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass (memory only; the losses "
                                                            "do not depend on it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Membership inference: ROC AUC and TPR at 1% FPR of telling training images from unseen ones; or,
    with --canaries, claimed vs empirical ε of one export release (Andrew et al. 2024)."""
    from taskvec.cli.console import usage

    if canaries is not None:
        if members is not None or non_members is not None or reference is not None:
            usage("--canaries audits a vector's export mechanism and reads no data: leave out --members, "
                  "--non-members and --reference")
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
    rows = [("claimed ε (one release, per site, add-remove)", a.claimed_epsilon),
            ("empirical ε estimate (Gaussian fit)", a.epsilon_estimate),
            (f"empirical ε lower bound (~{a.confidence:.0%} confidence)", a.epsilon_lower_bound)]
    for label, value in rows:
        console.print(f"{label + ':':<48} {value:.3f}")
    console.print("(the confidence is approximate: the canaries share one noise draw)")
    if a.epsilon_lower_bound > a.claimed_epsilon:
        console.print("the lower bound exceeds the claim: the mechanism leaks more than it says", style="bold red")


RECONSTRUCTION = "Attacker's assumptions (default: what the file records)"


def audit_reconstruction(
    model: Path = typer.Argument(..., help="Vector, fine-tuned model or run directory to attack."),
    base: Path = typer.Option(..., help="The base it was fine-tuned from."),
    data: Path = typer.Option(..., help="The site's training images (any layout `finetune` reads): the "
                              "reconstructions are scored against them."),
    split: str = typer.Option("train", help="train | val | test | all"),
    out: Path = typer.Option(..., help="Folder for reconstruction.json and reconstruction.png (they show patient "
                             "images: keep them at the site)."),
    samples: int | None = typer.Option(None, help="Training set size.", rich_help_panel=RECONSTRUCTION),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Local batch size.",
                                          rich_help_panel=RECONSTRUCTION),
    lr: float | None = typer.Option(None, help="Learning rate.", rich_help_panel=RECONSTRUCTION),
    steps: int | None = typer.Option(None, help="Local steps.", rich_help_panel=RECONSTRUCTION),
    img_size: int | None = typer.Option(None, "--img-size", help="Training image size (default: the base's).",
                                        rich_help_panel=RECONSTRUCTION),
    optimizer: str = typer.Option("adamw", help="adamw (taskvec's finetune) | sgd (constant lr)",
                                  rich_help_panel=RECONSTRUCTION),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help="AdamW weight decay (default: "
                                              "finetune's).", rich_help_panel=RECONSTRUCTION),
    labels_known: bool = typer.Option(True, "--labels-known/--labels-unknown", help="Does the attacker know the "
                                      "labels (masks)? Unknown: estimated with the images.",
                                      rich_help_panel=RECONSTRUCTION),
    iterations: int = typer.Option(1000, help="Optimisation steps of the attack."),
    tv: float = typer.Option(1e-2, help="Weight of the total-variation prior."),
    seed: int = typer.Option(0, help="Seed of the attack's random start."),
    device: str = device_option(),
    force: bool = typer.Option(False, "--force", help="Overwrite an earlier audit's files in --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Gradient inversion: rebuild training images from the update and score them against the real ones."""
    from taskvec.audits.reconstruction import AttackConfig, audit_reconstruction
    from taskvec.cli.console import track

    given = {"samples": samples, "batch_size": batch_size, "lr": lr, "steps": steps, "img_size": img_size,
             "optimizer": optimizer, "weight_decay": weight_decay, "labels_known": labels_known}
    assume = {k: v for k, v in given.items() if v is not None}
    r = audit_reconstruction(model, base, data, out, split=split, assume=assume, device=device, force=force,
                             attack=AttackConfig(iterations=iterations, tv=tv, seed=seed), track=track)
    if as_json:
        print_json(r)
        return
    a = r["assumptions"]
    console.print(f"assumed: {a['samples']} images, batch {a['batch_size']}, lr {a['lr']:g}, {a['steps']} steps, "
                  f"{a['img_size']} px, {a['optimizer']}, labels {'known' if a['labels_known'] else 'unknown'}")
    for name, s in [("reconstructions", r["summary"]), *r["baselines"].items()]:
        console.print(f"{name.replace('_', ' '):>16}: PSNR median {s['psnr_median']:.1f} dB (max {s['psnr_max']:.1f}), "
                      f"SSIM median {s['ssim_median']:.2f} (max {s['ssim_max']:.2f})")
    console.print(f"{r['verdict']}\nwrote {out / r['grid']} and {out / 'reconstruction.json'}")


def register(app: typer.Typer) -> None:
    app.command()(audit)
    app.command("audit-reconstruction")(audit_reconstruction)
