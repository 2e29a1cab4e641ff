"""Local fine-tuning: one site trains the base's own architecture and head on its own data.

Defaults: AdamW (timm's optimizer factory: no weight decay on biases and norms), linear warm-up then cosine
decay per step (`taskvec.training.schedule`), cross-entropy (segmentation: per-pixel cross-entropy plus soft
Dice; `taskvec.training.losses`), augmentation by the 8 flips/90° rotations of the square, mixed precision on
GPU only; what trains and what the vector carries follow the training mode (`taskvec.training.modes`), and a
mode that fits in one pass (no gradient step) makes that pass instead of the loop. DP-SGD recipe: large Poisson
batches at a public sampling rate (`DPConfig.sample_rate`) for a public number of steps, augmentation
multiplicity, an exponential moving average of the weights (the saved model is the average). Under DP nothing
in the model file is computed from the data's size: no sample count, batch size or validation metric.

Determinism and resume: each epoch reseeds torch, the sampler and the augmentation from `(seed, epoch)`, and
the learning rate is a function of the step, so a run resumed from its end-of-epoch checkpoint
(`taskvec.training.run_folder`) reaches the same weights as an uninterrupted one (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskvec.errors import ConfigError, FileFormatError, OutputExistsError, PrivacyError, TaskvecError
from taskvec.io.files import read_kind, write_json
from taskvec.io.schema import ModelHeader, is_count
from taskvec.io.tensors import state_digest
from taskvec.models.spec import ModelSpec, check_size, create_module, load_model, save_model, starts_pretrained
from taskvec.privacy.dpsgd import DPConfig, is_accumulating, noise_and_limit, require_dp_ready
from taskvec.privacy.ledger import name_model
from taskvec.progress import Track, no_track
from taskvec.training.augment import augment
from taskvec.training.config import DP_EMA, FinetuneConfig
from taskvec.training.data import DataSplits, ImageDataset, Normalizer, as_splits, make_loader, split_record
from taskvec.training.data.cache import cached_splits
from taskvec.training.distributed import Group, process_group
from taskvec.training.evaluate import autocast, evaluate_module, resolve_device
from taskvec.training.losses import criterion
from taskvec.training.mergeable import LP_FRACTION, SiteSteps, prox_anchors
from taskvec.training.metrics import primary_metric
from taskvec.training.modes import TrainMode, VectorLayout, head_prefixes
from taskvec.training.run_folder import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    MODEL_FILE,
    FinetuneResult,
    config_dict,
    finished,
    load_checkpoint,
    open_run,
    runtime_record,
    save_checkpoint,
)
from taskvec.training.schedule import default_batch, epoch_seed, lr_at, plan_steps
from taskvec.training.setup import TrainingSetup, prepare_training

PRIVATE_TRAINING_FIELDS = ("samples", "val_samples", "val_metrics")  # left out of a DP-SGD model's header


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
    train_loss: float | None  # None: no gradient step (a mode that fits in one pass)
    lr: float
    seconds: float
    images_per_s: float
    val: dict[str, Any] = field(default_factory=dict)
    privacy: list[dict[str, Any]] = field(default_factory=list)  # the ledger so far (DP-SGD: ε spent)
    composed_epsilon: float | None = None  # with `DPConfig.prior`: ε so far of this run and those releases together


def mixed_precision(device: torch.device, dp: bool) -> str | None:
    """The autocast dtype of training: bf16 on GPUs that have it, else fp16 with loss scaling, except under
    DP-SGD, which trains in fp32 there: loss scaling would scale per-sample gradients before clipping, and
    its skipped overflow steps would depend on the private data."""
    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return "bf16"
    return None if dp else "fp16"


def finetune(
    base: str | os.PathLike[str],
    data: str | os.PathLike[str] | DataSplits | ImageDataset,
    out_dir: str | os.PathLike[str],
    config: FinetuneConfig | None = None,
    track: Track[Any] = no_track,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `base` on `data` (a path, `DataSplits`, or one `ImageDataset` to split) into `out_dir`.

    Writes `out_dir/checkpoint.safetensors` after every epoch and, at the end, `model.safetensors` (a taskvec
    model file with parent, run id, training record and privacy ledger) and `metrics.json`. Under a launcher
    (torchrun), every process calls this; rank 0 alone writes and reports (`taskvec.training.distributed`).
    Each warning of the result goes to `on_warning` as soon as it is known, before training starts. A run
    refused, or failing before its first checkpoint, leaves `out_dir` as it was.
    """
    say = on_warning or (lambda message: None)
    header = read_kind(base, "model")
    config = (config or FinetuneConfig()).for_base(starts_pretrained(header.model))
    config.check()
    if config.dp is not None and header.model.run_id is not None:  # e.g. a base pretrained on public data
        say(f"{base} is a fine-tuned model (run {header.model.run_id}): this run's DP guarantee does not cover the "
            "data it was fine-tuned on, which its weights and identity depend on; unless those data are public, "
            "start from the base it was fine-tuned from")
    out = Path(out_dir)
    spec = ModelSpec.from_dict(header.model.model)
    if (out / MODEL_FILE).exists() and not config.resume:
        raise OutputExistsError(f"{out}: holds a finished run ({MODEL_FILE}); choose another `out_dir`", path=out)
    splits = as_splits(data, spec, img_size=config.img_size, val_fraction=config.val_fraction, seed=config.seed)
    for w in splits.warnings:
        say(w)
    if config.head != "train" and spec.task != "classification":
        raise ConfigError(f"head {config.head} is for classification; a {spec.task} base trains its head",
                          field="head", got=config.head)
    if config.dp is not None and (config.dp.include_lineage or config.dp.earlier) and splits.train is not None:
        config = replace(config, dp=_with_earlier(config, header.model, splits.train.unit, say))
        config.check()  # a one-pass release over what the earlier releases left is refused here
    mode = config.mode
    if not mode.segmentation and spec.task != "classification":
        raise ConfigError(f"train {mode} is for classification, not {spec.task}", field="train", got=config.train)
    if config.dp is not None and not mode.fits_in_one_pass:  # refuse what DP-SGD cannot do before the run folder
        require_dp_ready(create_module(spec))
        noise_and_limit(config.dp, plan_steps(config)[0])
    if config.head == "frozen" and spec.task == "classification":
        _check_frozen_head(base, spec)
    if splits.train is None:
        raise TaskvecError(f"{splits.source}: no training split")
    twice = splits.train.repeated_image(across_units=True) if config.dp is not None else None
    if twice is not None:  # one image in several units: the guarantee per unit would not cover it
        raise PrivacyError(f"{splits.source}: image {twice} is listed "
                           + ("more than once; DP per image needs each image once: remove the repeats, or give "
                              "patient ids so that copies form one unit" if splits.train.unit == "image" else
                              "under two patient ids; DP per patient needs each image in one patient's unit: "
                              "give its copies the patient id it belongs to"), path=splits.source)
    if (out / MODEL_FILE).exists():  # resumed after it finished: the same run, nothing to do
        done = finished(out, header.model.identity, config, split_record(splits.train, splits.val))
        for w in done.warnings:
            say(w)
        return done
    splits = cached_splits(splits, config.image_cache, track)
    assert splits.train is not None
    with process_group(resolve_device(config.device)) as group:
        if not mode.multi_process and group.world > 1:
            raise ConfigError(f"train {mode} runs in one process ({mode.refusal})", field="train")
        if not group.main:  # rank 0 reports
            track, on_epoch = no_track, None
        with _undone_on_error(out, group):
            run = _start(base, header.model.identity, spec, splits.train, splits.val, out, config,
                         splits.source, group, say)
            # a one-pass mode has nothing to resume before its pass ends: a pass that fails leaves nothing
            fit = _fit_pass(run, config, splits.train, track) if mode.fits_in_one_pass and not run.history else None
            if mode.fits_in_one_pass:
                history = _one_pass(run, config, splits.train, splits.val, fit, on_epoch)
            else:
                history = _train(run, config, splits.val, track, on_epoch)
        return _save_run(run, config, splits, history)


