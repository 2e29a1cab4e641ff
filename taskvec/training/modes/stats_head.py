"""`stats-head:P`: no weights, but the sufficient statistics of the base's unit-length features in at most P
dimensions (per-class counts and sums, second moments, the log-norm sum; `taskvec.training.sufficient`), from
one pass with no gradient step (two under DP). The run's model gets the site's own LDA head solved from them;
its vector carries the statistics alone, which an `lda-head` (or `ridge-head`) merge sums and solves once. With DP the
statistics are one `gaussian-sum` release of sensitivity `max_grad_norm` (each unit's scaled contribution has
at most that L2 norm), made as two passes: the features' centre, then the statistics centred on it
(`sufficient.dp_release`). Not DP-SGD. One process.

Classification: a feature per image, timm's pooled feature; the head is the linear classifier. Segmentation:
a feature per pixel, what the segmentation head's convolution reads at that pixel (the frozen decoder's output
in the convolution's window, unfolded: channels × kernel height × kernel width, and brought to the mask's size
by the head's own upsampling, which commutes with the convolution); the head is that convolution, solved as a
linear classifier of pixels. Each pixel of an image weighs 1/(its number of pixels), so an image's
contribution is bounded as one classification image's is. The decoder stays the base's: its features are as
good as its initialisation (smp's FPN decoder's 128 channels carry far more than the U-Net's last 16)."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskvec.errors import ConfigError, FileFormatError, TaskvecError
from taskvec.training.modes.base import OnePassHead, head_names, register

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator

    import numpy as np
    import torch
    from torch import nn

    from taskvec.io.schema import ModelHeader
    from taskvec.models.spec import ModelSpec
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.progress import Track
    from taskvec.training.data import ImageDataset

STATISTICS_FILE = "statistics.safetensors"  # beside the run's model file: what its vector will carry


@register
class StatsHead(OnePassHead):
    name = "stats-head"
    arg = "P"
    help = ("dimensions: the noised sufficient statistics of the base's features (class counts and sums, second "
            "moments in at most P dimensions), one pass (two under DP), no gradient step; merged by summing, the "
            "head solved once")
    pass_name = "feature statistics"
    segmentation = True

    def trainable_names(self, net: nn.Module, task: str) -> list[str]:
        return solved_keys(net, task)

    def fit(self, net: nn.Module, spec: ModelSpec, data: ImageDataset, *, device: torch.device, batch_size: int,
            dp: DPConfig | None, run_id: str, track: Track[Any], run_dir: Path) -> list[dict[str, Any]]:
        """Write the (noised) statistics beside the model file and set the head to the site's own LDA head."""
        import numpy as np
        import torch

        from taskvec.io.schema import FORMAT, FORMAT_VERSION
        from taskvec.io.tensors import save_tensors, state_digest
        from taskvec.privacy.dpsgd import secret_generator
        from taskvec.privacy.mechanisms.gaussian_sum import GaussianSum, release_noise
        from taskvec.training import sufficient

        head, dim = head_layer(net.eval(), spec, self.name)
        if len(data) == 0:
            raise TaskvecError(f"train {self.name}: no training images")
        keys = self.trainable_names(net, spec.task)
        weight_key, bias_key = keys
        state = net.state_dict()
        parent = state_digest(state)
        features = sufficient.features_record(state_digest({k: v for k, v in state.items() if k not in keys}),
                                              spec.arch, dim, self.k)
        unit = "patient" if dp is not None and data.groups is not None else "image"
        z, entry = 0.0, None
        if dp is not None:  # the mechanism first: an over-budget release is refused before the pass
            z, eps, accountant = release_noise(dp, self.pass_name)
            entry = GaussianSum.entry(epsilon=eps, delta=dp.delta, accountant=accountant, noise_multiplier=z,
                                      sample_rate=1.0, steps=1, max_grad_norm=dp.max_grad_norm,
                                      unit=unit, run_id=run_id, seeded=dp.seed is not None)
        p = features["projection"]["dim"]
        proj = sufficient.projection(features["projection"]["seed"], features["dim"], p)
        one_pass = partial(_one_pass, net, spec, data, unit == "patient", device, batch_size, track, self.name)
        record: dict[str, Any] = {"features": features, "head": [weight_key, bias_key], "clip": None, "unit": unit,
                                  "noise_std": None}
        if dp is None:
            stats = one_pass(lambda f, y, w: sufficient.contributions(f, y, w, spec.num_classes, proj, None))
        else:
            gen = secret_generator("cpu", dp.seed)
            stats, std, centre = sufficient.dp_release(
                one_pass, z, sufficient.clip_bound(features["dim"], p), spec.num_classes, proj,
                lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64).numpy())
            record.update(clip=centre.clip, noise_std=std,
                          centre={"share": sufficient.CENTRE_SHARE, "point": centre.point.tolist()})
        weight, bias = sufficient.solve("lda", stats, proj, sufficient.DEFAULT_SHRINK, record["noise_std"],
                                        f"train {self.name} on {len(data)} units")
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "statistics", "run_id": run_id,
                "parent": parent, "sufficient": record}
        save_tensors({sufficient.KEYS[k]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()},
                     run_dir / STATISTICS_FILE, meta, force=True)  # nothing of it has left the site yet
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight).reshape(head.weight.shape))
            head.bias.copy_(torch.from_numpy(bias))
        return [entry] if entry is not None else []

    def release(self, model: Path, run_id: str | None, parent: str | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The statistics the run wrote beside `model` (its run id and base checked) and their header record."""
        from safetensors.numpy import load_file

        from taskvec.io.files import read_kind

        path = model.parent / STATISTICS_FILE
        if not path.exists():
            raise FileFormatError(f"{model}: a {self} run's statistics ({STATISTICS_FILE}) are not beside it; "
                                  "export from the run folder", path=model)
        h = read_kind(path, "statistics")
        for fld, want in (("run_id", run_id), ("parent", parent)):
            if h.meta.get(fld) != want:
                raise FileFormatError(f"{path}: {fld} is {str(h.meta.get(fld))[:12]}, the model's is "
                                      f"{str(want)[:12]}: not this run's statistics", path=path, field=fld)
        return load_file(str(path)), dict(h.meta["sufficient"])


_HEAD_CONV = "segmentation_head.0"  # smp's segmentation head: the convolution, then the upsampling


def solved_keys(net: nn.Module, task: str) -> list[str]:
    """[weight, bias] keys of the layer the mode solves: timm's classifier, or smp's head convolution."""
    keys = [f"{_HEAD_CONV}.{p}" for p in ("weight", "bias")] if task == "segmentation" else head_names(net, task)
    return [next((k for k in keys if k.endswith(end)), end) for end in ("weight", "bias")]


def solved_keys_of(model: ModelHeader) -> list[str]:
    """`solved_keys` of the network a model file's spec builds (on the meta device: no weights allocated)."""
    import torch

    from taskvec.models.spec import ModelSpec, create_module

    spec = ModelSpec.from_dict(model.model)
    with torch.device("meta"):
        return solved_keys(create_module(spec), spec.task)


def head_layer(net: Any, spec: ModelSpec, name: str) -> tuple[Any, int]:
    """The layer the mode solves (timm's linear classifier, or smp's head convolution) and its input's
    dimension per image or pixel; refuses a layer it cannot solve as a linear map of unfolded features."""
    import torch

    if spec.task == "classification":
        head = net.get_classifier()
        if not isinstance(head, torch.nn.Linear):
            raise ConfigError(f"train {name} needs a linear classifier; {spec.arch}'s is {type(head).__name__}",
                              field="train", got=name)
        return head, head.in_features
    conv = net.get_submodule(_HEAD_CONV)
    if not (type(conv) is torch.nn.Conv2d and conv.groups == 1 and conv.bias is not None
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)):
        raise ConfigError(f"train {name} needs the segmentation head to be one plain convolution with a bias; "
                          f"this base's is {conv}", field="train", got=name)
    return conv, conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]


