"""`stats-head:P`: no weights, but the sufficient statistics of the base's pooled unit-length features in at
most P dimensions (per-class counts and sums, second moments, the log-norm sum; `taskvec.training.sufficient`),
from one pass with no gradient step. The run's model gets the site's own LDA head solved from them; its vector
carries the statistics alone, which an `lda-head` (or `ridge-head`) merge sums and solves once. With DP the
statistics are one `gaussian-sum` release of sensitivity `max_grad_norm` (each unit's scaled contribution has
at most that L2 norm), not DP-SGD. Classification only, one process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskvec.errors import ConfigError, FileFormatError, TaskvecError
from taskvec.training.modes.base import OnePassHead, head_names, register

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

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
            "moments in at most P dimensions), one pass, no gradient step; merged by summing, the head solved once")
    pass_name = "feature statistics"

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

        timm_net: Any = net.eval()
        head: Any = timm_net.get_classifier()
        if not isinstance(head, torch.nn.Linear):
            raise ConfigError(f"train {self.name} needs a linear classifier; {spec.arch}'s is "
                              f"{type(head).__name__}", field="train", got=self.name)
        if len(data) == 0:
            raise TaskvecError(f"train {self.name}: no training images")
        keys = head_names(net, "classification")
        weight_key = next(k for k in keys if k.endswith("weight"))
        bias_key = next(k for k in keys if k.endswith("bias"))
        state = net.state_dict()
        parent = state_digest(state)
        features = sufficient.features_record(state_digest({k: v for k, v in state.items() if k not in keys}),
                                              spec.arch, head.in_features, self.k)
        unit = "patient" if dp is not None and data.groups is not None else "image"
        z, entry = 0.0, None
        if dp is not None:  # the mechanism first: an over-budget release is refused before the pass
            z, eps, accountant = release_noise(dp, self.pass_name)
            entry = GaussianSum.entry(epsilon=eps, delta=dp.delta, accountant=accountant, noise_multiplier=z,
                                      sample_rate=1.0, steps=1, max_grad_norm=dp.max_grad_norm,
                                      unit=unit, run_id=run_id, seeded=dp.seed is not None)
        p = features["projection"]["dim"]
        bound = sufficient.clip_bound(features["dim"], p)  # of ‖g‖, under DP
        clip = bound if dp is not None else None
        stats = _statistics(timm_net, spec, data, features, clip, unit == "patient", device, batch_size, track,
                            self.name)
        std = None
        if dp is not None:
            std = sufficient.noise_std(z, bound)
            gen = secret_generator("cpu", dp.seed)
            stats = sufficient.add_noise(stats, std, lambda shape: torch.randn(shape, generator=gen,
                                                                               dtype=torch.float64).numpy())
        proj = sufficient.projection(features["projection"]["seed"], features["dim"], p)
        weight, bias = sufficient.solve_lda(stats, proj, sufficient.DEFAULT_SHRINK, std)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "statistics", "run_id": run_id,
                "parent": parent, "sufficient": {"features": features, "head": [weight_key, bias_key], "clip": clip,
                                                 "unit": unit, "noise_std": std}}
        save_tensors({sufficient.KEYS[k]: torch.from_numpy(np.ascontiguousarray(v)) for k, v in stats.items()},
                     run_dir / STATISTICS_FILE, meta, force=True)  # nothing of it has left the site yet
        with torch.no_grad():
            head.weight.copy_(torch.from_numpy(weight))
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


def _statistics(net: Any, spec: ModelSpec, data: ImageDataset, features: dict[str, Any], clip: float | None,
                patients: bool, device: torch.device, batch_size: int, track: Track[Any], name: str
                ) -> dict[str, np.ndarray]:
    """The un-noised statistics of `data`'s pooled features, one pass (`sufficient.contributions`)."""
    import torch

    from taskvec.training import sufficient
    from taskvec.training.class_means import unit_weights
    from taskvec.training.data import Normalizer, make_loader

    proj = sufficient.projection(features["projection"]["seed"], features["dim"], features["projection"]["dim"])
    weights = unit_weights(data.groups if patients else None, len(data)).numpy()
    norm = Normalizer(spec, device)
    total: dict[str, np.ndarray] = {}
    seen = 0
    with torch.no_grad():
        for x, y in track(make_loader(data, batch_size, device), "feature statistics",
                          math.ceil(len(data) / batch_size)):
            feats = net.forward_head(net.forward_features(norm(x.to(device))), pre_logits=True).double()
            if not feats.isfinite().all():
                raise TaskvecError(f"train {name}: the base's features of a training image are not finite")
            part = sufficient.contributions(feats.cpu().numpy(), y.tolist(), weights[seen:seen + len(y)],
                                            spec.num_classes, proj, clip)
            total = {k: total[k] + v for k, v in part.items()} if total else part
            seen += len(y)
    return total
