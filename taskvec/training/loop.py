"""Local fine-tuning: one site trains the base's own architecture and head on its own data.

Defaults: AdamW (timm's optimizer factory: no weight decay on biases and norms), linear warm-up then cosine
decay per step, cross-entropy (segmentation: per-pixel cross-entropy plus soft Dice), augmentation by the 8
flips/90° rotations of the square (the same for image and mask; no colour changes), mixed precision on GPU
only. Small data: the schedule counts optimiser steps (10 epochs but at least MIN_STEPS), the batch stays
well below the training-set size, the learning rate follows the training mode (`taskvec.training.modes`),
and a run too short to learn is warned about. DP-SGD recipe: large Poisson batches at a public sampling
rate (`DPConfig.sample_rate`) for a public number of steps (DP_STEPS unless given), augmentation
multiplicity, an exponential moving average of the weights (the saved model is the average). Under DP nothing
in the model file is computed from the data's size: no sample count, batch size or validation metric.

Splits: the run folder's `split.json` lists the units (patients or images) that trained and validated. It
stays at the site: no model or vector file carries it.

Determinism and resume: each epoch reseeds torch, the sampler and the augmentation from `(seed, epoch)`, and
the learning rate is a function of the step, so a run resumed from its end-of-epoch checkpoint (written
atomically, safetensors, no pickle) reaches the same weights as an uninterrupted one (bit for bit on CPU).

DP-SGD seam: `prepare_training` is the one place where the model, optimizer and loader can be swapped for
private versions (identity without DP); `FinetuneConfig` is a dataclass to add DP fields to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from taskvec.errors import ConfigError, MismatchError, OutputExistsError, TaskvecError, check_range
from taskvec.io.files import FORMAT, FORMAT_VERSION, read_kind, write_json
from taskvec.io.tensors import save_tensors, state_digest
from taskvec.models.spec import ModelSpec, create_module, load_model, save_model
from taskvec.privacy.dpsgd import DPConfig, is_accumulating, make_private, require_dp_ready, steps_per_epoch
from taskvec.privacy.ledger import name_model
from taskvec.progress import Track, no_track
from taskvec.training.class_means import class_means_head, release_noise
from taskvec.training.data import DataSplits, ImageDataset, Normalizer, as_splits, make_loader, split_record
from taskvec.training.distributed import Group, augment_bits, process_group, rank_seed, shard_loader, wrap_model
from taskvec.training.evaluate import autocast, evaluate_module, resolve_device
from taskvec.training.mergeable import (
    LP_FRACTION,
    SiteSteps,
    WeightedCrossEntropy,
    check_head,
    class_weights,
    prox_anchors,
)
from taskvec.training.metrics import primary_metric
from taskvec.training.modes import TrainMode, head_prefixes, merge_adapters, mode_record, parse_mode
from taskvec.training.modes import prepare as prepare_mode

DEFAULT_EPOCHS = 10
MIN_STEPS = 200  # the default schedule makes at least this many optimiser steps, however small the data
MIN_DP_STEPS = 50  # DP-SGD runs shorter than this are warned about
DP_STEPS = 100  # DP-SGD's default: a constant (a count from the data's size would reveal it), 25 epochs at q = 0.25
DP_EMA = 0.99  # DP-SGD recipe default: EMA decay of the weights
MODEL_FILE, CHECKPOINT_FILE = "model.safetensors", "checkpoint.safetensors"
METRICS_FILE, RUN_FILE, SPLIT_FILE = "metrics.json", "run.json", "split.json"
RUNTIME_FIELDS = {"resume", "device", "num_workers"}  # may differ between a run and its resumption
PRIVATE_TRAINING_FIELDS = ("samples", "val_samples", "val_metrics")  # left out of a DP-SGD model's header


@dataclass
class FinetuneConfig:
    """Training settings; every field except `RUNTIME_FIELDS` must match when a run is resumed."""

    epochs: int | None = None  # default: DEFAULT_EPOCHS, at least MIN_STEPS steps, unless `steps` is given
    steps: int | None = None
    batch_size: int | None = None  # default: `default_batch` of the training-set size (DP-SGD: DPConfig.sample_rate)
    lr: float | None = None  # default: per training mode (taskvec.training.modes.DEFAULT_LR)
    train: str = "all"  # all | head | norm-bias | last:K | lora:R (taskvec.training.modes)
    ema: float | None = None  # EMA decay (0: off; default DP_EMA with DP), warmed up as min(ema, (1+t)/(10+t))
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    img_size: int | None = None  # default: the base's
    device: str = "auto"
    seed: int = 0
    resume: bool = False
    val_fraction: float = 0.1
    contributor: str | None = None
    augment: bool = True
    num_workers: int | None = None  # default: 8 on GPU, 0 on CPU
    dp: DPConfig | None = None  # train with DP-SGD
    prox: float = 0.0  # μ of the proximal pull toward the base (taskvec.training.mergeable; 0: off)
    head: str = "train"  # train | frozen | balanced | lp-ft (taskvec.training.mergeable)

    def check(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("epochs and `steps` exclude each other: give one", field="epochs")
        for name in ("epochs", "steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}", field=name, expected=">= 1", got=v)
        if self.lr is not None:
            check_range("lr", self.lr, low=0)
        if self.ema is not None:
            check_range("ema", self.ema, low=0, high=1, low_open=False)
        mode = parse_mode(self.train)
        check_range("prox", self.prox, low=0, low_open=False)
        check_head(self.head, dp=self.dp is not None)
        if mode.kind == "head" and self.head in ("frozen", "lp-ft"):
            raise ConfigError(f"head {self.head} needs features to train, but `train` head trains the head alone",
                              field="head", got=self.head)
        check_range("val_fraction", self.val_fraction, low=0, high=1, low_open=False)
        if self.dp is not None:
            self.dp.check()
        if mode.kind == "class-means":
            _check_class_means(self)
        elif self.dp is not None and self.batch_size is not None:
            raise ConfigError("batch_size does not apply to DP-SGD: each unit joins a step's batch with probability "
                              "`sample_rate` (a batch size would reveal the data's size); leave it out",
                              field="batch_size", got=self.batch_size)


def _check_class_means(config: FinetuneConfig) -> None:
    """class-means takes no gradient step: refuse settings of one."""
    given = [name for name, default in (("epochs", None), ("steps", None), ("lr", None), ("ema", None), ("prox", 0.0))
             if getattr(config, name) != default]
    if config.head != "train":
        given.append("head")
    if given:
        raise ConfigError(f"{given[0]} does not apply to `train` class-means (one pass over the data, no gradient "
                          "step): leave it out", field=given[0], got=getattr(config, given[0]))
    if config.dp is not None and config.dp.noise_multiplier and config.dp.target_epsilon:
        release_noise(config.dp)  # refuses a multiplier over the target


@dataclass
class TrainingSetup:
    """What the loop trains with. DP-SGD replaces model, optimizer and loader with private versions and
    reports its ledger through `privacy`; `state`/`load_state` carry extra JSON state through checkpoints;
    `stop` ends training early (e.g. when a privacy budget is spent)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: torch.utils.data.DataLoader  # type: ignore[type-arg]
    privacy: Callable[[], list[dict[str, Any]]] = list
    state: Callable[[], dict[str, Any]] = dict
    load_state: Callable[[dict[str, Any]], None] = lambda s: None
    stop: Callable[[], bool] = lambda: False
    per_epoch: int | None = None  # optimiser steps per epoch when the loader yields physical batches of larger ones


