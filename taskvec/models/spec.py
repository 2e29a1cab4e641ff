"""Model files: build a timm model from a self-describing spec, save it with its identity, load it back.

A model file is safetensors holding the full state_dict, plus metadata (`kind: model`) with the spec
needed to rebuild the exact `nn.Module` and a content identity (sha256 over its tensors). Classification
files are plain timm state_dicts, so timm and torch load them as they are; segmentation files are
segmentation-models-pytorch state_dicts (`taskvec.models.segmentation`).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from taskvec.errors import ConfigError, FileFormatError, check_seed, first_line
from taskvec.io.files import now, read_header, read_kind
from taskvec.io.schema import ModelHeader
from taskvec.io.tensors import save_tensors, state_digest

TASKS = ("classification", "segmentation")
# What a model file's header may ask of timm when a model is rebuilt from it: keyword arguments that shape
# the architecture, never ones that load files (`checkpoint_path`, `pretrained_cfg_overlay`) or reach a network.
MODEL_KWARGS = {"img_size": int, "drop_rate": float, "drop_path_rate": float}
MAX_IMG_SIZE = 4096
MAX_CLASSES = 100_000
MAX_CHANNELS = 64
HUB_PROBE_SECONDS = 5.0  # one request tells whether the Hub answers before timm downloads


@dataclass
class ModelSpec:
    """Everything needed to rebuild a taskvec model: the timm architecture and its keyword arguments."""

    arch: str
    task: str
    num_classes: int
    in_chans: int = 3
    img_size: int = 224
    labels: list[str] = field(default_factory=list)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    decoder: dict[str, Any] | None = None  # segmentation: the smp decoder (taskvec.models.segmentation)
    dp_compatible: dict[str, Any] | None = None  # DP-ready conversion (taskvec.models.dp_ready), redone on load

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """A spec from a file's header, checked: a header is untrusted input that must not choose code to run,
        files to load or hosts to contact (see `check_spec`)."""
        if not isinstance(d, dict):
            raise FileFormatError("corrupt model spec (not an object)", field="model")
        try:
            spec = cls(**d)
        except TypeError:
            unknown = sorted(set(d) - set(cls.__dataclass_fields__))
            raise FileFormatError(f"corrupt model spec (unknown or missing fields {unknown})", field="model") from None
        check_spec(spec)
        return spec


def _bad(field: str, value: Any, why: str) -> FileFormatError:
    return FileFormatError(f"model spec: {field} {value!r} {why}", field=field, got=value)


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_spec(spec: ModelSpec) -> None:
    """Refuse a spec that is not an architecture timm registers locally with bounded sizes and allowlisted
    keyword arguments: no `hf-hub:`/`timm/` names (a network fetch), no `checkpoint_path` (timm would
    `torch.load` it, a pickle), no image size that would make one input gigabytes."""
    import re

    if not isinstance(spec.arch, str) or not re.fullmatch(r"[a-z0-9_]+(\.[a-z0-9_]+)?", spec.arch):
        raise _bad("arch", spec.arch, "is not a local timm architecture name (no hf-hub:, no paths)")
    if spec.task not in TASKS:
        raise _bad("task", spec.task, f"is not one of {', '.join(TASKS)}")
    if not _int_in(spec.num_classes, 1, MAX_CLASSES):
        raise _bad("num_classes", spec.num_classes, f"is not a whole number in 1..{MAX_CLASSES}")
    if not _int_in(spec.in_chans, 1, MAX_CHANNELS):
        raise _bad("in_chans", spec.in_chans, f"is not a whole number in 1..{MAX_CHANNELS}")
    if not _int_in(spec.img_size, 1, MAX_IMG_SIZE):
        raise _bad("img_size", spec.img_size, f"is not a whole number in 1..{MAX_IMG_SIZE}")
    if not (isinstance(spec.labels, list) and len(spec.labels) == spec.num_classes
            and all(isinstance(x, str) for x in spec.labels)):
        raise _bad("labels", spec.labels, f"is not a list of {spec.num_classes} names")
    if not isinstance(spec.model_kwargs, dict):
        raise _bad("model_kwargs", spec.model_kwargs, "is not an object")
    for k, v in spec.model_kwargs.items():
        kind = MODEL_KWARGS.get(k)
        ok = kind is not None and isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = ok and (_int_in(v, 1, MAX_IMG_SIZE) if kind is int else ok and 0 <= v < 1)
        if not ok:
            raise _bad(f"model_kwargs.{k}", v, f"is not allowed (allowed: {', '.join(MODEL_KWARGS)}, in range)")
    _check_decoder(spec.decoder)
    if spec.dp_compatible is not None:
        from taskvec.models.dp_ready import NORMS

        dp = spec.dp_compatible
        if not (isinstance(dp, dict) and set(dp) <= {"norm", "max_groups"} and dp.get("norm", "groupnorm") in NORMS
                and _int_in(dp.get("max_groups", 32), 1, 1024)):
            raise _bad("dp_compatible", dp, "is not a DP-ready conversion taskvec makes")


def _small(value: Any) -> bool:
    """JSON made of strings, booleans and numbers up to `MAX_IMG_SIZE` (a layer width, never gigabytes)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _small(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_small(v) for v in value)
    return value is None or isinstance(value, (str, bool)) or (isinstance(value, (int, float))
                                                                and abs(value) <= MAX_IMG_SIZE)