def _with_earlier(config: FinetuneConfig, base: ModelHeader, unit: str, say: Callable[[str], None]) -> DPConfig:
    """`config.dp` with the earlier releases on the run's units, per `unit`, added to its `prior`: the
    contributor's already merged into the base (`include_lineage`) and the site's own vectors (`earlier`)."""
    from taskvec.privacy.budget import earlier_history

    dp = config.dp
    assert dp is not None
    if dp.include_lineage and not config.contributor:
        raise ConfigError("include_lineage counts the contributor's earlier releases: give `contributor`",
                          field="contributor")
    own = [read_kind(p, "vector") for p in dp.earlier]
    prior, warnings = earlier_history(base, config.contributor, unit, own, include_lineage=dp.include_lineage,
                                      seeded=dp.seed is not None)
    for w in warnings:
        say(w)
    # the caller's own `prior` stays; the files by their full paths, so that resuming with another path to them
    # repeats the run's options
    return replace(dp, prior=(*dp.prior, *prior), earlier=tuple(str(Path(p).resolve()) for p in dp.earlier))


def _composed_epsilon(dp: DPConfig | None, ledger: list[dict[str, Any]]) -> float | None:
    """ε of this run's release composed with its `prior` releases (None without them): what the site's units
    have spent in all, by the accountant the calibration and the merge's budget use."""
    if dp is None or not dp.prior or not ledger:
        return None
    from taskvec.privacy.accounting import dp_sgd_epsilon

    e = ledger[-1]
    return dp_sgd_epsilon([*dp.prior, (e["noise_multiplier"], e["sample_rate"], e["steps"])], e["delta"])[0]


