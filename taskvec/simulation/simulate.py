"""Consortium simulation: does merging data vectors beat training alone, and what does privacy cost?

One data set is cut into an untouched test split, a merger's validation share, an optional "public" share
(to train the base when no pretrained weights are given), and K sites. Each site fine-tunes independently
through `taskvec.training.loop.finetune` (the code path of `taskvec finetune`), exports a vector, and the vectors are
merged with every method (and calibrated on the validation share). Everything is evaluated on the same test
split: the base, every site alone, every merge, and centralised training on the union of the sites' data
with the same number of passes over the same images: the same epochs, or with the default schedule, as many
example gradients as all sites' runs together. With `rounds`, the sites then keep going asynchronously
(`taskvec.simulation.schedule`, `taskvec.simulation.rounds`): each re-bases on the newest merged version, and
every version published is evaluated too. Runs resume: finished site trainings, vectors and versions are
reused.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from taskvec.errors import ConfigError, OutputExistsError, TaskvecError, check_range
from taskvec.io.files import read_record, write_json
from taskvec.io.lineage import DEFAULT_STALENESS
from taskvec.merging.methods import COMPARED, DEFAULT_METHOD, MERGE_METHODS
from taskvec.merging.stream import merge_vectors
from taskvec.models.segmentation import decoder_spec
from taskvec.models.spec import ModelSpec, build_base, save_model
from taskvec.privacy import DEFAULT_DELTA, DEFAULT_MAX_GRAD_NORM
from taskvec.privacy.ledger import PrivacyBudget
from taskvec.simulation.executors import Resources, check_executor, finished, run_jobs
from taskvec.simulation.rounds import RoundsSetup, export_site_vector, run_rounds
from taskvec.simulation.schedule import Schedule, default_speeds, plan_schedule
from taskvec.simulation.sites import site_indices
from taskvec.training.config import check_head
from taskvec.training.data import DataSplits, ImageDataset, hold_out_by_patient, load_data
from taskvec.training.data.cache import cached_splits
from taskvec.training.evaluate import evaluate_model
from taskvec.training.loop import FinetuneConfig, finetune
from taskvec.training.metrics import primary_metric
from taskvec.training.run_folder import METRICS_FILE
from taskvec.training.schedule import schedule

Progress = Callable[[str], None]
# where and how runs execute, not what they compute: a resumed simulation may change them
RUNTIME = {"jobs", "executor", "address", "task_cpus", "task_gpus", "image_cache"}


@dataclass
class SimulationConfig:
    data: str
    out: str
    task: str = "classification"
    decoder: str = "unet"  # segmentation: smp's decoder over the encoder (taskvec.models.segmentation)
    sites: int = 3
    split: str = "iid"
    arch: str = "test_convnext"
    num_classes: int = 2
    labels: list[str] | None = None
    in_chans: int = 3
    img_size: int | None = 32
    pretrained: bool = False
    weights: str | None = None
    public_fraction: float = 0.2
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    epochs: int | None = None  # None: the fine-tuning default schedule (taskvec.training.loop.plan_steps)
    base_epochs: int = 3
    batch_size: int | None = None  # runs without DP (None: the default for each run's size); DP-SGD samples at q
    lr: float | None = None  # None: the default of the training mode
    train: str | None = None  # what every site trains (None: the base's default, `FinetuneConfig.for_base`)
    prox: float = 0.0  # proximal pull toward the base of every run (taskvec.training.mergeable)
    head: str = "train"  # head strategy of every run: train | frozen | balanced | lp-ft
    methods: list[str] = field(default_factory=lambda: list(COMPARED))
    calibrate: bool = True
    epsilons: list[float] = field(default_factory=list)  # one DP-SGD variant of every site per ε
    delta: float = DEFAULT_DELTA
    max_grad_norm: float = DEFAULT_MAX_GRAD_NORM
    jobs: int = 1  # sites fine-tuned in parallel processes (executor local)
    executor: str = "local"  # where the fine-tunes run: local | ray (taskvec.simulation.executors)
    address: str | None = None  # executor ray: the instance's address (None: start one here; auto: the running one)
    task_cpus: int = 1  # executor ray: CPUs (torch threads) per fine-tune
    task_gpus: float = 0.0  # executor ray: GPUs per fine-tune
    image_cache: str = "auto"  # decoded images on disk: auto | off | a folder (taskvec.training.data.cache)
    seed: int = 0
    device: str = "auto"
    rounds: int | None = None  # asynchronous: each site arrives up to this many times (None: one-shot only)
    speeds: list[float] | None = None  # relative time per fine-tune of each site (None: schedule.default_speeds)
    buffer: int | None = None  # merge after this many arrivals (None: the number of sites)
    staleness: float = DEFAULT_STALENESS  # a in the staleness weight (1 + d) ** -a
    round_method: str = DEFAULT_METHOD  # how a buffer is combined (FedBuff averages it)

    def check(self) -> None:
        for name, m in [*(("methods", m) for m in self.methods), ("round_method", self.round_method)]:
            if m not in MERGE_METHODS:
                raise ConfigError(f"{name} must be among {', '.join(MERGE_METHODS)}, got {m!r}", field=name,
                                  expected=list(MERGE_METHODS), got=m)
        check_executor(self.executor)
        decoder_spec(self.decoder)
        check_range("task_gpus", self.task_gpus, low=0, low_open=False)
        for name in ("sites", "jobs", "epochs", "rounds", "buffer", "task_cpus"):  # None: the default
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}", field=name, expected=">= 1",
                                  got=getattr(self, name))
        for e in self.epsilons:
            check_range("epsilons", e, low=0)
        run = FinetuneConfig(train=self.train, prox=self.prox, head=self.head)
        run.check()  # refused before any file
        if self.rounds is not None and self.train is not None and run.mode.fits_in_one_pass:
            raise ConfigError(f"rounds re-train each site from the newest version, but train {self.train} is one "
                              "pass over the base's frozen features: a second arrival would only release them "
                              "again (merge its vectors once, without rounds)", field="rounds", got=self.rounds)
        check_head(self.head, dp=bool(self.epsilons))
        check_range("staleness", self.staleness, low=0, low_open=False)
        for name in ("speeds", "buffer"):
            if self.rounds is None and getattr(self, name) is not None:
                raise ConfigError(f"{name} shapes the asynchronous rounds; give rounds too, or leave {name} out",
                                  field=name, got=getattr(self, name))
        if self.speeds is not None and len(self.speeds) != self.sites:
            raise ConfigError(f"speeds must give one relative time per site ({self.sites}), got {len(self.speeds)}",
                              field="speeds", expected=self.sites, got=self.speeds)
        self.schedule()  # speeds > 0

    def schedule(self) -> Schedule | None:
        """The asynchronous timeline (None without `rounds`)."""
        if self.rounds is None:
            return None
        speeds = self.speeds if self.speeds is not None else default_speeds(self.sites, self.seed)
        return plan_schedule(speeds, self.rounds, self.buffer or self.sites)


@dataclass
class SimulationResult:
    out: Path
    rows: list[dict[str, Any]]
    metric: str
    report: Path
    plots: list[Path]


def prepare_data(
    cfg: SimulationConfig, spec: Any
) -> tuple[ImageDataset, ImageDataset, ImageDataset | None, list[str]]:
    """The data cut as a simulation cuts it: (pool for the public share and the sites, test split, the merger's
    validation share, notes)."""
    splits = load_data(cfg.data, spec, img_size=cfg.img_size, val_fraction=0.0, seed=cfg.seed)
    notes = list(splits.warnings)
    pool = splits.train
    if pool is None:
        raise TaskvecError(f"{cfg.data}: no training split")
    test = splits.test
    if test is None:
        pool, test = hold_out_by_patient(pool, cfg.test_fraction, cfg.seed)
        notes.append(f"the data has no test split: held out {len(test)} samples ({cfg.test_fraction:.0%}) as test")
    val = splits.val
    if val is None and cfg.calibrate:
        pool, val = hold_out_by_patient(pool, cfg.val_fraction, cfg.seed + 1)
        notes.append(f"held out {len(val)} samples as the merger's validation share (for calibration)")
    return pool, test, val, notes


def evaluate_row(name: str, group: str, path: Path | str, test: ImageDataset, epsilon: float | None,
                 method: str | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A results-table row: the model at `path` evaluated on `test` (the primary metric and the others)."""
    m = evaluate_model(path, DataSplits(None, None, test, source="test"), "test", device="cpu").metrics
    metric, value = primary_metric(m)
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "dice", "jaccard", "pixel_accuracy")
    return {"name": name, "group": group, "method": method, "epsilon": epsilon, "metric": metric,
            "value": value, "metrics": {k: m[k] for k in keep if k in m}, **(extra or {})}