def _pixel_features(net: Any, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per image of `x`, one at a time (memory of one image's pixels), what the segmentation head's convolution
    reads at each pixel of the mask: (pixels, in_channels × kernel height × kernel width)."""
    import torch

    conv = net.get_submodule(_HEAD_CONV)
    seen: dict[str, torch.Tensor] = {}
    hook = conv.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    try:
        net(x)
    finally:
        hook.remove()
    for image in seen["x"]:
        windows = torch.nn.functional.unfold(image[None], conv.kernel_size, dilation=conv.dilation,
                                             padding=conv.padding, stride=conv.stride)
        grid = windows.view(1, windows.shape[1], *seen["out"].shape[-2:])
        yield net.segmentation_head[1](grid)[0].flatten(1).T  # the head's upsampling, linear per channel


def _one_pass(net: Any, spec: ModelSpec, data: ImageDataset, patients: bool, device: torch.device, batch_size: int,
              track: Track[Any], name: str, part: Callable[[np.ndarray, list[int], np.ndarray], dict[str, np.ndarray]]
              ) -> dict[str, np.ndarray]:
    """The sum over `data` of `part(features, labels, weights)` (per image, or per pixel weighing 1/pixels of its
    image's unit weight), one pass with no gradient."""
    import numpy as np
    import torch

    from taskvec.training.class_means import unit_weights
    from taskvec.training.data import Normalizer, make_loader

    weights = unit_weights(data.groups if patients else None, len(data)).numpy()
    norm = Normalizer(spec, device)
    total: dict[str, np.ndarray] = {}
    seen = 0
    with torch.no_grad():
        for x, y in track(make_loader(data, batch_size, device), "feature statistics",
                          math.ceil(len(data) / batch_size)):
            x = norm(x.to(device))
            if spec.task == "classification":
                parts: Iterable[tuple[torch.Tensor, torch.Tensor, np.ndarray]] = [
                    (net.forward_head(net.forward_features(x), pre_logits=True), y, weights[seen:seen + len(y)])]
            else:  # each pixel weighs 1/pixels of its image's unit weight
                parts = ((f, m.flatten(), np.full(m.numel(), weights[seen + i] / m.numel()))
                         for i, (f, m) in enumerate(zip(_pixel_features(net, x), y)))
            for feats, labels, w in parts:
                if len(feats) != len(labels):
                    raise TaskvecError(f"train {name}: the segmentation head reads {len(feats)} pixels of an image "
                                       f"whose mask has {len(labels)}")
                feats = feats.double()
                if not feats.isfinite().all():
                    raise TaskvecError(f"train {name}: the base's features of a training image are not finite")
                out = part(feats.cpu().numpy(), labels.tolist(), w)
                total = {k: total[k] + v for k, v in out.items()} if total else out
            seen += len(y)
    return total
