"""What a training mode declares, the registry of modes, and what a run's vector carries.

Torch-free at import (the CLI builds its help from these declarations): a mode imports torch, peft or its own
helpers inside the methods that touch a network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from taskvec.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    import numpy as np
    import torch
    from torch import nn

    from taskvec.models.spec import ModelSpec
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.progress import Track
    from taskvec.training.data import ImageDataset

MODES: dict[str, type[TrainMode]] = {}  # by name
M = TypeVar("M", bound="type[TrainMode]")


def register(cls: M) -> M:
    """Class decorator: make a mode known to `parse_mode`, the loop, export and the CLI."""
    MODES[cls.name] = cls
    return cls


@dataclass(frozen=True)
class TrainMode:
    """A training mode: the class attributes declare it, the methods apply it to a network. Every mode takes
    `dp`: DP-SGD for modes that take gradient steps, its own release (in `fit`) for one that fits in one pass."""

    name: ClassVar[str]
    lr: ClassVar[float]  # default peak learning rate (AdamW; DP-SGD uses the same)
    help: ClassVar[str] = ""  # what `--train`'s help says of it after its name
    arg: ClassVar[str] = ""  # the count it takes after a colon (`last:K`), "" for none
    carries_all: ClassVar[bool] = False  # its vector holds every floating tensor, not only the trained ones
    trains_features: ClassVar[bool] = True  # False: the head alone, so head strategies that need features fail
    segmentation: ClassVar[bool] = True
    multi_process: ClassVar[bool] = True
    fits_in_one_pass: ClassVar[bool] = False  # no gradient step: nothing to schedule, average or run DP-SGD on
    pass_name: ClassVar[str] = ""  # what its one pass computes, as progress reports say
    pass_batch: ClassVar[int] = 0  # the batch that paces its one pass (0: the gradient modes' default)
    refuses: ClassVar[tuple[str, ...]] = ()  # FinetuneConfig fields that must keep their default
    refusal: ClassVar[str] = ""  # why, in a few words
    default_for: ClassVar[str] = ""  # "pretrained" | "scratch": the default for bases with / without trained weights

    k: int = 0  # the count of `arg`

    def __str__(self) -> str:
        return f"{self.name}:{self.k}" if self.arg else self.name

    @classmethod
    def usage(cls) -> str:
        """How `--train` spells the mode: `name`, or `name:ARG`."""
        return f"{cls.name}:{cls.arg}" if cls.arg else cls.name

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        """Names of the parameters the mode trains (for adapters, the base's parameters trained besides them)."""
        raise NotImplementedError

    def prepare(self, net: nn.Module, task: str, keep_head: bool = False) -> tuple[nn.Module, VectorLayout]:
        """Freeze what the mode does not train (and the head with `keep_head`). Returns the module to train and
        what its vector will carry."""
        train = set(self.trainable_names(net, task))
        if keep_head:
            train = {n for n in train if not n.startswith(head_prefixes(net, task))}
        for n, p in net.named_parameters():
            p.requires_grad_(n in train)
        return net, VectorLayout(str(self), sorted(train))

    def finish(self, net: nn.Module) -> nn.Module:
        """The trained module back in the base's layout (the model file's)."""
        return net

    def prox_anchor(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        """What the proximal step pulls trained parameter `name` toward (`taskvec.training.mergeable`): its
        base value; None: no pull."""
        return p.detach().clone()

    def encode(self, key: str, delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
        """The tensors that carry the delta of a key the layout factors at `rank`."""
        raise NotImplementedError(f"train {self} factors no delta")

    def check(self, head: str, dp: DPConfig | None) -> None:
        """Refuse a head strategy or DP settings the mode cannot take (after `refuses` is checked)."""
        if not self.trains_features and head in ("frozen", "lp-ft"):
            raise ConfigError(f"head {head} needs features to train, but `train` {self} trains the head alone",
                              field="head", got=head)

    def fit(self, net: nn.Module, spec: ModelSpec, data: ImageDataset, *, device: torch.device, batch_size: int,
            dp: DPConfig | None, run_id: str, track: Track[Any], run_dir: Path) -> list[dict[str, Any]]:
        """A one-pass mode's fit of `net` on `data`, in place (files of its own go in `run_dir`); returns its
        ledger entries."""
        raise NotImplementedError(f"train {self} takes gradient steps")

    def release(self, model: Path, run_id: str | None, parent: str | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """What the vector of the run that wrote `model` carries instead of weight deltas: its tensors and the
        header's `sufficient` record; None: the deltas."""
        return None


class OnePassHead(TrainMode):
    """A classifier set in closed form from one pass over the frozen base's features, no gradient step
    (classification only, one process); under DP its one release (of its `pass_name`) is a `gaussian-sum`, not
    DP-SGD. Subclasses set the name, help and pass name and implement `fit`."""

    lr = 0.0
    trains_features = False
    segmentation = False
    multi_process = False
    fits_in_one_pass = True
    pass_batch = 64  # a batch derived from the data's size would reveal it
    refuses = ("epochs", "steps", "lr", "ema", "prox", "head")
    refusal = "one pass over the data, no gradient step"

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        return head_names(net, task)

    def check(self, head: str, dp: DPConfig | None) -> None:
        from taskvec.privacy.mechanisms.gaussian_sum import release_noise

        super().check(head, dp)
        if dp is not None and dp.target_epsilon and (dp.noise_multiplier or dp.prior):
            release_noise(dp, self.pass_name)  # refuses a multiplier, or earlier releases, over the target


def registered() -> list[type[TrainMode]]:
    """Every registered mode, by name."""
    return [MODES[name] for name in sorted(MODES)]


def default_mode(pretrained: bool) -> str:
    """The mode a run trains unless told: the one declared the default for a base that starts from pretrained
    weights (`pretrained`), or for one without."""
    kind = "pretrained" if pretrained else "scratch"
    return next(m.name for m in registered() if m.default_for == kind)


def parse_mode(text: str) -> TrainMode:
    """A registered mode from its spelling: `name`, or `name:N` (N ≥ 1) for a mode that takes a count."""
    name, _, arg = text.strip().partition(":")
    cls = MODES.get(name)
    if cls is not None and not cls.arg and not arg:
        return cls()
    if cls is not None and cls.arg and arg.isdigit() and int(arg) >= 1:
        return cls(int(arg))
    counts = ", ".join(m.arg for m in registered() if m.arg)
    raise ConfigError(f"train must be one of {', '.join(m.usage() for m in registered())} ({counts} >= 1), "
                      f"got {text!r}", field="train", got=text)


@dataclass(frozen=True)
class VectorLayout:
    """What a run's vector carries, recorded in its model file (`training.train`): the deltas of `trained`
    (every floating tensor's when the mode `carries_all`) and those of `factored`, encoded by the mode at the
    given rank."""

    mode: str
    trained: list[str] = field(default_factory=list)
    factored: dict[str, int] = field(default_factory=dict)

    @property
    def subset(self) -> bool:
        return not parse_mode(self.mode).carries_all

    def carries(self, key: str) -> bool:
        return not self.subset or key in self.trained or key in self.factored

    def encode(self, key: str, delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The vector's tensors for `key`'s delta: itself, or the mode's factors of it."""
        if key in self.factored:
            return parse_mode(self.mode).encode(key, delta, self.factored[key])
        return {key: delta}

    def to_record(self) -> dict[str, Any]:
        return {"mode": self.mode, "trained": self.trained, "lora": self.factored}  # "lora": the format's name

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> VectorLayout:
        """The layout a model file records (one without a record trained everything)."""
        if not record:
            return cls(next(m.name for m in registered() if m.carries_all))
        return cls(record["mode"], list(record["trained"]), dict(record["lora"]))


def head_prefixes(net: nn.Module, task: str) -> tuple[str, ...]:
    """Parameter-name prefixes of the head: timm's classifier, or smp's decoder and segmentation head."""
    if task == "segmentation":
        return ("decoder.", "segmentation_head.")
    name = getattr(net, "pretrained_cfg", {}).get("classifier", "head")
    names = name if isinstance(name, (list, tuple)) else [name]
    return tuple(f"{n}." for n in names)


def head_names(net: nn.Module, task: str) -> list[str]:
    """Names of the head's parameters."""
    head = head_prefixes(net, task)
    return [n for n, _ in net.named_parameters() if n.startswith(head)]
