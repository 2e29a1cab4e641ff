"""Several processes, one site: `taskvec finetune` under `torchrun` (or any launcher that sets
torch.distributed's variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, such as
`accelerate launch`). Without them every function here is the identity: one process, rank 0 of 1.

- Process group: gloo on CPU, NCCL on GPUs; each process takes the GPU of its LOCAL_RANK.
- Without DP: DistributedDataParallel, and `batch_size` stays the global batch (each rank takes
  `batch_size / world` images). The shard sampler draws the single-process permutation from the loop's own
  seeded generator and gives rank r every world-th image of it, so the global batch k is the same set of
  images as batch k of a one-process run, and the augmentation of each image is the same
  (`augment_bits`): the runs differ only by floating-point reduction order.
- With DP-SGD: Opacus's DPDDP and DistributedDPOptimizer (noise added once, on rank 0, to the sum of
  clipped per-unit gradients) with units (patients or images) kept whole per rank and Poisson-sampled by
  each rank from a generator of its own (`taskvec.privacy.dpsgd.make_private(shard=...)`).
- Files and output: rank 0 alone writes the run folder, checkpoints and the model and reports progress;
  every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from taskvec.errors import ConfigError, TaskvecError

T = TypeVar("T")


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 without a launcher); reads the environment only."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


@dataclass(frozen=True)
class Group:
    """Where this process stands: rank `rank` of `world` processes, on `device`."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only and give its result (or its error) to every rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except Exception as e:  # every failure: the other ranks must not wait for rank 0
                box[0] = ("error", str(e) if isinstance(e, TaskvecError) else f"{type(e).__name__}: {e}")
                dist.broadcast_object_list(box, src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise TaskvecError(f"rank 0 stopped: {value}")
        return value  # type: ignore[no-any-return]

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        return self.sum(value) / self.world

    def sum(self, value: float) -> float:
        """The sum of `value` over the ranks."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _device(device: torch.device, local_rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(f"device {device} names one GPU; under a launcher give cuda or auto (each process "
                          "takes the GPU of its LOCAL_RANK)", field="device", got=str(device))
    if local_rank >= torch.cuda.device_count():
        raise TaskvecError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                           "start at most one process per GPU")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


@contextmanager
def process_group(device: torch.device) -> Iterator[Group]:
    """Join the launcher's process group for the duration (and leave it after, if this call joined it), or
    a group of one without a launcher. `device` is the resolved device (cpu or cuda)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Group(device=device)
        return
    import torch.distributed as dist

    device = _device(device, int(os.environ.get("LOCAL_RANK", "0")))
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    try:
        yield Group(dist.get_rank(), dist.get_world_size(), device)
        if joined:  # every rank done before any closes its connections (gloo aborts a rank whose peer left)
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


class ShardSampler(DistributedSampler):  # type: ignore[type-arg]
    """torch's DistributedSampler with its permutation drawn from `generator` (the loop reseeds it every
    epoch), the same permutation a one-process RandomSampler with that generator draws; the tail that does
    not divide among the ranks is dropped, as the one-process loader drops its incomplete batch."""

    def __init__(self, dataset: Any, generator: torch.Generator, group: Group) -> None:
        super().__init__(dataset, num_replicas=group.world, rank=group.rank, shuffle=True, drop_last=True)
        self.generator = generator

    def __iter__(self) -> Iterator[int]:  # lazy, as RandomSampler: the DataLoader draws its base seed first
        order = torch.randperm(len(self.dataset), generator=self.generator).tolist()  # type: ignore[arg-type]
        yield from order[self.rank:self.total_size:self.num_replicas]


def shard_loader(loader: DataLoader, group: Group) -> DataLoader:  # type: ignore[type-arg]
    """This rank's share of a shuffling loader whose `batch_size` is the global batch."""
    batch = loader.batch_size or 1
    if batch % group.world:
        raise ConfigError(f"batch_size must be a multiple of the number of processes ({group.world}), got {batch}",
                          field="batch_size", got=batch)
    if len(loader.dataset) < group.world:  # type: ignore[arg-type]
        raise TaskvecError(f"{len(loader.dataset)} training images for {group.world} processes")  # type: ignore[arg-type]
    assert loader.generator is not None, "the loop's loader shuffles with a seeded generator"
    return DataLoader(
        loader.dataset, batch_size=batch // group.world, sampler=ShardSampler(loader.dataset, loader.generator, group),
        generator=loader.generator, drop_last=loader.drop_last, num_workers=loader.num_workers,
        pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers,
    )


def augment_bits(shape: tuple[int, int], generator: torch.Generator, group: Group) -> torch.Tensor:
    """Random bits for this rank's share of a batch: the global draw's columns rank, rank + world, ...,
    which are the bits a one-process run gives the same images."""
    rows, cols = shape
    return torch.randint(0, 2, (rows, cols * group.world), generator=generator)[:, group.rank::group.world]


def wrap_model(model: nn.Module, group: Group, *, private: bool) -> nn.Module:
    """DistributedDataParallel, or Opacus's DPDDP under DP-SGD (its DistributedDPOptimizer averages the
    noised gradients); the model itself with one process. Both broadcast rank 0's weights first."""
    if group.world == 1:
        return model
    if private:
        from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP

        return DPDDP(model)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[group.device.index] if group.device.type == "cuda" else None)


def rank_seed(seed: int | None, group: Group) -> int | None:
    """A seed of this rank's own (rank 0 keeps `seed`): Poisson sampling must be independent across ranks."""
    if seed is None or group.rank == 0:
        return seed
    return int(np.random.SeedSequence([seed, group.rank]).generate_state(1, dtype=np.uint64)[0] >> 1)