def prepare_training(setup: TrainingSetup, config: FinetuneConfig, run_id: str, steps: int,
                     group: Group = Group()) -> TrainingSetup:
    """The DP seam: identity without DP; with `config.dp`, the private model, optimizer and loader from
    `taskvec.privacy.dpsgd` (patient unit when the training data has patient ids), whose ledger, checkpoint
    state and stop condition come from the privacy meter. Several processes (`group`): the model wrapped
    for them and each rank's share of the loader (`taskvec.training.distributed`)."""
    if config.dp is None:
        if group.world == 1:
            return setup
        return replace(setup, model=wrap_model(setup.model, group, private=False),
                       loader=shard_loader(setup.loader, group))
    model, optimizer, loader, meter = make_private(
        setup.model, setup.optimizer, setup.loader, replace(config.dp, seed=rank_seed(config.dp.seed, group)),
        steps=steps, patient_ids=getattr(setup.loader.dataset, "groups", None),
        shard=group.shard,
    )
    return TrainingSetup(
        wrap_model(model, group, private=True), optimizer, loader,
        privacy=lambda: [meter.ledger_entry(run_id)] if meter.steps else [],
        state=meter.state, load_state=meter.load_state, stop=lambda: meter.exhausted,
        per_epoch=meter.steps_per_epoch,
    )


