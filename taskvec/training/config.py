"""`FinetuneConfig`: the settings of a fine-tuning run and their checks. Torch-free at import (the CLI reads
its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from taskvec.errors import ConfigError, check_range
from taskvec.training.modes import TrainMode, parse_mode

if TYPE_CHECKING:
    from taskvec.privacy.dpsgd import DPConfig

DP_EMA = 0.99  # DP-SGD recipe default: EMA decay of the weights
RUNTIME_FIELDS = {"resume", "device", "num_workers"}  # may differ between a run and its resumption


@dataclass
class FinetuneConfig:
    """Training settings; every field except `RUNTIME_FIELDS` must match when a run is resumed."""

    epochs: int | None = None  # default: schedule.DEFAULT_EPOCHS, at least MIN_STEPS steps, unless `steps` is given
    steps: int | None = None
    batch_size: int | None = None  # default: schedule.default_batch of the training-set size (DP-SGD: sample_rate)
    lr: float | None = None  # default: the training mode's (taskvec.training.modes)
    train: str = "all"  # a training mode (taskvec.training.modes)
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
    dp: DPConfig | None = None  # train with DP (DP-SGD, or the one-pass mode's own release)
    prox: float = 0.0  # μ of the proximal pull toward the base (taskvec.training.mergeable; 0: off)
    head: str = "train"  # train | frozen | balanced | lp-ft (taskvec.training.mergeable)

    def check(self) -> None:
        from taskvec.training.mergeable import check_head

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
        mode = self.mode
        check_range("prox", self.prox, low=0, low_open=False)
        check_head(self.head, dp=self.dp is not None)
        check_range("val_fraction", self.val_fraction, low=0, high=1, low_open=False)
        if self.dp is not None:
            self.dp.check()
        self._check_refused(mode)
        mode.check(self.head, self.dp)
        if self.dp is not None and self.batch_size is not None and not mode.fits_in_one_pass:
            raise ConfigError("batch_size does not apply to DP-SGD: each unit joins a step's batch with probability "
                              "`sample_rate` (a batch size would reveal the data's size); leave it out",
                              field="batch_size", got=self.batch_size)

    def _check_refused(self, mode: TrainMode) -> None:
        """Refuse a field the mode refuses, set to other than its default."""
        defaults = {f.name: f.default for f in fields(self)}
        given = [name for name in mode.refuses if getattr(self, name) != defaults[name]]
        if given:
            raise ConfigError(f"{given[0]} does not apply to `train` {mode} ({mode.refusal}): leave it out",
                              field=given[0], got=getattr(self, given[0]))

    @property
    def mode(self) -> TrainMode:
        return parse_mode(self.train)
