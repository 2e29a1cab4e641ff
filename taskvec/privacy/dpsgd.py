"""DP-SGD fine-tuning with Opacus: Poisson sampling, per-example (or per-patient) clipping, Gaussian noise,
and PRV accounting (RDP, named, where PRV fails or would need too much memory).

`make_private(model, optimizer, loader, config, epochs=...)` returns the private versions of the three and a
`PrivacyMeter` that counts steps, reports ε and says when the target ε is reached. Opacus's hooks are
attached to the given module itself (not wrapped around it), so its state_dict keys are unchanged; the
returned model is a thin wrapper for the training loop only (empty Poisson batches), save the original.
The returned loader yields physical batches of at most `max_physical_batch` images (whole units; Opacus's
BatchMemoryManager for images in one process): the optimizer only clips and accumulates until the last
physical batch of a logical batch, then adds the noise and steps (`is_accumulating` tells the loop).

Nothing about the data's size enters what is released. Every unit is sampled with a public rate q
(`DPConfig.sample_rate`), an epoch is ⌊1/q⌋ steps, and the update is the noisy *sum* of the clipped unit
gradients (Opacus's "expected batch" is a constant 1, not q·n): with Adam or AdamW, which are invariant to
the gradient's scale, this trains as the usual mean does, while q, the step count, the noise and ε are
the same for every data set that differs by one unit (add-remove neighbours). The expected batch q·n is
never written anywhere.

Unit of privacy. Without patient ids each image is sampled independently with probability q and clipped on
its own (unit `image`). With patient ids each *patient* is sampled with probability q, all of that patient's
images enter the batch together, and the sum of their per-image gradients is clipped as one (unit
`patient`): the sensitivity to adding or removing one person is then the clipping bound, whatever the
number of images (tiles) they contributed.
"""

from __future__ import annotations

import functools
import secrets
import warnings
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from taskvec.errors import PrivacyConfigError, PrivacyError, TaskvecError, check_range
from taskvec.privacy import DEFAULT_SAMPLE_RATE, steps_per_epoch
from taskvec.privacy.accounting import calibrate_noise, epsilon_spent, max_steps
from taskvec.privacy.mechanisms.dp_sgd import DpSgd

# Opacus grad-sample mode, chosen by benchmarks/dp_overhead.py on this project's CPU (docs/results/performance.md):
# Opacus's per-layer samplers ("hooks") were fastest for ResNet-18/50 and ConvNeXt-T, and within noise of
# "functorch" (vmap over each layer) for ViT-Ti/S and ConvNeXt-atto. A timm ViT or ConvNeXt block with parameters
# of its own (cls_token, layer scale) is vmapped whole in either mode.
DEFAULT_GRAD_SAMPLE_MODE = "hooks"
# Bounds no real run comes near, each where an accountant or memory fails beyond it: δ above 0.01 guarantees
# little (it belongs far below 1/n; PRV's ε even turns negative near 0.3); a given noise multiplier above 1e4 leaves
# ε near 0 while the accountants slow down (infinity stalls RDP); a rate below 1e-9 plans more steps than an
# index holds; `augmult` copies every image in memory.
MAX_DELTA, MAX_GIVEN_NOISE_MULTIPLIER, MIN_SAMPLE_RATE, MAX_AUGMULT = 0.01, 1e4, 1e-9, 64