def _check_frozen_head(base: str | os.PathLike[str], spec: ModelSpec) -> None:
    """A head kept frozen must tell the classes apart: refuse a base whose classifier is all zero."""
    from safetensors import safe_open

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
    layout: VectorLayout  # what the vector will carry
    lr: float  # peak learning rate
    batch_size: int
    ema: dict[str, torch.Tensor]  # running average of the trained parameters (empty: off)
    decay: float
    notes: list[str]
    criterion: nn.Module
    site: SiteSteps  # the proximal step and the linear-probe phase (taskvec.training.mergeable)


def _start(base: str | os.PathLike[str], parent: str, spec: ModelSpec, train: ImageDataset, val: ImageDataset | None,
           out: Path, config: FinetuneConfig, source: str, group: Group, say: Callable[[str], None]) -> _Run:
    """Open the run folder (rank 0), load the base, build optimizer and loader (private ones under DP; this
    rank's share of them), and pick up the last checkpoint if there is one; `say` the schedule's warnings."""
    run_id = group.on_main(lambda: open_run(out, parent, config, source, split_record(train, val),
                                            runtime_record(group.world, group.device)))
    device = group.device
    net = load_model(base, device)
    if train.img_size != spec.img_size:
        check_size(net, spec, train.img_size, device)
    import timm.optim

    mode = config.mode
    net, layout = mode.prepare(net, spec.task, keep_head=config.head == "frozen")
    lr = config.lr or mode.lr
    one_pass = mode.fits_in_one_pass  # no step: nothing to schedule or to make private
    # DP-SGD samples its own batches (the loader's paces evaluation)
    batch_size = config.batch_size or mode.pass_batch or (config.dp.max_physical_batch if config.dp is not None
                                                          else default_batch(len(train)))
    optimizer = timm.optim.create_optimizer_v2(net, "adamw", lr=lr, weight_decay=config.weight_decay)
    loader_gen = torch.Generator()
    loader = make_loader(train, batch_size, device, shuffle=True, generator=loader_gen,
                         drop_last=len(train) > batch_size, num_workers=config.num_workers)
    total, notes = (0, []) if one_pass else plan_steps(config, len(loader))
    for note in notes if group.main else []:
        say(note)
    site = SiteSteps(net, prox=config.prox, anchors=prox_anchors(net, mode) if config.prox else None,
                     head=head_prefixes(net, spec.task),
                     probe_steps=round(LP_FRACTION * total) if config.head == "lp-ft" else 0)
    site.attach(optimizer)  # before DP-SGD wraps it: the hooks then run on the private update
    setup = TrainingSetup(net, optimizer, loader)
    if not one_pass:
        setup = prepare_training(setup, config, run_id, total, group)
    per_epoch = setup.per_epoch or len(setup.loader)
    decay = 0.0 if one_pass else config.ema if config.ema is not None else (DP_EMA if config.dp is not None else 0.0)
    ema = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad} if decay else {}
    run = _Run(out, parent, run_id, spec, device, net, setup, loader_gen, per_epoch, math.ceil(total / per_epoch),
               total, 0, [], group, mode, layout, lr, batch_size, ema, decay, notes,
               criterion(spec, train, config.head).to(device), site)
    if (out / CHECKPOINT_FILE).exists():
        meta = load_checkpoint(out / CHECKPOINT_FILE, net, setup.optimizer, ema)
        _check_checkpoint(meta, run, dp_sgd=config.dp is not None and not one_pass)
        run.start_epoch, run.history = meta["epoch"], meta["history"]
        setup.load_state(meta.get("setup", {}))
    return run