def _check_decoder(decoder: Any) -> None:
    """A segmentation decoder record: smp, a known architecture, and only the keyword arguments taskvec sets."""
    if decoder is None:
        return
    from taskvec.models.segmentation import DECODERS, DEFAULT_KWARGS

    if not isinstance(decoder, dict) or decoder.get("library") != "smp":
        return  # a former decoder: `build_segmentation` refuses it with how to rebuild the base
    arch, kwargs = decoder.get("arch"), decoder.get("kwargs", {})
    if arch not in DECODERS or not isinstance(kwargs, dict) or not set(kwargs) <= set(DEFAULT_KWARGS[arch]) \
            or set(decoder) - {"library", "arch", "kwargs"} or not _small(kwargs):
        raise _bad("decoder", decoder, f"is not allowed (smp {', '.join(DECODERS)} with taskvec's own settings)")


def _timm_create(arch: str, spec_kwargs: dict[str, Any], pretrained: bool, weights: str | None) -> nn.Module:
    import timm

    kwargs = dict(spec_kwargs)
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    return timm.create_model(arch, pretrained=pretrained or weights is not None, **kwargs)


@contextlib.contextmanager
def _hub_download(arch: str) -> Iterator[None]:
    """Around a download of timm's pretrained weights of `arch`: when one request shows the Hub unreachable,
    huggingface_hub reads its cache only (instead of retrying for about a minute), and weights not cached
    are a one-line error that points to `--weights FILE`."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        reason = str(e) or type(e).__name__
    else:
        yield  # any answer means reachable: huggingface_hub's own retries and errors apply
        return
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    except LocalEntryNotFoundError:
        raise ConfigError(
            f"{arch}: cannot download timm's pretrained weights: the Hugging Face Hub ({constants.ENDPOINT}) is not "
            f"reachable ({reason}) and they are not in its local cache; without internet, give a local timm "
            "checkpoint instead: `taskvec init --weights FILE` (a .safetensors state_dict of this architecture)",
            field="pretrained",
        ) from None
    finally:
        constants.HF_HUB_OFFLINE = offline


def create_module(spec: ModelSpec, pretrained: bool = False, weights: str | None = None) -> nn.Module:
    """Build the `nn.Module` a spec describes (random init unless `pretrained`/`weights`)."""
    net: nn.Module
    with _hub_download(spec.arch) if pretrained and weights is None else contextlib.nullcontext():
        if spec.task == "segmentation":
            from taskvec.models.segmentation import build_segmentation

            net = build_segmentation(spec.arch, spec.decoder, spec.num_classes, spec.in_chans,
                                     pretrained=pretrained, weights=weights, encoder_kwargs=spec.model_kwargs)
        else:
            kwargs = {"in_chans": spec.in_chans, "num_classes": spec.num_classes, **spec.model_kwargs}
            net = _timm_create(spec.arch, kwargs, pretrained, weights)
    if spec.dp_compatible is not None:
        from taskvec.models.dp_ready import make_dp_compatible

        make_dp_compatible(net, **spec.dp_compatible)
    return net


def check_size(net: nn.Module, spec: ModelSpec, size: int, device: str | torch.device = "cpu") -> None:
    """One forward pass of blank images at `size` (the spec's when the base is made, a run's when it fine-tunes
    at another), so that a size the network cannot run (a ViT below its patch or off its position grid, a
    segmentation encoder's total stride above it) is refused before anything is trained or written."""
    was = net.training
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, spec.in_chans, size, size, device=device))
    except (MemoryError, torch.OutOfMemoryError):
        raise  # memory, not the size's fit
    except Exception as e:  # noqa: BLE001 - any other failure means this size does not fit the architecture
        built = f" (built for {spec.img_size})" if size != spec.img_size else ""
        raise ConfigError(f"img_size {size} does not fit {spec.arch}{built}: {first_line(e)}", field="img_size",
                          expected=spec.img_size, got=size) from None
    finally:
        net.train(was)


