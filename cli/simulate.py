"""`taskvec simulate` and `taskvec demo`: a whole consortium on one machine, with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from taskvec.cli.console import console, device_option, warn
from taskvec.cli.merge import STALENESS_HELP
from taskvec.cli.train import TRAIN_HELP
from taskvec.io.lineage import DEFAULT_STALENESS
from taskvec.merging.methods import COMPARED, DEFAULT_METHOD
from taskvec.privacy import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM
from taskvec.simulation.splits import SPLIT_HELP


def _print_table(result: Any) -> None:
    from rich.table import Table

    from taskvec.simulation.report import table_rows

    header, body = table_rows(result.rows)
    t = Table(*header, title=f"test-set results ({result.metric} is the primary metric)")
    for row in body:
        t.add_row(*row)
    console.print(t)
    console.print(f"report: {result.report} (plots: {', '.join(p.name for p in result.plots)})")


def _floats(text: str | None, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()] if text else []
    except ValueError:
        raise typer.BadParameter(f"{option} takes comma-separated numbers, got {text!r}") from None


def simulate(
    data: Path = typer.Option(..., help="Data set (as for `taskvec finetune`) to split into sites."),
    out: Path = typer.Option(..., help="Report folder (resumed when it holds the same simulation)."),
    task: str = typer.Option("classification", help="classification | segmentation"),
    decoder: str = typer.Option("unet", help="Segmentation decoder (segmentation-models-pytorch): unet | fpn."),
    sites: int = typer.Option(3, help="Number of simulated hospitals."),
    split: str = typer.Option("iid", help=SPLIT_HELP),
    arch: str = typer.Option("test_convnext", help="timm architecture of the base."),
    num_classes: int = typer.Option(2, "--num-classes", help="Classes (segmentation: incl. background)."),
    labels: str | None = typer.Option(None, help="Comma-separated class names, as the data names them."),
    in_chans: int = typer.Option(3, "--in-chans", help="Input channels (1 for grayscale)."),
    img_size: int = typer.Option(32, "--img-size", help="Input size in pixels."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Start from timm's pretrained weights (network)."),
    weights: Path | None = typer.Option(None, help="Start from a local timm checkpoint (.safetensors)."),
    train: str | None = typer.Option(None, help=f"Every site. {TRAIN_HELP}."),
    prox: float = typer.Option(0.0, help="Every run: proximal pull toward the base (as `taskvec finetune --prox`)."),
    head: str = typer.Option("train", help="Every run: train | frozen | balanced | lp-ft (as `taskvec finetune`)."),
    epochs: int | None = typer.Option(None, help="Epochs per run (default: finetune's, >= 200 optimiser steps)."),
    base_epochs: int = typer.Option(3, "--base-epochs", help="Epochs on the public share when there are no weights."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Default: finetune's for each run's data."),
    lr: float | None = typer.Option(None, help="Peak learning rate (default: the --train mode's)."),
    methods: str | None = typer.Option(
        None, help=f"Comma-separated merge methods to compare (default: {', '.join(COMPARED)})."),
    calibrate: bool = typer.Option(True, "--calibrate/--no-calibrate", help="Also choose λ on a validation share."),
    dp: bool = typer.Option(False, "--dp", help="Add DP-SGD runs of every site at each of --target-epsilons."),
    target_epsilons: str = typer.Option("1,3,8", "--target-epsilons", help="Comma-separated ε values for --dp."),
    delta: float = typer.Option(DEFAULT_DELTA, help="δ for --dp."),
    max_grad_norm: float = typer.Option(DEFAULT_MAX_GRAD_NORM, "--max-grad-norm",
                                        help="Per-unit clipping norm for --dp."),
    jobs: int = typer.Option(1, help="--executor local: fine-tune sites in this many parallel processes."),
    executor: str = typer.Option(
        "local", help="Where the fine-tunes run: local (this machine's processes) | ray (Ray tasks; pip install "
                      "'taskvec\\[ray]'). Either resumes what the other started."),
    address: str | None = typer.Option(
        None, help="--executor ray: the Ray instance (auto: the one `ray start` runs here; ray://HOST:10001: a "
                   "cluster's head); default: start one on this machine."),
    task_cpus: int = typer.Option(1, "--task-cpus", help="--executor ray: CPUs (torch threads) of each fine-tune."),
    task_gpus: float = typer.Option(0.0, "--task-gpus",
                                    help="--executor ray: GPUs of each fine-tune (0.5: two share one)."),
    image_cache: str = typer.Option(
        "auto", "--image-cache", help="Image files decoded once for every run: auto | off | a folder (as `finetune`)."),
    seed: int = typer.Option(0, help="Seed of the split into sites, the held-out shares and every run."),
    seeds: str | None = typer.Option(
        None, help="Repeat for these seeds (e.g. 0,1,2; each in OUT/seed<S>) and report mean ± sd with error bars."
    ),
    device: str = device_option(),
    rounds: int | None = typer.Option(
        None, help="Then asynchronous rounds: each site arrives up to R times, re-basing on the newest version."),
    speeds: str | None = typer.Option(
        None, help="Relative time per fine-tune of each site, e.g. 1,1.5,3 (default: uniform 1 to 4 per seed)."),
    buffer: int | None = typer.Option(None, help="Merge after every K arrivals (FedBuff; default: the sites)."),
    staleness: float = typer.Option(DEFAULT_STALENESS, help=STALENESS_HELP),
    round_method: str = typer.Option(DEFAULT_METHOD, "--round-method", help="How the rounds combine a buffer."),
) -> None:
    """Split one data set into sites, fine-tune each alone, merge with every method, compare on one test split;
    with --rounds, then let the sites go on asynchronously from the newest merged version."""
    from taskvec.simulation.simulate import SimulationConfig, simulate_seeds
    from taskvec.simulation.simulate import simulate as run

    cfg = SimulationConfig(
        data=str(data), out=str(out), task=task, decoder=decoder, sites=sites, split=split, arch=arch,
        num_classes=num_classes,
        labels=[s.strip() for s in labels.split(",")] if labels else None, in_chans=in_chans, img_size=img_size,
        pretrained=pretrained, weights=str(weights) if weights else None, train=train, epochs=epochs,
        prox=prox, head=head, base_epochs=base_epochs, batch_size=batch_size, lr=lr, calibrate=calibrate,
        epsilons=_floats(target_epsilons, "--target-epsilons") if dp else [], delta=delta,
        max_grad_norm=max_grad_norm, jobs=jobs, executor=executor, address=address, task_cpus=task_cpus,
        task_gpus=task_gpus, image_cache=image_cache, seed=seed, device=device, rounds=rounds,
        speeds=_floats(speeds, "--speeds") or None, buffer=buffer, staleness=staleness, round_method=round_method,
    )
    if methods:
        cfg.methods = [m.strip() for m in methods.split(",")]
    say = lambda s: console.print(s, style="dim")  # noqa: E731
    if seeds is None:
        _print_table(run(cfg, progress=say))
        return
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--seeds takes comma-separated integers, got {seeds!r}") from None
    _print_table(simulate_seeds(cfg, seed_list, say))


def demo(
    out: Path = typer.Option(Path("taskvec-demo"), help="Folder for the data, models and report (all of them)."),
    sites: int = typer.Option(3, help="Number of simulated hospitals."),
) -> None:
    """A small simulation on embedded synthetic ultrasound-like images (no data, no network; minutes on a CPU).
    Run again, it reuses what it finished."""
    from taskvec.simulation.simulate import SimulationConfig, open_simulation
    from taskvec.simulation.simulate import simulate as run
    from taskvec.simulation.synthetic import LABELS, write_classification_npz

    data = out / "data.npz"
    cfg = SimulationConfig(data=str(data), out=str(out), sites=sites, arch="test_convnext", labels=list(LABELS),
                           in_chans=1, img_size=32, base_epochs=3, lr=1e-3)
    open_simulation(cfg)  # refuses a folder holding anything else before the data is written into it
    console.print(f"taskvec demo: SYNTHETIC data (grayscale frames, a blob that is '{LABELS[1]}' when dark "
                  f"with a rough rim), {sites} simulated hospitals, everything written to {out}/")
    if not data.exists():
        write_classification_npz(data)
    _print_table(run(cfg, progress=lambda s: console.print(s, style="dim")))
    console.print("Same on your own data: taskvec simulate --data PATH --out REPORT_DIR --sites K "
                  "[--split dirichlet:0.5] [--dp]  (see `taskvec simulate --help`)")


def split(
    data: Path = typer.Argument(..., help="Data set in any layout `finetune` reads; its training split is cut."),
    out: Path = typer.Option(..., help="New (or empty) folder for the sites and sites.json."),
    sites: int = typer.Option(3, help="Number of sites."),
    rule: str = typer.Option("iid", "--split", help=f"How, as `simulate --split`: {SPLIT_HELP}."),
    seed: int = typer.Option(0, help="Seed of the split (the same data, rule and seed give the same sites)."),
    base: Path | None = typer.Option(
        None, help="Read the data for this base (task, labels); default: the labels the data names (class folders, "
                   "a CSV's label column, an npz's numbers), segmentation for images/ + masks/ folders."),
) -> None:
    """Cut one data set into site data sets by simulate's rules; its val and test splits stay whole for the merger.

    siteK.csv (path,label[,patient_id], pointing to the original images) for classification images, siteK.npz for
    an npz, siteK/images + siteK/masks (hard links or copies) for segmentation."""
    from taskvec.simulation.sites import split_into_sites

    spec = None
    if base is not None:
        from taskvec.io.files import read_kind
        from taskvec.models.spec import ModelSpec

        spec = ModelSpec.from_dict(read_kind(base, "model").model.model)
    r = split_into_sites(data, out, rule, sites, seed, spec)
    for w in r["warnings"]:
        warn(w)
    for file, n in zip(r["files"], r["samples"]):
        console.print(f"{out / file}: {n} images")
    if r["not_cut"]:
        console.print(f"not cut, for the merger: the data's {' and '.join(r['not_cut'])} split"
                      + ("s" if len(r["not_cut"]) > 1 else ""))


def register(app: typer.Typer) -> None:
    app.command()(simulate)
    app.command()(demo)
    app.command()(split)
