"""`taskvec finetune` and `taskvec evaluate`: local training and evaluation at a site."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import typer

from taskvec.cli.console import STATE, console, device_option, print_json, track, usage, warn
from taskvec.privacy import DEFAULT_AUGMULT, DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM, DEFAULT_SAMPLE_RATE
from taskvec.training.config import DP_EMA, FinetuneConfig
from taskvec.training.modes import default_mode, registered
from taskvec.training.schedule import BATCH_SHARE, DEFAULT_EPOCHS, DP_STEPS, MAX_BATCH, MIN_BATCH, MIN_STEPS

DEFAULTS = FinetuneConfig()


def _number(x: float) -> str:
    """1e-4, not 0.0001 or 1e-04."""
    return f"{x:.0e}".replace("e-0", "e-")


TRAIN_HELP = ("What to train: " + " | ".join(f"{m.usage()} ({m.help})" if m.help else m.usage() for m in registered())
              + f". Default: {default_mode(True)} for a base that starts from pretrained weights (`taskvec init "
              f"--pretrained` or `--weights`), {default_mode(False)} for one without")
LR_HELP = "Peak learning rate (AdamW, warm-up then cosine); default per --train: " + ", ".join(
    f"{m.name} {_number(m.lr)}" for m in registered() if not m.fits_in_one_pass) + "."
ONE_PASS = ", ".join(m.name for m in registered() if m.fits_in_one_pass)
PASS_BATCHES = "".join(f"; {m.name}: {m.pass_batch} (its pass only)" for m in registered() if m.pass_batch)


class _TrainProgress:
    """A rich bar over training steps with loss, throughput and ETA; epoch summaries print above it."""

    def __init__(self, config: FinetuneConfig) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True,
        )
        self.config = config

    def track(self, it: Iterable[Any], description: str, total: int) -> Iterator[Any]:
        from taskvec.training.loop import StepState

        with self.progress:
            task = self.progress.add_task(description, total=total, loss="-", ips="-")
            for st in it:
                yield st
                if not isinstance(st, StepState):  # a one-pass mode's pass: a plain bar
                    self.progress.update(task, advance=1)
                    continue
                fields: dict[str, Any] = {}
                if st.loss is not None:
                    fields = {"loss": f"{st.loss:.4f}", "ips": f"{st.images_per_s:.1f}"}
                self.progress.update(task, advance=1, description=f"epoch {st.epoch + 1}/{st.epochs}", **fields)

    def on_epoch(self, r: Any) -> None:
        from taskvec.training.metrics import primary_metric

        loss = self.config.mode.pass_name if r.train_loss is None else f"train loss {r.train_loss:.4f}"
        line = f"epoch {r.epoch}: {loss}, {r.images_per_s:.1f} img/s, {r.seconds:.1f} s"
        if r.val:
            name, value = primary_metric(r.val)
            line += f", val {name} {_fmt(value)}"
            if "accuracy" in r.val and name != "accuracy":
                line += f", val accuracy {_fmt(r.val['accuracy'])}"
        for e in r.privacy:
            line += f", {e['mechanism']} ε {e['epsilon']:.3g} (δ {e['delta']:.0e}, per {e['unit']})"
        if r.composed_epsilon is not None:
            line += f", with the earlier releases ε {r.composed_epsilon:.3g}"
        self.progress.console.print(line, soft_wrap=True)  # one line per epoch, whatever the terminal's width


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def finetune(
    base: Path = typer.Option(..., help="The shared base model file."),
    data: Path = typer.Option(..., help="ImageFolder tree, CSV (path,label[,patient_id,split]), MedMNIST .npz, "
                                        "or images/+masks/ folders (segmentation)."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, model.safetensors and metrics.json."),
    train: str | None = typer.Option(None, help=f"{TRAIN_HELP}. The vector holds only what was trained."),
    epochs: int | None = typer.Option(
        None, help=f"Epochs (default: {DEFAULT_EPOCHS}, and at least {MIN_STEPS} optimiser steps; with --dp an epoch "
                   "is 1/--sample-rate steps)."),
    steps: int | None = typer.Option(
        None, help=f"Optimizer steps, instead of --epochs (default with --dp: {DP_STEPS})."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help=f"Default: n/{BATCH_SHARE} in [{MIN_BATCH}, {MAX_BATCH}]{PASS_BATCHES}. Not with "
                                   "--dp (DP-SGD): see --sample-rate."
    ),
    lr: float | None = typer.Option(None, help=LR_HELP),
    ema: float | None = typer.Option(
        None, help=f"EMA decay of the weights (0: off; default {DP_EMA:g} with --dp, else off)"),
    weight_decay: float = typer.Option(
        DEFAULTS.weight_decay, "--weight-decay", help="AdamW weight decay (not on biases and normalisation weights)."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input size (default: the base's)."),
    device: str = device_option(),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed of the validation split, shuffling, augmentation and dropout "
                                                 "(with --dp only of the split: the rest draws from a secret key)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last finished epoch "
                                "(repeat its options and data; a finished run is returned as it is)."),
    val_fraction: float = typer.Option(
        DEFAULTS.val_fraction, "--val-fraction",
        help="Validation share when the data has no val split (by patient when given)."
    ),
    contributor: str | None = typer.Option(None, help="Contributor id (site name) recorded in the model."),
    augment: bool = typer.Option(DEFAULTS.augment, "--augment/--no-augment", help="Random flips and 90° rotations."),
    workers: int | None = typer.Option(None, help="Data loader processes (default: 8 on GPU, 0 on CPU)."),
    image_cache: str = typer.Option(
        DEFAULTS.image_cache, "--image-cache",
        help="Image files decoded once into an array on disk that later epochs and runs read: auto ($TASKVEC_CACHE, "
             "else $XDG_CACHE_HOME/taskvec/images, else ~/.cache/taskvec/images) | off | a folder. It holds the "
             "site's images: keep it where the data may be."),
    dp: bool = typer.Option(False, "--dp", help=f"DP-SGD (Opacus; {ONE_PASS}: its one Gaussian release); unit: "
                                                "patient given patient ids, else image."),
    target_epsilon: float | None = typer.Option(
        None, "--target-epsilon", help="--dp: noise calibrated to reach this ε in the planned epochs; stops at it."
    ),
    noise_multiplier: float | None = typer.Option(
        None, "--noise-multiplier", help="--dp: fix the noise multiplier σ and report ε (stops at --target-epsilon)."
    ),
    include_lineage: bool = typer.Option(
        False, "--epsilon-includes-lineage",
        help="--dp: --target-epsilon spans this run and the --contributor's releases already merged into the base "
             "(its stage-1 statistics, as the merger recorded them): the noise is calibrated for what they left."),
    earlier: list[Path] | None = typer.Option(
        None, "--earlier-release",
        help="--dp: a vector this site released before from the same images (repeat): --target-epsilon spans it "
             "too, counted once whether the base's lineage lists it or not (the site's own record)."),
    delta: float = typer.Option(
        DEFAULT_DELTA, help="--dp: δ of the guarantee, at most 0.01 (keep it below 1 / number of patients)."),
    max_grad_norm: float = typer.Option(
        DEFAULT_MAX_GRAD_NORM, "--max-grad-norm", help="--dp: clip each unit's gradient to this norm."),
    sample_rate: float = typer.Option(
        DEFAULT_SAMPLE_RATE, "--sample-rate", help="--dp: each unit's chance to join a step's batch (Poisson "
                                                   "sampling; the expected batch, rate × units, is never written)."),
    augmult: int = typer.Option(
        DEFAULT_AUGMULT, help="--dp: augmentation multiplicity K (De et al. 2022; at most 64): average K augmented "
                              "copies before clipping."
    ),
    prox: float = typer.Option(
        DEFAULTS.prox, help="Pull the trained weights toward the base, FedProx's μ/2·||θ − θ_base||² (a proximal step "
                            "after each update; 0: off). Keeps vectors from skewed sites mergeable; no privacy cost."),
    head: str = typer.Option(
        DEFAULTS.head, help="Classifier under label skew: train | frozen (keep the base head, learn features) | "
                            "balanced (class-weighted loss; not with --dp) | lp-ft (head alone for the first half, "
                            "then all)."),
) -> None:
    """Fine-tune the base on local data; the run folder is then ready for `taskvec export RUN_DIR`.

    Several GPUs: `torchrun --standalone --nproc_per_node=N $(which taskvec) finetune ...` (rank 0 reports)."""
    from taskvec.training.distributed import launched_rank
    from taskvec.training.loop import finetune as run

    private = None
    if dp:
        from taskvec.privacy.dpsgd import DPConfig

        private = DPConfig(max_grad_norm, delta, target_epsilon=target_epsilon, noise_multiplier=noise_multiplier,
                           augmult=augmult, sample_rate=sample_rate, include_lineage=include_lineage,
                           earlier=tuple(str(p) for p in earlier or ()))
    elif target_epsilon is not None or noise_multiplier is not None or include_lineage or earlier:
        usage("--target-epsilon, --noise-multiplier, --epsilon-includes-lineage and --earlier-release set up "
              "DP-SGD: add --dp")
    config = FinetuneConfig(
        epochs=epochs, steps=steps, batch_size=batch_size, lr=lr, train=train, ema=ema, weight_decay=weight_decay,
        img_size=img_size, device=device, seed=seed, resume=resume, val_fraction=val_fraction, contributor=contributor,
        augment=augment, num_workers=workers, image_cache=image_cache, dp=private, prox=prox, head=head,
    )
    if launched_rank():  # rank 0 of a torchrun launch reports
        console.quiet, STATE["rank"] = True, launched_rank()
    bar = _TrainProgress(config)
    r = run(base, data, out, config, track=bar.track, on_epoch=bar.on_epoch, on_warning=warn)
    if r.resumed_from_epoch:
        console.print(f"resumed after epoch {r.resumed_from_epoch}")
    console.print(f"wrote {r.model_path}: {r.epochs} epochs, {r.steps} steps on {r.samples} images")
    if r.val_metrics:
        from taskvec.training.metrics import primary_metric

        name, value = primary_metric(r.val_metrics)
        console.print(f"validation {name} {_fmt(value)}")
    if r.history:
        from taskvec.privacy.ledger import summarize_ledger

        total = "" if r.composed_epsilon is None else \
            f"; with the earlier releases it counted, ε = {r.composed_epsilon:.2f} in total"
        console.print(f"privacy: {summarize_ledger(r.history[-1]['privacy'])}{total}")
    console.print(f"model identity {r.identity}; next: taskvec export {out} --base {base} --out VECTOR")


def evaluate(
    model: Path = typer.Argument(..., help="A model file or run folder (base, fine-tuned or merged)."),
    data: Path = typer.Option(..., help="Data in any layout `finetune` reads."),
    split: str | None = typer.Option(None, help="train | val | test | all (default: test if there is one, else all)"),
    device: str = device_option(),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass (memory only; the metrics "
                                                            "do not depend on it)."),
    as_json: bool = typer.Option(False, "--json", help="Print every metric as JSON."),
) -> None:
    """Evaluate a model: accuracy, balanced accuracy, macro-F1, AUROC; or Dice, Jaccard, pixel accuracy."""
    from taskvec.training.evaluate import evaluate_model

    r = evaluate_model(model, data, split, device=device, batch_size=batch_size, track=track)
    for w in r.warnings:
        warn(w)
    if as_json:
        print_json(r.to_dict())
        return
    _print_metrics(r.to_dict())


def _print_metrics(r: dict[str, Any]) -> None:
    from rich.table import Table

    console.print(f"{r['model']} on {r['data']} ({r['split']}, {r['samples']} images at {r['img_size']} px)")
    seg = r["task"] == "segmentation"
    keys = ["dice", "jaccard", "pixel_accuracy"] if seg else ["accuracy", "balanced_accuracy", "macro_f1", "auroc"]
    for k in keys:
        console.print(f"  {k:<18} {_fmt(r[k])}")
    if seg:
        console.print(f"  (means over {r['mean_over']}; pixel_accuracy over all pixels)")
    t = Table("class", *(["dice", "jaccard", "pixel acc.", "pixels"] if seg else ["support", "precision", "recall",
                                                                                  "f1"]))
    for name, c in r["per_class"].items():
        cols = ["dice", "jaccard", "pixel_accuracy"] if seg else ["precision", "recall", "f1"]
        first = str(c["pixels"] if seg else c["support"])
        vals = [_fmt(c[k]) for k in cols]
        t.add_row(name, *(vals + [first] if seg else [first, *vals]))
    console.print(t)


def register(app: typer.Typer) -> None:
    for fn in (finetune, evaluate):
        app.command()(fn)