def open_simulation(cfg: SimulationConfig) -> Path:
    """Check `cfg` and make `cfg.out` its simulation folder (recording it in `simulation.json`), or reopen the
    folder of the same simulation; a folder holding anything else is refused. Return the folder."""
    cfg.check()
    out = Path(cfg.out)
    record = out / "simulation.json"
    if record.exists():  # a setting the record predates has its default
        defaults = asdict(SimulationConfig(data=cfg.data, out=cfg.out))
        kept = {**defaults, **read_record(record, {}, "choose another `out`")}
        given = json.loads(json.dumps(asdict(cfg)))
        if {k: v for k, v in kept.items() if k not in RUNTIME} != {k: v for k, v in given.items() if k not in RUNTIME}:
            raise OutputExistsError(f"{out}: holds a simulation with other settings; choose another `out`", path=out)
        return out
    if out.exists() and any(out.iterdir()):
        raise OutputExistsError(f"{out}: exists and is not a taskvec simulation; choose another `out`", path=out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(record, asdict(cfg))
    return out


def simulate(cfg: SimulationConfig, progress: Progress = lambda s: None) -> SimulationResult:
    """Run (or resume) a whole simulation into `cfg.out`; see the module docstring."""
    from taskvec.simulation.report import write_report

    out = open_simulation(cfg)
    done = list(out.glob(f"**/{METRICS_FILE}"))
    if done:
        progress(f"reusing {len(done)} finished runs in {out} (a simulation with these settings; delete the folder "
                 "to start over)")
    # one base for the runs with and without DP: DP-ready whenever DP runs, and always for pretrained weights
    # (frozen BatchNorm statistics, so the comparison at every ε is against the same network)
    pretrained = cfg.pretrained or cfg.weights is not None
    module, spec = build_base(cfg.arch, cfg.task, cfg.num_classes, cfg.in_chans, cfg.img_size, cfg.labels,
                              cfg.pretrained, cfg.weights, dp_compatible=bool(cfg.epsilons) or pretrained,
                              decoder=cfg.decoder, seed=cfg.seed, zero_head=False if cfg.head == "frozen" else None)
    pool, test, val, notes = prepare_data(cfg, spec)
    decoded = cached_splits(DataSplits(pool, val, test), cfg.image_cache)  # once for every run and evaluation
    pool, val, test = decoded.train or pool, decoded.val, decoded.test or test
    train_cfg = FinetuneConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, img_size=cfg.img_size,
                               device=cfg.device, seed=cfg.seed, resume=True, val_fraction=0.0, train=cfg.train,
                               prox=cfg.prox, head=cfg.head, image_cache=cfg.image_cache).for_base(pretrained)
    base, pool = _make_base(cfg, out, module, spec, pool, train_cfg, notes, progress)
    site_idx = site_indices(pool, cfg.split, cfg.sites, cfg.seed, cfg.data)
    sites = [pool.subset(idx.tolist()) for idx in site_idx]
    union = pool.subset([i for idx in site_idx for i in idx])
    rows = [evaluate_row("base", "base", base, test, None)]
    for eps in [None, *cfg.epsilons]:
        rows += _variant(cfg, out, base, sites, union, test, val, train_cfg, eps, progress)
    summary = {"config": asdict(cfg), "notes": notes, "test_samples": len(test),
               "site_samples": [len(s) for s in sites], "metric": rows[0]["metric"], "rows": rows}
    timeline = cfg.schedule()
    if timeline is not None:
        summary["schedule"] = asdict(timeline)
    write_json(out / "results.json", summary)
    report, plots = write_report(out, summary)
    return SimulationResult(out, rows, rows[0]["metric"], report, plots)