def _check_checkpoint(meta: dict[str, Any], run: _Run, dp_sgd: bool) -> None:
    """Refuse a checkpoint whose counts do not add up for this run (edited, or from another schedule): resumed,
    it would skip or repeat steps, and under DP-SGD the ledger would count other steps than were taken."""
    epoch, step, history, state = meta.get("epoch", -1), meta.get("step", -1), meta.get("history"), meta.get("setup")
    # a one-pass mode (no planned epochs) records its pass as epoch 1 at step 0
    fine = (is_count(epoch) and 1 <= epoch <= max(run.epochs, 1) and is_count(step) and step <= run.total
            and isinstance(history, list) and len(history) == epoch and isinstance(state, (dict, type(None))))
    if fine and dp_sgd:
        fine = isinstance(state, dict) and state.get("dp_steps") == step
    if not fine:
        path = run.out / CHECKPOINT_FILE
        raise FileFormatError(f"{path}: its epoch, step, history or DP step count do not add up for this run "
                              f"(epoch {str(epoch)[:20]} of {run.epochs}, step {str(step)[:20]} of {run.total}); "
                              "delete it to start the run over", path=path)


@contextlib.contextmanager
def _undone_on_error(out: Path, group: Group) -> Iterator[None]:
    """Remove what the block adds to `out` (all of it, when it did not exist) if the block fails before a
    checkpoint is there to resume from: a run refused while it is set up, or failing in its first epoch, leaves
    nothing behind, so the corrected command does not meet "run folder exists"."""
    before = set(out.iterdir()) if out.is_dir() else None
    try:
        yield
    except BaseException:
        if (out / CHECKPOINT_FILE).exists():
            raise
        if group.main and before is None:
            shutil.rmtree(out, ignore_errors=True)
        elif group.main and before is not None:
            for p in set(out.iterdir()) - before:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise


def randomness_key(config: FinetuneConfig) -> int:
    """What each epoch seeds torch (dropout), the shuffling and the augmentation from: the run's `seed`; under
    DP-SGD a secret key (`DPConfig.seed` when a test gives one). An image's augmentation is drawn by its position
    in a batch, so from a public key it would depend on which other units were sampled, and adding one unit
    would change the others' clipped gradients: a sensitivity above the clip."""
    if config.dp is None:
        return config.seed
    return config.dp.seed if config.dp.seed is not None else secrets.randbits(63)


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
    steps = _steps(run, randomness_key(config), aug_gen)
    for st in track(steps, "fine-tuning", run.total - run.start_epoch * run.per_epoch):
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


