"""The DP-SGD seam: `prepare_training` is the one place where the model, optimizer and loader can be swapped
for private versions (identity without DP), and for their shares in a run over several processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from taskvec.privacy.dpsgd import make_private
from taskvec.training.config import FinetuneConfig
from taskvec.training.distributed import Group, rank_seed, shard_loader, wrap_model


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