@dataclass
class DPConfig:
    """DP-SGD settings: clip each unit's gradient to `max_grad_norm` and either reach `target_epsilon`
    (noise calibrated for the planned epochs, training stops at the target) or use `noise_multiplier`.
    `sample_rate` q is each unit's chance to be in a step's (Poisson) batch: a public constant, so the expected
    batch q·n is never released.

    `augmult` K (De et al. 2022): the training loop feeds K augmented copies of every image, and each unit's
    gradient is the mean over its copies before clipping, so the sensitivity stays the clipping bound.

    `prior`: earlier releases on the same units that `target_epsilon` covers too, each (noise multiplier, sample
    rate, steps), a Gaussian release being one step at rate 1: the noise is calibrated, and the steps limited, so
    that this run and they compose to the target. `include_lineage`: `finetune` adds to `prior` the contributor's
    releases already merged into the base (`taskvec.privacy.budget.earlier_history`), so that one budget spans
    both stages of a statistics head and DP-SGD from it. `earlier`: the site's own earlier vectors (files) on
    the same units, added to `prior` too, each counted once whether the base's lineage (the merger's record)
    lists it or not."""

    max_grad_norm: float
    delta: float
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE  # or "functorch"
    seed: int | None = None
    augmult: int = 1  # augmentation multiplicity K (`finetune --dp` defaults to 2): mean over K augmented copies
    max_physical_batch: int = 64  # images per forward/backward pass (× augmult copies); logical batches accumulate
    sample_rate: float = DEFAULT_SAMPLE_RATE
    prior: tuple[tuple[float, float, int], ...] = ()
    include_lineage: bool = False
    earlier: tuple[str, ...] = ()

    def check(self) -> None:
        check_range("max_grad_norm", self.max_grad_norm, low=0, error=PrivacyConfigError)
        check_range("delta", self.delta, low=0, high=MAX_DELTA, high_open=False, error=PrivacyConfigError)
        check_range("sample_rate", self.sample_rate, low=MIN_SAMPLE_RATE, high=1, low_open=False, high_open=False,
                    error=PrivacyConfigError)
        if self.target_epsilon is None and self.noise_multiplier is None:
            raise PrivacyConfigError("target_epsilon or `noise_multiplier` is needed for DP-SGD",
                                     field="target_epsilon")
        if self.target_epsilon is not None:
            check_range("target_epsilon", self.target_epsilon, low=0, error=PrivacyConfigError)
        if (self.prior or self.include_lineage or self.earlier) and self.target_epsilon is None:
            raise PrivacyConfigError("earlier releases (`prior`, `include_lineage`, `earlier`) count against a "
                                     "`target_epsilon`: give one", field="target_epsilon")
        for z, q, steps in self.prior:
            if not (z > 0 and 0 < q <= 1 and isinstance(steps, int) and steps >= 1):
                raise PrivacyConfigError(f"prior release ({z}, {q}, {steps}) is not (noise multiplier > 0, sample rate "
                                         "in (0, 1], steps >= 1)", field="prior", got=[z, q, steps])
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise PrivacyConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}: without noise "
                                     "there is no DP", field="noise_multiplier", got=self.noise_multiplier)
        if self.noise_multiplier is not None:
            check_range("noise_multiplier", self.noise_multiplier, high=MAX_GIVEN_NOISE_MULTIPLIER, high_open=False,
                        error=PrivacyConfigError)
        for name, top in (("augmult", MAX_AUGMULT), ("max_physical_batch", 1 << 16)):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= top):
                raise PrivacyConfigError(f"{name} must be an integer in 1..{top}, got {value!r}", field=name,
                                         got=value)
        if self.grad_sample_mode not in ("hooks", "functorch"):
            raise PrivacyConfigError(f"grad_sample_mode must be hooks or functorch, got {self.grad_sample_mode!r}",
                                     field="grad_sample_mode", expected=["hooks", "functorch"],
                                     got=self.grad_sample_mode)