@dataclass
class StepState:
    """Yielded to `track` once per optimizer step; the loop fills `loss` and `images_per_s` after the step ran."""

    epoch: int
    epochs: int
    step: int
    total_steps: int
    batches: Iterator[Any] = field(repr=False)  # the step's batches (under DP-SGD, several physical ones)
    loss: float | None = None
    images_per_s: float | None = None


@dataclass
class EpochRecord:
    epoch: int
    steps: int
    train_loss: float | None  # None: no gradient step (class-means)
    lr: float
    seconds: float
    images_per_s: float
    val: dict[str, Any] = field(default_factory=dict)
    privacy: list[dict[str, Any]] = field(default_factory=list)  # the ledger so far (DP-SGD: ε spent)


@dataclass
class FinetuneResult:
    run_dir: Path
    model_path: Path
    identity: str
    run_id: str
    samples: int
    epochs: int
    steps: int
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    resumed_from_epoch: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ schedule


def default_batch(n_train: int) -> int:
    """A batch well below the training-set size (without DP): n/8 within [4, 32]."""
    return min(32, max(4, n_train // 8))


def plan_steps(config: FinetuneConfig, per_epoch: int) -> tuple[int, list[str]]:
    """Optimiser steps of the run (explicit `steps`, explicit `epochs`, or by default DEFAULT_EPOCHS but at
    least MIN_STEPS; DP_STEPS with DP-SGD) and a warning when that is too few to learn. Under DP-SGD
    `per_epoch` is ⌊1/q⌋, so no count depends on the data's size."""
    least = MIN_STEPS if config.dp is None else MIN_DP_STEPS
    if config.steps:
        total = config.steps
    elif config.epochs:
        total = config.epochs * per_epoch
    else:
        total = DP_STEPS if config.dp is not None else max(least, DEFAULT_EPOCHS * per_epoch)
    warn = [] if total >= least else [
        f"only {total} optimiser steps: runs this short rarely move a pretrained network; give steps >= {least}"]
    return total, warn


def schedule(n_train: int, config: FinetuneConfig) -> tuple[float, int]:
    """(expected batch size, optimiser steps) of a run of `config` on `n_train` training images (the batch
    drops a ragged last batch when the data holds more than one; DP-SGD: Poisson batches at rate q)."""
    if config.dp is not None:
        q = config.dp.sample_rate
        return q * n_train, plan_steps(config, steps_per_epoch(q))[0]
    batch = config.batch_size or default_batch(n_train)
    return batch, plan_steps(config, n_train // batch if n_train > batch else 1)[0]


def epoch_seed(seed: int, epoch: int, salt: int) -> int:
    """Independent, reproducible seeds per (run seed, epoch, purpose)."""
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1, dtype=np.uint64)[0] >> 1)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class SegmentationLoss(nn.Module):
    """Cross-entropy plus soft Dice over the foreground classes, both per image then averaged over the batch
    (so the loss is a mean of per-example terms, as DP-SGD's per-example gradients need); no in-place ops.
    Dice counters the dominance of background pixels that traps cross-entropy alone at "all background".
    `target` is a class-index mask (B×H×W) or per-pixel class probabilities (B×K×H×W, soft masks)."""

    def __init__(self, smooth: float = 1.0) -> None:
        super().__init__()
        self.ce = nn.CrossEntropyLoss()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        k = logits.shape[1]
        probs = logits.softmax(1)[:, 1:]
        if target.is_floating_point():
            onehot = target[:, 1:]
        else:
            onehot = nn.functional.one_hot(target, k).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
        inter = (probs * onehot).sum((2, 3))
        dice = (2 * inter + self.smooth) / (probs.sum((2, 3)) + onehot.sum((2, 3)) + self.smooth)
        return self.ce(logits, target) + (1 - dice).mean()


def augment(x: torch.Tensor, y: torch.Tensor | None, gen: torch.Generator,
            group: Group = Group()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one of the 8 symmetries of the square per sample (random transpose, then random flips of each
    axis: together every rotation by 90° and every mirror), the same to a sample's mask."""
    b = x.shape[0]
    bits = augment_bits((3, b), gen, group).bool().to(x.device)

    def apply(t: torch.Tensor) -> torch.Tensor:
        shape = (b,) + (1,) * (t.dim() - 1)
        t = torch.where(bits[0].view(shape), t.transpose(-2, -1), t)
        t = torch.where(bits[1].view(shape), t.flip(-1), t)
        return torch.where(bits[2].view(shape), t.flip(-2), t)

    return apply(x), (apply(y) if y is not None else None)


def mixed_precision(device: torch.device, dp: bool) -> str | None:
    """The autocast dtype of training: bf16 on GPUs that have it, else fp16 with loss scaling, except under
    DP-SGD, which trains in fp32 there: loss scaling would scale per-sample gradients before clipping, and
    its skipped overflow steps would depend on the private data."""
    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return "bf16"
    return None if dp else "fp16"


# ------------------------------------------------------------------------------------------ run folder


def _config_dict(config: FinetuneConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(config).items() if k not in RUNTIME_FIELDS}


def _open_run(out: Path, parent: str, config: FinetuneConfig, source: str, split: dict[str, Any]) -> str:
    """Create or reopen a run folder and record its split; return its run id. Refuse to reuse a folder without
    --resume, or to resume it on other units than it started with."""
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise OutputExistsError(f"{out}: run folder exists; pass `resume` to continue it, or choose another `out_dir`",
                                path=out)
    if config.resume and run_file.exists():
        run = json.loads(run_file.read_text())
        if run["parent"] != parent:
            raise MismatchError(f"{out}: was started from base {run['parent'][:12]}, not {parent[:12]}")
        started = _config_dict(FinetuneConfig()) | run["config"]  # a field newer than the run: its default
        diff = {k: (started.get(k), v) for k, v in _config_dict(config).items() if started.get(k) != v}
        if diff:
            said = ", ".join(f"{k} {old!r} (now {new!r})" for k, (old, new) in diff.items())
            raise MismatchError(f"{out}: the run was started with {said}; repeat its options to resume it")
        _check_split(out / SPLIT_FILE, split)
        return str(run["run_id"])
    if config.resume and out.exists() and any(out.iterdir()):
        raise TaskvecError(f"{out}: holds no {RUN_FILE}; it is not a taskvec run folder")
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    write_json(run_file, {"run_id": run_id, "parent": parent, "config": _config_dict(config), "data": source})
    write_json(out / SPLIT_FILE, split)
    return run_id


def _check_split(path: Path, split: dict[str, Any]) -> None:
    """Refuse to resume a run on other training or validation units than it started with (its privacy ledger
    would then describe no one data set); record the split of a run folder that predates `split.json`."""
    if not path.exists():
        write_json(path, split)
        return
    before = json.loads(path.read_text())
    if before != split:
        moved = {side: len(set(before.get(side, [])) ^ set(split[side])) for side in ("train", "val")}
        raise MismatchError(f"{path.parent}: the data changed since the run started ({moved['train']} training and "
                            f"{moved['val']} validation {split['unit']}s differ from {path.name}); resume it on the "
                            "same data, or start a new run", path=path)


def _finished(out: Path) -> FinetuneResult:
    m = json.loads((out / METRICS_FILE).read_text())
    return FinetuneResult(out, out / MODEL_FILE, m["identity"], m["run_id"], m["samples"]["train"], m["epochs"],
                          m["steps"], m["history"], m["val_metrics"], m["resumed_from_epoch"], m["skipped"],
                          ["the run had already finished; nothing to do"])


# ------------------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    """Model, optimizer and EMA tensors plus JSON state, written atomically as safetensors."""
    tensors = {f"model/{k}": v for k, v in net.state_dict().items()} | {f"ema/{k}": v for k, v in ema.items()}
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{pid}/{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "checkpoint", **meta,
            "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars}}
    save_tensors(tensors, path, meta, force=True)


def load_checkpoint(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Restore model, optimizer and EMA in place; return the checkpoint's JSON state."""
    meta = read_kind(path, "checkpoint").meta
    tensors = load_file(str(path))
    net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    for k in ema:
        ema[k].copy_(tensors[f"ema/{k}"])
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer/"):
            _, pid, name = k.split("/", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, d in meta["optimizer"]["scalars"].items():
        state.setdefault(int(pid), {}).update(d)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    return meta


# ------------------------------------------------------------------------------------------ training


def _check_size(net: nn.Module, spec: ModelSpec, size: int, device: torch.device) -> None:
    if size == spec.img_size:
        return
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(2, spec.in_chans, size, size, device=device))
    except Exception as e:  # noqa: BLE001 - any failure means this size does not fit the architecture
        raise ConfigError(f"img_size {size} does not fit {spec.arch} (built for {spec.img_size}): "
                          f"{str(e).splitlines()[0]}", field="img_size", expected=spec.img_size, got=size) from None


def finetune(
    base: str | os.PathLike[str],
    data: str | os.PathLike[str] | DataSplits | ImageDataset,
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    track: Track[Any] = no_track,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `base` on `data` (a path, `DataSplits`, or one `ImageDataset` to split) into `out_dir`.

    Writes `out_dir/checkpoint.safetensors` after every epoch and, at the end, `model.safetensors` (a taskvec
    model file with parent, run id, training record and privacy ledger) and `metrics.json`. Under a launcher
    (torchrun), every process calls this; rank 0 alone writes and reports (`taskvec.training.distributed`).
    """
    config = config or FinetuneConfig()
    config.check()
    out = Path(out_dir)
    header = read_kind(base, "model")
    spec = ModelSpec.from_dict(header.meta["model"])
    if config.resume and (out / MODEL_FILE).exists():
        return _finished(out)
    if (out / MODEL_FILE).exists():
        raise OutputExistsError(f"{out}: holds a finished run ({MODEL_FILE}); choose another `out_dir`", path=out)
    splits = as_splits(data, spec, img_size=config.img_size, val_fraction=config.val_fraction, seed=config.seed)
    if splits.train is None:
        raise TaskvecError(f"{splits.source}: no training split")
    if config.head != "train" and spec.task != "classification":
        raise ConfigError(f"head {config.head} is for classification; a {spec.task} base trains its head",
                          field="head", got=config.head)
    means = parse_mode(config.train).kind == "class-means"
    if means and spec.task != "classification":
        raise ConfigError(f"train class-means is for classification, not {spec.task}", field="train",
                          got=config.train)
    if config.dp is not None and not means:  # refuse a base DP-SGD cannot train before the run folder exists
        require_dp_ready(create_module(spec))
    if config.head == "frozen" and spec.task == "classification":
        _check_frozen_head(base, spec)
    with process_group(resolve_device(config.device)) as group:
        if means and group.world > 1:
            raise ConfigError("train class-means runs in one process (one pass over the data)", field="train")
        if not group.main:  # rank 0 reports
            track, on_epoch = no_track, None
        run = _start(base, header.meta["identity"], spec, splits.train, splits.val, out, config, splits.source, group)
        if means:
            history = _fit_class_means(run, config, splits.train, splits.val, track, on_epoch)
        else:
            history = _train(run, config, splits.val, track, on_epoch)
        return _save_run(run, config, splits, history)


def _check_frozen_head(base: str | os.PathLike[str], spec: ModelSpec) -> None:
    """A head kept frozen must tell the classes apart: refuse a base whose classifier is all zero."""
    from safetensors import safe_open

    from taskvec.training.modes import head_prefixes

    prefixes = head_prefixes(create_module(spec), spec.task)
    with safe_open(str(base), "pt") as f:
        if not any(f.get_tensor(k).any() for k in f.keys() if k.startswith(prefixes)):
            raise ConfigError("head frozen would keep the base's all-zero classifier (a pretrained base's default) "
                              "and learn nothing: build the base with zero_head=False", field="head", got="frozen")


@dataclass
class _Run:
    """A run in progress: its folder and identity, the network and what trains it, and the step schedule."""

    out: Path
    parent: str
    run_id: str
    spec: ModelSpec
    device: torch.device
    net: nn.Module
    setup: TrainingSetup
    loader_gen: torch.Generator
    per_epoch: int
    epochs: int
    total: int
    start_epoch: int
    history: list[dict[str, Any]]
    group: Group
    mode: TrainMode
    trained: list[str]  # base keys trained as full deltas
    lora: dict[str, int]  # base keys adapted by LoRA, with their rank
    lr: float  # peak learning rate
    batch_size: int
    ema: dict[str, torch.Tensor]  # running average of the trained parameters (empty: off)
    decay: float
    notes: list[str]
    criterion: nn.Module
    site: SiteSteps  # the proximal step and the linear-probe phase (taskvec.training.mergeable)


def _start(base: str | os.PathLike[str], parent: str, spec: ModelSpec, train: ImageDataset, val: ImageDataset | None,
           out: Path, config: FinetuneConfig, source: str, group: Group) -> _Run:
    """Open the run folder (rank 0), load the base, build optimizer and loader (private ones under DP; this
    rank's share of them), and pick up the last checkpoint if there is one."""
    run_id = group.on_main(lambda: _open_run(out, parent, config, source, split_record(train, val)))
    device = group.device
    net = load_model(base, device)
    _check_size(net, spec, train.img_size, device)
    import timm.optim

    mode = parse_mode(config.train)
    net, trained, lora = prepare_mode(net, spec.task, mode, keep_head=config.head == "frozen")
    lr = config.lr or mode.lr
    means = mode.kind == "class-means"  # one pass, no step: nothing to schedule or to make private
    dp_sgd = config.dp is not None and not means
    # class-means: the batch only paces its one pass, and one derived from the data's size would reveal it;
    # DP-SGD samples its own batches (the loader's paces evaluation)
    batch_size = config.batch_size or (64 if means else config.dp.max_physical_batch if config.dp is not None
                                       else default_batch(len(train)))
    optimizer = timm.optim.create_optimizer_v2(net, "adamw", lr=lr, weight_decay=config.weight_decay)
    loader_gen = torch.Generator()
    loader = make_loader(train, batch_size, device, shuffle=True, generator=loader_gen,
                         drop_last=len(train) > batch_size, num_workers=config.num_workers)
    per_epoch = steps_per_epoch(config.dp.sample_rate) if dp_sgd and config.dp is not None else len(loader)
    total, notes = (0, []) if means else plan_steps(config, per_epoch)
    site = SiteSteps(net, prox=config.prox, anchors=prox_anchors(net) if config.prox else None,
                     head=head_prefixes(net, spec.task),
                     probe_steps=round(LP_FRACTION * total) if config.head == "lp-ft" else 0)
    site.attach(optimizer)  # before DP-SGD wraps it: the hooks then run on the private update
    setup = TrainingSetup(net, optimizer, loader)
    if not means:
        setup = prepare_training(setup, config, run_id, total, group)
    per_epoch = setup.per_epoch or len(setup.loader)
    decay = 0.0 if means else config.ema if config.ema is not None else (DP_EMA if config.dp is not None else 0.0)
    ema = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad} if decay else {}
    run = _Run(out, parent, run_id, spec, device, net, setup, loader_gen, per_epoch, math.ceil(total / per_epoch),
               total, 0, [], group, mode, trained, lora, lr, batch_size, ema, decay, notes,
               _criterion(spec, train, config.head).to(device), site)
    if (out / CHECKPOINT_FILE).exists():
        meta = load_checkpoint(out / CHECKPOINT_FILE, net, setup.optimizer, ema)
        run.start_epoch, run.history = meta["epoch"], meta["history"]
        setup.load_state(meta.get("setup", {}))
    return run


def _criterion(spec: ModelSpec, train: ImageDataset, head: str) -> nn.Module:
    """Per-pixel cross-entropy plus Dice, cross-entropy, or (head balanced) class-weighted cross-entropy."""
    if spec.task == "segmentation":
        return SegmentationLoss()
    if head == "balanced":
        return WeightedCrossEntropy(class_weights(train.targets, spec.num_classes))
    return nn.CrossEntropyLoss()


def _steps(run: _Run, seed: int, aug_gen: torch.Generator) -> Iterator[StepState]:
    """Every remaining step with its batches; each epoch reseeds torch, the sampler and the augmentation."""
    for epoch in range(run.start_epoch, run.epochs):
        torch.manual_seed(epoch_seed(seed, epoch, 0))
        run.loader_gen.manual_seed(epoch_seed(seed, epoch, 1))
        aug_gen.manual_seed(epoch_seed(seed, epoch, 2))
        batches = iter(run.setup.loader)
        for i in range(min(run.per_epoch, run.total - epoch * run.per_epoch)):
            yield StepState(epoch, run.epochs, epoch * run.per_epoch + i, run.total,
                            _physical(batches, run.setup.optimizer))


def _physical(batches: Iterator[Any], optimizer: torch.optim.Optimizer) -> Iterator[Any]:
    """The batches of one step: one, or under DP-SGD those of one logical batch, until the optimizer steps."""
    for batch in batches:
        yield batch
        if not is_accumulating(optimizer):
            return


def _train(run: _Run, config: FinetuneConfig, val: ImageDataset | None, track: Track[Any],
           on_epoch: Callable[[EpochRecord], None] | None) -> list[dict[str, Any]]:
    """The loop: warm-up/cosine learning rate per step, augmentation, mixed precision on GPU; after every
    epoch a record (loss, validation metrics, privacy ledger) and a checkpoint. Returns the history."""
    setup, model, optimizer = run.setup, run.setup.model, run.setup.optimizer
    seg = run.spec.task == "segmentation"
    norm = Normalizer(run.spec, run.device)
    criterion = run.criterion
    mixed = mixed_precision(run.device, config.dp is not None)
    scaler = torch.amp.GradScaler("cuda", enabled=mixed == "fp16")
    warmup = max(1, round(config.warmup * run.total))
    aug_gen = torch.Generator()
    loss_sum = torch.zeros((), device=run.device)
    augmult = config.dp.augmult if config.dp is not None else 1
    seen, t0, steps_in_epoch, lr = 0, time.perf_counter(), 0, run.lr
    model.train()
    for st in track(_steps(run, config.seed, aug_gen), "fine-tuning", run.total - run.start_epoch * run.per_epoch):
        if setup.stop():
            break
        lr = lr_at(st.step, run.total, run.lr, warmup)
        for g in optimizer.param_groups:
            g["lr"] = lr
        run.site.step = st.step
        for x, y in st.batches:  # under DP-SGD the optimizer accumulates until the logical batch's last one
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            if augmult > 1:  # K copies of each image, augmented independently; the DP optimizer averages them
                x, y = x.repeat_interleave(augmult, 0), y.repeat_interleave(augmult, 0)
            if config.augment:
                x, y_aug = augment(x, y if seg else None, aug_gen, run.group)
                y = y_aug if y_aug is not None else y
            optimizer.zero_grad(set_to_none=True)
            with autocast(run.device) if mixed else contextlib.nullcontext():
                loss = criterion(model(norm(x)).float(), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if x.shape[0]:  # an empty Poisson batch (DP-SGD) takes a noise-only step but has no loss
                loss_sum += loss.detach() * x.shape[0]
            seen += x.shape[0]
        with torch.no_grad():
            decay = min(run.decay, (1 + st.step) / (10 + st.step))  # warm-up: short runs are not stuck at the start
            for n, p in run.net.named_parameters():
                if n in run.ema:
                    run.ema[n].lerp_(p, 1 - decay)
        steps_in_epoch += 1
        stopping = setup.stop()
        end_of_epoch = stopping or st.step + 1 == min(run.total, (st.epoch + 1) * run.per_epoch)
        if steps_in_epoch % 10 == 0 or end_of_epoch:
            st.loss = float(loss.detach())
            st.images_per_s = seen * run.group.world / (time.perf_counter() - t0)
        if not end_of_epoch:
            continue
        seconds, images = time.perf_counter() - t0, run.group.sum(seen)
        record = EpochRecord(st.epoch + 1, st.step + 1, run.group.sum(float(loss_sum)) / max(1, images), lr, seconds,
                             images / seconds)
        _end_epoch(run, config, val, record)
        if on_epoch is not None:
            on_epoch(record)
        if stopping:
            break
        loss_sum.zero_()
        seen, t0, steps_in_epoch = 0, time.perf_counter(), 0
    return run.history


def _fit_class_means(run: _Run, config: FinetuneConfig, train: ImageDataset, val: ImageDataset | None,
                     track: Track[Any], on_epoch: Callable[[EpochRecord], None] | None) -> list[dict[str, Any]]:
    """Set the head to the class-means head (`taskvec.training.class_means`) and record it as the run's one
    epoch. A resumed run keeps the head and ledger of its checkpoint: a second noisy release would cost ε again."""
    if run.history:  # resumed after the pass
        ledger = run.history[-1]["privacy"]
        run.setup = replace(run.setup, privacy=lambda: ledger)
        return run.history
    t0 = time.perf_counter()
    weight, bias, entry = class_means_head(run.net, run.spec, train, device=run.device, batch_size=run.batch_size,
                                           dp=config.dp, run_id=run.run_id, track=track)
    head: Any = run.net.get_classifier()  # type: ignore[operator]
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    ledger = [entry] if entry is not None else []
    run.setup = replace(run.setup, privacy=lambda: ledger)
    seconds = time.perf_counter() - t0
    record = EpochRecord(1, 0, None, 0.0, seconds, len(train) / seconds)
    _end_epoch(run, config, val, record)
    if on_epoch is not None:
        on_epoch(record)
    return run.history


def _end_epoch(run: _Run, config: FinetuneConfig, val: ImageDataset | None, record: EpochRecord) -> None:
    """Complete the epoch's record (privacy ledger, validation metrics), add it to the history, checkpoint."""
    record.privacy = run.setup.privacy()
    if val is not None:
        record.val = evaluate_module(run.net, run.spec, val, device=run.device, batch_size=run.batch_size,
                                     num_workers=config.num_workers)
        run.setup.model.train()
    run.history.append(asdict(record))
    if run.group.main:
        save_checkpoint(run.out / CHECKPOINT_FILE, run.net, run.setup.optimizer, run.ema,
                        {"epoch": record.epoch, "step": record.steps, "history": run.history, "run_id": run.run_id,
                         "parent": run.parent, "setup": run.setup.state()})


def _save_run(run: _Run, config: FinetuneConfig, splits: DataSplits, history: list[dict[str, Any]]) -> FinetuneResult:
    """Write `metrics.json` and the model file (parent, run id, training record, privacy ledger); drop the
    checkpoint. Rank 0 writes; every rank returns once it has."""
    train, val, out = splits.train, splits.val, run.out
    assert train is not None
    val_metrics = history[-1]["val"] if history else {}
    if run.ema:  # the averaged weights are the run's result (post-processing: no privacy cost)
        with torch.no_grad():
            for n, p in run.net.named_parameters():
                if n in run.ema:
                    p.copy_(run.ema[n])
        if val is not None:
            val_metrics = evaluate_module(run.net, run.spec, val, device=run.device, batch_size=run.batch_size,
                                          num_workers=config.num_workers)
    if run.lora:
        run.net = merge_adapters(run.net)
    epochs, total = (history[-1]["epoch"], history[-1]["steps"]) if history else (0, 0)
    training = {
        "samples": len(train), "contributor": config.contributor, "epochs": epochs, "steps": total,
        "lr": run.lr, "batch_size": None if config.dp is not None and run.total else run.batch_size,
        "seed": config.seed, "img_size": train.img_size,
        "val_samples": len(val) if val is not None else 0, "val_metrics": val_metrics, "ema": run.decay,
        "train": mode_record(run.mode, run.trained, run.lora), "prox": config.prox, "head": config.head,
    }
    identity = state_digest(run.net.state_dict())
    privacy = name_model(run.setup.privacy(), identity)  # two trainings are never taken for one
    result = FinetuneResult(out, out / MODEL_FILE, identity, run.run_id, len(train), epochs, total, history,
                            val_metrics, run.start_epoch, len(splits.skipped), splits.warnings + run.notes)
    if run.group.main:
        summary = {k: v for k, v in asdict(result).items() if k not in ("run_dir", "model_path")}
        name, value = primary_metric(val_metrics) if val_metrics else ("", None)
        write_json(out / METRICS_FILE, {**summary, "parent": run.parent, "task": run.spec.task,
                                         "data": splits.source, "config": _config_dict(config),
                                         "samples": {"train": len(train), "val": training["val_samples"]},
                                         "primary_metric": {name: value}, "privacy": privacy})
        if privacy:  # counts and validation metrics come from private data outside the guarantee: metrics.json only
            training = {k: v for k, v in training.items() if k not in PRIVATE_TRAINING_FIELDS}
        save_model(run.net, run.spec, out / MODEL_FILE,
                   extra={"parent": run.parent, "run_id": run.run_id, "training": training, "privacy": privacy})
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    run.group.barrier()
    return result