def _fit_pass(run: _Run, config: FinetuneConfig, train: ImageDataset, track: Track[Any]) -> tuple[Any, float]:
    """Fit a one-pass mode (`TrainMode.fit`): its privacy ledger and the seconds it took."""
    t0 = time.perf_counter()
    fitted = run.mode.fit(run.net, run.spec, train, device=run.device, batch_size=run.batch_size, dp=config.dp,
                          run_id=run.run_id, track=track, run_dir=run.out)
    return fitted, time.perf_counter() - t0


def _one_pass(run: _Run, config: FinetuneConfig, train: ImageDataset, val: ImageDataset | None,
              fit: tuple[Any, float] | None, on_epoch: Callable[[EpochRecord], None] | None) -> list[dict[str, Any]]:
    """Record a one-pass mode's fit as the run's one epoch. A resumed run (`fit` None) keeps the network and
    ledger of its checkpoint: a second noisy release would cost ε again."""
    if fit is None:  # resumed after the pass
        ledger = run.history[-1]["privacy"]
        run.setup = replace(run.setup, privacy=lambda: ledger)
        return run.history
    fitted, seconds = fit
    run.setup = replace(run.setup, privacy=lambda: fitted)
    record = EpochRecord(1, 0, None, 0.0, seconds, len(train) / seconds)
    _end_epoch(run, config, val, record)
    if on_epoch is not None:
        on_epoch(record)
    return run.history


def _end_epoch(run: _Run, config: FinetuneConfig, val: ImageDataset | None, record: EpochRecord) -> None:
    """Complete the epoch's record (privacy ledger, validation metrics), add it to the history, checkpoint."""
    record.privacy = run.setup.privacy()
    record.composed_epsilon = _composed_epsilon(config.dp, record.privacy)
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
    run.net = run.mode.finish(run.net)
    epochs, total = (history[-1]["epoch"], history[-1]["steps"]) if history else (0, 0)
    training = {
        "samples": len(train), "contributor": config.contributor, "epochs": epochs, "steps": total,
        "lr": run.lr, "batch_size": None if config.dp is not None and run.total else run.batch_size,
        "seed": config.seed, "img_size": train.img_size,
        "val_samples": len(val) if val is not None else 0, "val_metrics": val_metrics, "ema": run.decay,
        "train": run.layout.to_record(), "prox": config.prox, "head": config.head,
    }
    identity = state_digest(run.net.state_dict())
    privacy = name_model(run.setup.privacy(), secrets.token_hex(32))  # two trainings are never taken for one
    result = FinetuneResult(out, out / MODEL_FILE, identity, run.run_id, len(train), epochs, total, history,
                            val_metrics, run.start_epoch, len(splits.skipped), splits.warnings + run.notes,
                            _composed_epsilon(config.dp, privacy))
    if run.group.main:
        summary = {k: v for k, v in asdict(result).items() if k not in ("run_dir", "model_path")}
        name, value = primary_metric(val_metrics) if val_metrics else ("", None)
        write_json(out / METRICS_FILE, {**summary, "parent": run.parent, "task": run.spec.task,
                                         "data": splits.source, "config": config_dict(config),
                                         "samples": {"train": len(train), "val": training["val_samples"]},
                                         "primary_metric": {name: value}, "privacy": privacy})
        if privacy:  # counts and validation metrics come from private data outside the guarantee: metrics.json only
            training = {k: v for k, v in training.items() if k not in PRIVATE_TRAINING_FIELDS}
        save_model(run.net, run.spec, out / MODEL_FILE,
                   extra={"parent": run.parent, "run_id": run.run_id, "training": training, "privacy": privacy})
        (out / CHECKPOINT_FILE).unlink(missing_ok=True)
    run.group.barrier()
    return result