@dataclass
class PrivacyMeter:
    """Counts DP-SGD steps and turns them into ε; `exhausted` once another step would pass the target."""

    config: DPConfig
    unit: str
    sample_rate: float
    noise_multiplier: float
    step_limit: int | None
    grad_sample_mode: str
    steps_per_epoch: int = 0  # logical batches (optimiser steps) per epoch of the private loader
    steps: int = 0
    hooks: Any = field(default=None, repr=False)  # Opacus's per-sample-gradient hooks on the model

    def on_step(self, _optimizer: Any) -> None:
        self.steps += 1

    @property
    def exhausted(self) -> bool:
        return self.step_limit is not None and self.steps >= self.step_limit

    def epsilon(self) -> tuple[float, str]:
        return epsilon_spent(self.noise_multiplier, self.sample_rate, self.steps, self.config.delta)

    def ledger_entry(self, run_id: str | None) -> dict[str, Any]:
        """The `dp-sgd` ledger entry of the steps taken so far."""
        if self.steps == 0:
            raise PrivacyError("no DP-SGD step was taken; there is nothing to account")
        eps, accountant = self.epsilon()
        return DpSgd.entry(
            epsilon=eps, delta=self.config.delta, accountant=accountant, noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate, steps=self.steps, max_grad_norm=self.config.max_grad_norm,
            unit=self.unit, run_id=run_id, seeded=self.config.seed is not None,
        )

    def state(self) -> dict[str, Any]:
        """What a checkpoint must carry so a resumed run keeps counting (and uses the same mechanism)."""
        return {"dp_steps": self.steps, "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate}

    def load_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if (state["noise_multiplier"], state["sample_rate"]) != (self.noise_multiplier, self.sample_rate):
            raise PrivacyError(
                f"the checkpoint was trained with noise multiplier {state['noise_multiplier']} and sampling rate "
                f"{state['sample_rate']}, this run would use {self.noise_multiplier} and {self.sample_rate}"
            )
        self.steps = int(state["dp_steps"])


def noise_and_limit(config: DPConfig, steps: int) -> tuple[float, int | None]:
    """The noise multiplier (given, or calibrated so that `steps` steps reach the target ε) and the number of steps
    the target allows (None without one), from public parameters alone, so an unreachable target is refused
    before anything runs or is written. Cached: the run computes it again when it makes the optimizer private."""
    prior = tuple((float(z), float(q), int(t)) for z, q, t in config.prior)
    return _noise_and_limit(config.noise_multiplier, config.target_epsilon, config.delta, config.sample_rate, steps,
                            prior)


@functools.lru_cache(maxsize=32)
def _noise_and_limit(z: float | None, target: float | None, delta: float, q: float, steps: int,
                     prior: tuple[tuple[float, float, int], ...]) -> tuple[float, int | None]:
    if z is None:
        assert target is not None
        z = calibrate_noise(target, delta, q, steps, prior)
    limit = None if target is None else max_steps(z, q, delta, target, prior)
    if limit == 0:
        after = f" after {len(prior)} earlier release(s)" if prior else ""
        raise PrivacyError(f"even one step at noise multiplier {z} exceeds ε = {target}{after}")
    return z, limit


def secret_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator on `device`, seeded from the OS (secret) unless a test `seed` is given (then not secret)."""
    return torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))


def parameters_device(model: nn.Module) -> torch.device:
    """The one device of the model's trainable parameters: where DP noise must be drawn."""
    devices = {p.device for p in model.parameters() if p.requires_grad}
    if len(devices) != 1:
        raise PrivacyError(f"DP-SGD needs the trainable parameters on one device, found {sorted(map(str, devices))}")
    return devices.pop()


def require_dp_ready(model: nn.Module) -> None:
    """Refuse a model that DP-SGD cannot train, saying what to do."""
    from taskvec.models.dp_ready import dp_problems

    problems = dp_problems(model)
    if problems:
        raise PrivacyError(
            f"the base is not DP-ready ({'; '.join(problems)}); build the shared base with `dp_compatible` "
            "(taskvec init or build_base) and fine-tune from that base"
        )


def is_accumulating(optimizer: torch.optim.Optimizer) -> bool:
    """True when the optimizer's last `step` only accumulated the clipped gradients of a physical batch, the
    logical batch (one DP-SGD step) not yet complete."""
    return bool(getattr(optimizer, "_is_last_step_skipped", False))


class Chunk(NamedTuple):
    """One physical batch of a logical batch: the unit index (0..k-1) of each image, and whether the logical
    batch ends with it (the optimizer then adds the noise and steps)."""

    owner: torch.Tensor
    last: bool


class PatientPoissonSampler(Sampler[list[int]]):
    """Batches of whole units (patients, or images given `range(n)`): each unit enters a logical batch
    independently with probability q, and the logical batch is yielded as physical batches of at most
    `max_physical` images, whole units each (a unit with more images is a physical batch of its own; an empty
    logical batch is one empty physical batch).

    With `shard=(rank, world)` the sampler of one of several processes: it draws from every world-th
    unit only, yields the same number of (possibly empty) logical batches as every other rank, and the union of
    the ranks' batches is a Poisson sample of all units when each rank has a generator of its own.

    For every physical batch it yields, it queues a `Chunk`, which the optimizer pops in the same order to sum
    gradients per unit and to know when to step. DataLoader keeps batches in sampler order.
    """

    def __init__(self, patient_ids: Sequence[Hashable], sample_rate: float,
                 generator: torch.Generator | None = None, *, shard: tuple[int, int] = (0, 1),
                 max_physical: int | None = None) -> None:
        groups: dict[Hashable, list[int]] = {}
        for i, pid in enumerate(patient_ids):
            groups.setdefault(pid, []).append(i)
        rank, world = shard
        self.patients = list(groups.values())[rank::world]  # several processes: whole patients per rank
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch(sample_rate)
        self.max_physical = max_physical or len(patient_ids) or 1
        self.generator = generator
        self.queue: deque[Chunk] = deque()

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        self.queue.clear()  # batches of an abandoned iterator are never stepped on
        for _ in range(self.steps_per_epoch):
            picked = torch.rand(len(self.patients), generator=self.generator) < self.sample_rate
            chunks: list[tuple[list[int], list[int]]] = [([], [])]
            for p in (int(i) for i in picked.nonzero().flatten()):
                images = self.patients[p]
                if chunks[-1][0] and len(chunks[-1][0]) + len(images) > self.max_physical:
                    chunks.append(([], []))
                batch, owner = chunks[-1]
                owner += [owner[-1] + 1 if owner else 0] * len(images)
                batch += images
            for i, (batch, owner) in enumerate(chunks):
                self.queue.append(Chunk(torch.tensor(owner, dtype=torch.long), i == len(chunks) - 1))
                yield batch


class EmptyBatchSafe(nn.Module):
    """The model for the training loop: Poisson sampling can draw an empty batch, which many timm models
    cannot take. Such a step must still happen (a noise-only update; skipping it would reveal that the
    batch was empty), so the wrapper returns an empty output and flags it for the optimizer."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.empty = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.empty = x.shape[0] == 0
        if not self.empty:
            return self.net(x)  # type: ignore[no-any-return]
        with torch.no_grad():
            shape = self.net(x.new_zeros((1, *x.shape[1:]))).shape[1:]
        return torch.zeros((0, *shape), device=x.device, requires_grad=True)


def _optimizer_class(distributed: bool = False) -> type:
    from opacus.optimizers import DistributedDPOptimizer, DPOptimizer

    class TaskvecDPOptimizer(DistributedDPOptimizer if distributed else DPOptimizer):  # type: ignore[misc]
        """DPOptimizer that takes noise-only steps on empty batches and, given `chunks` (the unit index of each
        image of each physical batch, in order), clips the sum of each unit's per-image gradients and steps at
        the last physical batch of each logical one. `distributed`:
        Opacus's DistributedDPOptimizer, which adds the noise on rank 0 only and averages over the ranks."""

        def __init__(self, *args: Any, model: EmptyBatchSafe, chunks: deque[Chunk] | None = None,
                     augmult: int = 1, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.model, self.chunks, self.augmult = model, chunks, augmult

        def pre_step(self, closure: Any = None) -> bool | None:
            owner = None
            if self.chunks is not None:  # the unit sampler's physical batches: sum per unit, step on the last
                owner, last = self.chunks.popleft()
                self.signal_skip_step(do_skip=not last)
            k = self.augmult
            if self.model.empty:
                for p in self.params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            elif owner is not None or k > 1:  # rows = the K augmented copies of each image, image after image
                for p in self.params:
                    gs = self._get_flat_grad_sample(p)
                    rows = (owner if owner is not None else torch.arange(gs.shape[0] // k)).repeat_interleave(k)
                    if gs.shape[0] != len(rows):
                        raise RuntimeError("per-unit clipping lost track of the batch (one step per batch)")
                    p.grad_sample = torch.zeros((int(rows.max()) + 1, *gs.shape[1:]), dtype=gs.dtype,
                                                device=gs.device).index_add_(0, rows.to(gs.device), gs) / k
            return super().pre_step(closure)  # type: ignore[no-any-return]

    return TaskvecDPOptimizer


def _patient_loader(loader: DataLoader, sampler: PatientPoissonSampler) -> DataLoader:
    from opacus.data_loader import wrap_collate_with_empty
    from torch.utils.data._utils.collate import default_collate

    sample = loader.dataset[0]
    return DataLoader(
        loader.dataset,
        batch_sampler=sampler,
        collate_fn=wrap_collate_with_empty(
            collate_fn=loader.collate_fn or default_collate,
            sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in sample],
            dtypes=[getattr(x, "dtype", type(x)) for x in sample],
        ),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    config: DPConfig,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    patient_ids: Sequence[Hashable] | None = None,
    shard: tuple[int, int] = (0, 1),
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader, PrivacyMeter]:
    """Turn a non-private (model, optimizer, loader) into DP-SGD ones and a meter of the privacy spent.

    Units (images, or patients given `patient_ids`) are sampled at `config.sample_rate`; the loader's batch size
    is not used (nor anything else about the data's size). A target ε is reached after the planned `steps` (or
    `epochs` of ⌊1/q⌋ steps). The
    model must be DP-ready (`taskvec init --dp-compatible`) and on its training device. Sampling and noise draw
    from generators seeded from the OS (secret), unless `config.seed` is set for tests: reproducible noise is
    not secret.

    `shard=(rank, world)`: one of `world` processes (torch.distributed initialised). `loader` is the same
    global loader on every rank, so the sample rate and steps are those of one process; units are kept
    whole per rank, each rank samples its own, and noise is added on rank 0 only (Opacus's
    DistributedDPOptimizer). Ranks must seed `config.seed` differently (or leave it unset).
    """
    if (epochs is None) == (steps is None):
        raise TaskvecError("make_private needs the planned epochs or steps (one of them)")
    from opacus.data_loader import DPDataLoader
    from opacus.grad_sample import GradSampleHooks

    config.check()
    require_dp_ready(model)
    n_images = len(loader.dataset)  # type: ignore[arg-type]
    # Two secret generators: the sampler draws on the CPU, the noise on the parameters' device (a CPU
    # generator cannot draw CUDA noise). A test seed makes both reproducible, and public.
    sampler_gen = secret_generator("cpu", config.seed)
    noise_gen = secret_generator(parameters_device(model), None if config.seed is None else config.seed + 1)
    q = config.sample_rate
    sampler = None
    if patient_ids is not None and len(patient_ids) != n_images:
        raise PrivacyError(f"{len(patient_ids)} patient ids for {n_images} images")
    unit = "patient" if patient_ids is not None else "image"
    if patient_ids is not None or shard[1] > 1:  # whole units; ranks in step (Opacus's drops empty batches)
        sampler = PatientPoissonSampler(patient_ids if patient_ids is not None else range(n_images), q, sampler_gen,
                                        shard=shard, max_physical=config.max_physical_batch)
        private_loader = _patient_loader(loader, sampler)
    else:
        from opacus.data_loader import DPDataLoader

        private_loader = DPDataLoader(loader.dataset, sample_rate=q, generator=sampler_gen,
                                      collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                                      pin_memory=loader.pin_memory)
    per_epoch = len(private_loader)
    z, limit = noise_and_limit(config, steps or epochs * per_epoch)  # type: ignore[operator]

    mode = config.grad_sample_mode
    for m in model.modules():  # fused attention has no vmap rule: per-sample gradients ran ~1.8x slower
        if getattr(m, "fused_attn", False):
            setattr(m, "fused_attn", False)  # noqa: B010 - an attribute nn.Module does not declare
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # Opacus's hooks, images need no grad
    # strict=False: Opacus refuses every trainable layer with buffers; require_dp_ready has already refused
    # BatchNorm, and the only buffers left are frozen BatchNorm statistics of the (public) base
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch",
                            strict=False)
    # the noisy sum (a constant "expected batch": q·n would make the update depend on the data's size), summed
    # over the ranks (Opacus's distributed optimizer averages them)
    kwargs = {"noise_multiplier": z, "max_grad_norm": config.max_grad_norm, "expected_batch_size": 1 / shard[1],
              "generator": noise_gen}
    safe = EmptyBatchSafe(model)
    dp_optimizer = _optimizer_class(shard[1] > 1)(optimizer, model=safe, chunks=sampler and sampler.queue,
                                                  augmult=config.augmult, **kwargs)
    meter = PrivacyMeter(config, unit, q, z, limit, mode, per_epoch, hooks=hooks)
    dp_optimizer.attach_step_hook(meter.on_step)
    if sampler is None:  # Opacus's BatchMemoryManager: physical batches of a logical one
        from opacus.utils.batch_memory_manager import BatchMemoryManager

        manager = BatchMemoryManager(data_loader=private_loader, max_physical_batch_size=config.max_physical_batch,
                                     optimizer=dp_optimizer)
        private_loader = manager.__enter__()  # a wrapped loader; the manager's exit does nothing
    return safe, dp_optimizer, private_loader, meter

