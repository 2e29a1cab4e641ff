"""`FinetuneConfig`: the settings of a fine-tuning run and their checks. Torch-free at import (the CLI reads
its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from taskvec.errors import ConfigError, PrivacyConfigError, TaskvecError, check_range, check_seed
from taskvec.io.schema import check_contributor
from taskvec.training.modes import TrainMode, default_mode, parse_mode

if TYPE_CHECKING:
    from taskvec.privacy.dpsgd import DPConfig

DEVICES = ("auto", "cpu", "cuda", "mps")  # `cuda:N` names one GPU
DEFAULT_DEVICE = "auto"  # CUDA when torch sees a GPU, else the CPU
DEVICE_HELP = "auto (CUDA when torch sees a GPU, else the CPU) | cpu | cuda (or cuda:N) | mps (Apple GPUs)."
DP_EMA = 0.99  # DP-SGD recipe default: EMA decay of the weights
RUNTIME_FIELDS = {"resume", "device", "num_workers", "image_cache"}  # may differ between a run and its resumption


def check_device(device: str) -> str:
    """`device` if it is one of `DEVICES` or `cuda:N`, else a ConfigError (whether it is there: `resolve_device`)."""
    name, _, index = device.partition(":")
    if device in DEVICES or (name == "cuda" and index.isdigit()):
        return device
    raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}", field="device",
                      expected=list(DEVICES), got=device)


HEADS = {  # what a classification run does with its classifier (taskvec.training.mergeable), for label skew
    "train": "train it with the rest",
    "frozen": "keep the base's head, learn features",
    "balanced": "class-weighted loss; not with DP-SGD",
    "lp-ft": "the head alone for the first half, then all",
}


def check_head(head: str, *, dp: bool) -> None:
    """Refuse an unknown head strategy, and `balanced` with DP-SGD (its weights are private label counts)."""
    if head not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {head!r}", field="head", expected=list(HEADS),
                          got=head)
    if head == "balanced" and dp:
        raise PrivacyConfigError(
            "head balanced weights the loss by the site's label counts, which DP-SGD does not protect (one image "
            "more or less changes every example's weight); with `dp` use head train, frozen or lp-ft",
            field="head", got=head)


@dataclass
class FinetuneConfig:
    """Training settings; every field except `RUNTIME_FIELDS` must match when a run is resumed."""

    epochs: int | None = None  # default: schedule.DEFAULT_EPOCHS, at least MIN_STEPS steps, unless `steps` is given
    steps: int | None = None
    batch_size: int | None = None  # default: schedule.default_batch of the training-set size (DP-SGD: sample_rate)
    lr: float | None = None  # default: the training mode's (taskvec.training.modes)
    train: str | None = None  # a training mode (taskvec.training.modes); None: the base's default (`for_base`)
    ema: float | None = None  # EMA decay (0: off; default DP_EMA with DP), warmed up as min(ema, (1+t)/(10+t))
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    img_size: int | None = None  # default: the base's
    device: str = DEFAULT_DEVICE
    seed: int = 0
    resume: bool = False
    val_fraction: float = 0.1
    contributor: str | None = None
    augment: bool = True
    num_workers: int | None = None  # default: 8 on GPU, 0 on CPU
    image_cache: str = "auto"  # decoded images on disk: auto | off | a folder (taskvec.training.data.cache)
    dp: DPConfig | None = None  # train with DP (DP-SGD, or the one-pass mode's own release)
    prox: float = 0.0  # μ of the proximal pull toward the base (taskvec.training.mergeable; 0: off)
    head: str = "train"  # one of HEADS (taskvec.training.mergeable)

    def check(self) -> None:
        check_device(self.device)
        check_seed(self.seed)
        if self.contributor is not None:
            check_contributor(self.contributor, error=ConfigError)
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("epochs and `steps` exclude each other: give one", field="epochs")
        for name in ("epochs", "steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1, got {v}", field=name, expected=">= 1", got=v)
        if self.lr is not None:
            check_range("lr", self.lr, low=0)
        check_range("weight_decay", self.weight_decay, low=0, low_open=False)
        check_range("warmup", self.warmup, low=0, high=1, low_open=False, high_open=False)
        if self.img_size is not None:
            from taskvec.models.spec import MAX_IMG_SIZE

            check_range("img_size", self.img_size, low=1, high=MAX_IMG_SIZE, low_open=False, high_open=False)
        if self.num_workers is not None:
            check_range("num_workers", self.num_workers, low=0, high=1024, low_open=False, high_open=False)
        if self.ema is not None:
            check_range("ema", self.ema, low=0, high=1, low_open=False)
        check_range("prox", self.prox, low=0, low_open=False)
        check_head(self.head, dp=self.dp is not None)
        check_range("val_fraction", self.val_fraction, low=0, high=1, low_open=False)
        if self.dp is not None:
            self.dp.check()
        # unset, the mode is a default one: gradient steps, nothing refused (checked again once `for_base` sets it)
        mode = self.mode if self.train is not None else None
        if mode is not None:
            self._check_refused(mode)
            mode.check(self.head, self.dp)
        if self.dp is not None and self.batch_size is not None and not (mode and mode.fits_in_one_pass):
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

    def for_base(self, pretrained: bool) -> FinetuneConfig:
        """These settings for a base that starts from pretrained weights or not: `train` set to that base's
        default mode when it is unset."""
        return self if self.train is not None else replace(self, train=default_mode(pretrained))

    @property
    def mode(self) -> TrainMode:
        if self.train is None:
            raise TaskvecError("the training mode is unset until `for_base` chooses the base's default")
        return parse_mode(self.train)