def _make_base(cfg: SimulationConfig, out: Path, module: Any, spec: ModelSpec, pool: ImageDataset,
               train_cfg: FinetuneConfig, notes: list[str], progress: Progress) -> tuple[Path, ImageDataset]:
    """`out/base.safetensors`: the pretrained model, or one trained on a public share held out of `pool` (then
    the rest of the pool is returned)."""
    base = out / "base.safetensors"
    if cfg.pretrained or cfg.weights:
        if not base.exists():
            save_model(module, spec, base, extra={"source": {"pretrained": cfg.pretrained, "weights": cfg.weights}})
        notes.append("base: pretrained weights" + (f" from {cfg.weights}" if cfg.weights else " (timm hub)"))
        return base, pool
    pool, public = hold_out_by_patient(pool, cfg.public_fraction, cfg.seed + 2)
    init = out / "init.safetensors"
    if not init.exists():
        save_model(module, spec, init, extra={"source": {"pretrained": False, "weights": None}})
    if not finished(out / "base-run"):
        progress(f"training the base on a public share of {len(public)} samples")
    run = finetune(init, public, out / "base-run",
                   replace(train_cfg, epochs=cfg.base_epochs, contributor="public", train="all", prox=0.0,
                           head="train"))
    if not base.exists():
        os.link(run.model_path, base)
    notes.append(f"base: no pretrained weights, so trained from scratch on a held-out public share of "
                 f"{len(public)} samples ({cfg.public_fraction:.0%}) that no site holds")
    return base, pool


