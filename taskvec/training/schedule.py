"""The step schedule of a run: batch size, number of optimiser steps, learning rate per step, seeds per epoch.

Small data: the schedule counts optimiser steps (DEFAULT_EPOCHS but at least MIN_STEPS), the batch stays well
below the training-set size, and a run too short to learn is warned about. DP-SGD: a public number of steps
(DP_STEPS unless given), so no count depends on the data's size. Torch-free at import (the CLI reads the
constants).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from taskvec.training.config import FinetuneConfig

DEFAULT_EPOCHS = 10
MIN_STEPS = 200  # the default schedule makes at least this many optimiser steps, however small the data
MIN_DP_STEPS = 50  # DP-SGD runs shorter than this are warned about
DP_STEPS = 100  # DP-SGD's default: a constant (a count from the data's size would reveal it), 25 epochs at q = 0.25
BATCH_SHARE, MIN_BATCH, MAX_BATCH = 8, 4, 32  # the default batch: n/8 within [4, 32]


def default_batch(n_train: int) -> int:
    """A batch well below the training-set size (without DP): n/BATCH_SHARE within [MIN_BATCH, MAX_BATCH]."""
    return min(MAX_BATCH, max(MIN_BATCH, n_train // BATCH_SHARE))


def plan_steps(config: FinetuneConfig, per_epoch: int | None = None) -> tuple[int, list[str]]:
    """Optimiser steps of the run (explicit `steps`, explicit `epochs`, or by default DEFAULT_EPOCHS but at
    least MIN_STEPS; DP_STEPS with DP-SGD) and a warning when that is too few to learn. An epoch is
    `per_epoch` steps (the loader's batches) without DP; under DP-SGD it is ⌊1/q⌋, so no count depends on the
    data's size."""
    from taskvec.privacy import steps_per_epoch

    if config.dp is not None:
        per_epoch = steps_per_epoch(config.dp.sample_rate)
    assert per_epoch is not None, "per_epoch: the loader's batches, needed without DP"
    least = MIN_STEPS if config.dp is None else MIN_DP_STEPS
    if config.steps:
        total = config.steps
    elif config.epochs:
        total = config.epochs * per_epoch
    else:
        total = DP_STEPS if config.dp is not None else max(least, DEFAULT_EPOCHS * per_epoch)
    warn = [] if total >= least else [
        f"only {total} optimiser steps: runs this short rarely move a pretrained network; give `steps` >= {least}"]
    return total, warn


def schedule(n_train: int, config: FinetuneConfig) -> tuple[float, int]:
    """(expected batch size, optimiser steps) of a run of `config` on `n_train` training images (the batch
    drops a ragged last batch when the data holds more than one; DP-SGD: Poisson batches at rate q)."""
    if config.dp is not None:
        return config.dp.sample_rate * n_train, plan_steps(config)[0]
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