def build_base(
    arch: str,
    task: str = "classification",
    num_classes: int = 2,
    in_chans: int = 3,
    img_size: int | None = None,
    labels: list[str] | None = None,
    pretrained: bool = False,
    weights: str | os.PathLike[str] | None = None,
    dp_compatible: bool = False,
    dp_norm: str | None = None,
    decoder: str = "unet",
    seed: int | None = None,
    zero_head: bool | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Create a base model and its spec. `weights` is a local timm checkpoint (safetensors); segmentation
    models put an smp `decoder` (`unet` or `fpn`) over the timm encoder. `seed` makes what is initialised at
    random (the head and decoder of a pretrained network; everything without weights) reproducible, without
    touching the global random state.

    `zero_head` (default: with pretrained weights; classification only) starts the classifier at zero (De et al. 2022;
    Kolesnikov et al. 2020): it predicts every class alike until the sites train it, with no random class
    preference to undo. A head that stays frozen (FedBABU) must be random: pass `zero_head=False`.

    `dp_compatible` converts it for DP-SGD (see `taskvec.models.dp_ready`) and records that in the spec;
    `dp_norm` defaults to `frozen-batchnorm` for pretrained bases (keeps their statistics), else `groupnorm`.
    """
    import timm

    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}", field="task", expected=list(TASKS),
                          got=task)
    if not timm.is_model(arch):
        raise ConfigError(f"arch {arch!r} is not a timm architecture; see timm.list_models()", field="arch", got=arch)
    if num_classes < 2 and task == "segmentation":
        raise ConfigError(f"num_classes must be >= 2 for segmentation (background + foreground), got {num_classes}",
                          field="num_classes", expected=">= 2", got=num_classes)
    if seed is not None:
        check_seed(seed)
    if not 1 <= num_classes <= MAX_CLASSES:
        raise ConfigError(f"num_classes must be in 1..{MAX_CLASSES}, got {num_classes}", field="num_classes",
                          expected=f"1..{MAX_CLASSES}", got=num_classes)
    labels = list(labels) if labels else [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ConfigError(f"labels names {len(labels)} classes but `num_classes` is {num_classes}", field="labels",
                          expected=num_classes, got=len(labels))
    if twice := sorted(x for x, n in Counter(labels).items() if n > 1):
        raise ConfigError(f"labels must name each class once, got {', '.join(map(repr, twice))} more than once",
                          field="labels", got=labels)
    if weights is not None:
        read_header(weights)  # refuses pickle, corrupt or missing files with a clear message
    default_size = timm.get_pretrained_cfg(arch)
    size = img_size if img_size is not None else (default_size.input_size[-1] if default_size is not None else 224)
    for name, value, top in (("in_chans", in_chans, MAX_CHANNELS), ("img_size", size, MAX_IMG_SIZE)):
        if not _int_in(value, 1, top):
            raise ConfigError(f"{name} must be a whole number in 1..{top}, got {value!r}", field=name, got=value)
    spec = ModelSpec(arch, task, num_classes, in_chans, int(size), labels, {})
    if task == "segmentation":
        from taskvec.models.segmentation import decoder_spec

        spec.decoder = decoder_spec(decoder)
    if dp_compatible:
        from taskvec.models.dp_ready import dp_spec

        spec.dp_compatible = dp_spec(dp_norm or ("frozen-batchnorm" if pretrained or weights else "groupnorm"))
    elif dp_norm is not None:
        raise ConfigError("dp_norm needs dp_compatible (it chooses how the DP-ready conversion normalises)",
                          field="dp_norm", got=dp_norm)
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        if img_size is not None:
            spec.model_kwargs["img_size"] = int(img_size)
            try:
                module = create_module(spec, pretrained, str(weights) if weights else None)
            except TypeError:  # the architecture takes no img_size (CNNs work at any size)
                spec.model_kwargs.pop("img_size")
                module = create_module(spec, pretrained, str(weights) if weights else None)
        else:
            module = create_module(spec, pretrained, str(weights) if weights else None)
    check_size(module, spec, spec.img_size)
    if zero_head is None:
        zero_head = pretrained or weights is not None
    if zero_head and task == "classification":
        with torch.no_grad():
            for p in module.get_classifier().parameters():  # type: ignore[operator]
                p.zero_()
    return module, spec


def save_model(
    model: nn.Module | dict[str, torch.Tensor],
    spec: ModelSpec,
    path: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
    force: bool = False,
) -> str:
    """Save a model file with its spec and content identity; return the identity."""
    from taskvec import __version__

    state = model.state_dict() if isinstance(model, nn.Module) else model
    identity = state_digest(state)
    header = ModelHeader(identity=identity, model=spec.to_dict(), created=now(), taskvec_version=__version__,
                         **(extra or {}))
    save_tensors(state, path, header, force=force)
    return identity


def starts_pretrained(header: ModelHeader) -> bool:
    """Whether a model file's header records that its weights start from trained ones: timm's pretrained weights
    or a local checkpoint (`source`, which merged versions keep from their base). A file that records nothing is
    taken to start from random weights."""
    source = header.source
    return isinstance(source, dict) and bool(source.get("pretrained") or source.get("weights"))


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the exact `nn.Module` a taskvec model file describes and load its weights."""
    from safetensors.torch import load_file

    header = read_kind(path, "model")
    try:
        module = create_module(ModelSpec.from_dict(header.model.model))
    except FileFormatError as e:
        raise FileFormatError(f"{path}: {e.message}", path=path) from None
    state = load_file(str(path))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FileFormatError(f"{path}: weights do not fit its architecture: {first_line(e)}") from None
    return module.to(device)


def model_spec(path: str | os.PathLike[str]) -> ModelSpec:
    """The spec stored in a model file (no torch needed)."""
    return ModelSpec.from_dict(read_kind(path, "model").model.model)


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """A run directory stands for the model file it holds (`RUN_DIR/model.safetensors`)."""
    p = Path(path)
    if p.is_dir():
        if (p / "model.safetensors").exists():
            return p / "model.safetensors"
        raise FileFormatError(f"{p}: directory holds no model.safetensors (is the fine-tuning run finished?)")
    return p