def central_steps(site_sizes: list[int], config: FinetuneConfig) -> int | None:
    """Steps of the centralised run under the default schedule: as many example gradients as all sites' runs
    together (None: `config` sets epochs or steps, which the centralised run keeps, or trains in one pass)."""
    if config.epochs is not None or config.steps is not None or config.mode.fits_in_one_pass:
        return config.steps
    plans = [schedule(n, config) for n in site_sizes]
    return math.ceil(sum(b * n for b, n in plans) / schedule(sum(site_sizes), config)[0])


def _variant(cfg: SimulationConfig, out: Path, base: Path, sites: list[ImageDataset], union: ImageDataset,
             test: ImageDataset, val: ImageDataset | None, train_cfg: FinetuneConfig, eps: float | None,
             progress: Progress) -> list[dict[str, Any]]:
    """One variant (without DP, or DP-SGD at target ε `eps`): fine-tune every site and the centralised run,
    export, merge with every method (and calibrated), and evaluate each; the rows of the results table."""
    from taskvec.merging.calibrate import Calibrator
    from taskvec.privacy.dpsgd import DPConfig

    tag = "" if eps is None else f"-eps{eps:g}"
    timeline = cfg.schedule()
    run_cfg = train_cfg if eps is None else replace(
        train_cfg, batch_size=None, dp=DPConfig(max_grad_norm=cfg.max_grad_norm, delta=cfg.delta, target_epsilon=eps))
    jobs = [(str(base), ds, str(out / f"sites{tag}" / f"site{i}"), replace(run_cfg, contributor=f"site{i}",
             seed=cfg.seed + 10 + i)) for i, ds in enumerate(sites)]
    central = replace(run_cfg, contributor="centralised", steps=central_steps([len(s) for s in sites], run_cfg))
    jobs.append((str(base), union, str(out / f"centralised{tag}"), central))
    models = run_jobs(jobs, cfg.executor, Resources(cfg.jobs, cfg.address, cfg.task_cpus, cfg.task_gpus), progress)
    vec_dir = out / f"vectors{tag}"
    vec_dir.mkdir(exist_ok=True)
    vectors, rows = [], []
    for i, model in enumerate(models[:-1]):
        vectors.append(export_site_vector(model, base, vec_dir / f"site{i}.safetensors", i))
        rows.append(evaluate_row(f"site{i}{tag}", "local", model, test, eps, extra={"samples": len(sites[i])}))
    rows.append(evaluate_row(f"centralised{tag}", "centralised", models[-1], test, eps, extra={"samples": len(union)}))
    merged_dir = out / f"merged{tag}"
    merged_dir.mkdir(exist_ok=True)
    methods = cfg.methods if timeline is None else list(dict.fromkeys([*cfg.methods, cfg.round_method]))
    for method in methods:  # one-shot merging (with the rounds' method beside the rounds)
        progress(f"merging {len(vectors)} vectors with {method}{tag}")
        path = merged_dir / f"{method}.safetensors"
        merge_vectors(vectors, base, path, method=method, seed=cfg.seed, force=True)
        rows.append(evaluate_row(f"{method}{tag}", "merged", path, test, eps, method))
        if cfg.calibrate and val is not None:
            cal = Calibrator(DataSplits(None, val, None, source="validation share"), device="cpu")
            path = merged_dir / f"{method}-calibrated.safetensors"
            merge_vectors(vectors, base, path, method=method, seed=cfg.seed, force=True, calibrate=cal)
            rows.append(evaluate_row(f"{method}+cal{tag}", "calibrated", path, test, eps, method,
                                  extra={"scale": cal.record["chosen"]}))
    if timeline is not None:
        setup = RoundsSetup(cfg.round_method, cfg.staleness, cfg.seed,
                            None if eps is None else PrivacyBudget(unit="image"))
        evaluate = lambda name, path, extra: evaluate_row(  # noqa: E731
            f"{name}{tag}", "async", path, test, eps, cfg.round_method, extra)
        rows += run_rounds(timeline, setup, out / f"rounds{tag}", base, sites, run_cfg, vectors, evaluate, progress)
    return rows


def simulate_seeds(cfg: SimulationConfig, seeds: list[int], progress: Progress = lambda s: None) -> SimulationResult:
    """Run the simulation once per seed (splits, training and noise all follow the seed) into `out/seed<S>/`, then
    report every model's mean ± sd over the seeds in `out/report.md`, with error bars in the plots."""
    from taskvec.simulation.report import write_report

    if not seeds or len(set(seeds)) != len(seeds):
        raise TaskvecError(f"seeds must be distinct and non-empty, got {seeds}")
    out = Path(cfg.out)
    results = []
    for seed in seeds:
        progress(f"seed {seed}")
        results.append(simulate(replace(cfg, seed=seed, out=str(out / f"seed{seed}")), progress))
    rows = aggregate_rows([r.rows for r in results])
    first = json.loads((results[0].out / "results.json").read_text())
    summary = {**first, "config": {**asdict(cfg), "seeds": seeds}, "rows": rows,
               "notes": first["notes"] + [f"mean ± sd over seeds {', '.join(map(str, seeds))} (sample sd)"]}
    write_json(out / "results.json", summary)
    report, plots = write_report(out, summary)
    return SimulationResult(out, rows, results[0].metric, report, plots)


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    # one seed has no sample sd: None, so no report shows '± 0' for it
    return (float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else None) if len(v) else (None, None)


def aggregate_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of the same model over seeds → one row with means, sample standard deviations and the count."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for rows in runs:
        for r in rows:
            by_name.setdefault(r["name"], []).append(r)
    out = []
    for same in by_name.values():
        per_seed = ("value", "metrics", "scale", "samples", "time", "merged", "composed_epsilon")
        row = {k: v for k, v in same[0].items() if k not in per_seed}
        if "composed_epsilon" in same[0]:  # the guarantee that holds in every seed's run
            row["composed_epsilon"] = {who: max(r["composed_epsilon"][who] for r in same)
                                       for who in same[0]["composed_epsilon"]}
        row["value"], row["value_sd"] = _mean_sd([r["value"] for r in same])
        keys = same[0]["metrics"]
        row["metrics"] = {k: _mean_sd([r["metrics"].get(k) for r in same])[0] for k in keys}
        row["metrics_sd"] = {k: _mean_sd([r["metrics"].get(k) for r in same])[1] for k in keys}
        row["seeds"] = len(same)
        out.append(row)
    return out
