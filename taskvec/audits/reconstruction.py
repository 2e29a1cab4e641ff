"""Reconstruction audit: can an attacker rebuild a site's training images from its vector?

The attack (gradient inversion) starts from random images, simulates the site's local training on them from
the base, and moves the images until the simulated update points the same way as the real one:

- Geiping et al. 2020, "Inverting gradients": cosine distance between the updates plus a total-variation
  prior; Adam on the sign of the image gradient; images kept in [0, 1]; step size ×0.1 at 3/8, 5/8, 7/8.
  The images start mid-grey plus a little noise (converged faster than uniform noise in few iterations).
- Dimitrov et al. 2022, "Data leakage in federated averaging": several local steps are matched by
  differentiating through the unrolled local training (its intermediate weights are never observed). As
  there, one image per training image is shared by every epoch (their epoch prior, taken at full weight);
  the sampler's order is unknown, so the simulation visits the images in index order.
- Labels known: the site's labels (segmentation: masks) are given to the attacker. Unknown: label (mask)
  logits are optimised with the images (Zhu et al. 2019, "Deep leakage from gradients").
- taskvec's own optimizer, AdamW, divides each step by √v̂ (after one step that is |g|, so the update is the
  sign of the gradient and d(update)/dg = 0); the simulation treats √v̂ as a constant (a straight-through
  estimate) so the images still get a gradient through the numerator.

Scoring (the site runs the audit on its own images): each reconstruction's best match among the site's
images and their 8 flips/rotations (the augmentation taskvec trains with) by PSNR, with the SSIM of that
pair, both from torchmetrics; a reconstruction is *recognisable* when PSNR > `RECOGNISABLE_PSNR` dB and SSIM
> `RECOGNISABLE_SSIM`. Baselines: uniform noise, and the mean of the site's other images (a generic image).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from taskvec.errors import ConfigError, OutputExistsError, TaskvecError, check_range
from taskvec.io.schema import ModelHeader, VectorHeader
from taskvec.models.spec import MAX_IMG_SIZE
from taskvec.progress import Track, no_track
from taskvec.training.config import DEFAULT_DEVICE

RECOGNISABLE_PSNR = 18.0
RECOGNISABLE_SSIM = 0.5
OPTIMIZERS = ("adamw", "sgd")
JSON_FILE, GRID_FILE = "reconstruction.json", "reconstruction.png"


def _default_weight_decay() -> float:
    from taskvec.training.loop import FinetuneConfig

    return FinetuneConfig().weight_decay


@dataclass
class SiteAssumptions:
    """What the attacker assumes about the site's local training (taskvec's `finetune` flags).

    `optimizer`: `adamw` is taskvec's recipe (AdamW, linear warm-up then cosine decay, no decay on biases and
    norms); `sgd` is plain SGD at a constant learning rate (FedSGD/FedAvg as in the papers)."""

    samples: int
    batch_size: int
    lr: float
    steps: int
    img_size: int
    optimizer: str = "adamw"
    weight_decay: float = field(default_factory=_default_weight_decay)
    labels_known: bool = True

    def check(self) -> None:
        for name in ("samples", "batch_size", "steps", "img_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}", field=name, got=v)
        if self.img_size > MAX_IMG_SIZE:
            raise ConfigError(f"img_size must be at most {MAX_IMG_SIZE}, got {self.img_size}", field="img_size",
                              got=self.img_size)
        check_range("lr", self.lr, low=0)
        check_range("weight_decay", self.weight_decay, low=0, low_open=False)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
                              field="optimizer", got=self.optimizer)

    def batches(self) -> list[range]:
        """The images of each local step: batches in index order, the last partial one dropped (as taskvec's
        loader does when there is more than one batch)."""
        per_epoch = max(1, self.samples // self.batch_size)
        b = min(self.batch_size, self.samples)
        return [range((t % per_epoch) * b, (t % per_epoch + 1) * b) for t in range(self.steps)]

    def learning_rates(self) -> list[float]:
        if self.optimizer == "sgd":
            return [self.lr] * self.steps
        from taskvec.training.loop import FinetuneConfig, lr_at

        warmup = max(1, round(FinetuneConfig().warmup * self.steps))
        return [lr_at(t, self.steps, self.lr, warmup) for t in range(self.steps)]

    @property
    def seen(self) -> int:
        """How many distinct images the simulated steps use."""
        return max(b.stop for b in self.batches())


@dataclass
class AttackConfig:
    """The optimisation: `iterations` Adam steps of size `step_size` on the images, TV weight `tv`."""

    iterations: int = 1000
    step_size: float = 0.1
    tv: float = 1e-2
    seed: int = 0
    max_simulated: int = 4096  # steps × batch size: the unrolled training's memory grows with it

    def check(self, site: SiteAssumptions) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"iterations must be an integer >= 1, got {self.iterations!r}", field="iterations")
        check_range("step_size", self.step_size, low=0)
        check_range("tv", self.tv, low=0, low_open=False)
        simulated = site.steps * min(site.batch_size, site.samples)
        if simulated > self.max_simulated:
            raise ConfigError(
                f"steps × batch_size = {simulated} images to simulate per iteration (limit {self.max_simulated}); "
                "the unrolled training would not fit in memory: audit the worst case (fewer steps) instead",
                field="steps", got=site.steps)


# ------------------------------------------------------------------------------------------ the attack


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring pixels (anisotropic TV)."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """1 − cos between two updates, each a list of tensors taken as one long vector."""
    dot = torch.stack([(x * y).sum() for x, y in zip(a, b)]).sum()
    na = torch.stack([x.pow(2).sum() for x in a]).sum().sqrt()
    nb = torch.stack([y.pow(2).sum() for y in b]).sum().sqrt()
    return 1 - dot / (na * nb + 1e-12)


class LocalTraining:
    """The site's local training as a differentiable function of its images and targets.

    `trainable` are the parameters the vector changed (the others are held fixed, as a frozen parameter would
    be); the update returned is theirs, after the steps of `site`."""

    def __init__(self, model: nn.Module, spec: Any, trainable: list[str], site: SiteAssumptions,
                 device: torch.device) -> None:
        from taskvec.training.data import Normalizer
        from taskvec.training.losses import SegmentationLoss

        self.model, self.site, self.names = model.train(), site, trainable
        for m in model.modules():  # fused attention has no double backward
            if getattr(m, "fused_attn", False):
                setattr(m, "fused_attn", False)  # noqa: B010 - an attribute nn.Module does not declare
        self.norm = Normalizer(spec, device)
        self.criterion = SegmentationLoss() if spec.task == "segmentation" else nn.CrossEntropyLoss()
        state = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
        self.start = {k: state[k] for k in trainable}
        self.fixed = {k: v for k, v in state.items() if k not in self.start}
        self.decay, self.betas, self.eps = self._adamw_groups(model, site)

    @staticmethod
    def _adamw_groups(model: nn.Module, site: SiteAssumptions) -> tuple[dict[str, float], tuple[float, float], float]:
        """Weight decay per parameter, betas and eps exactly as taskvec's fine-tuning builds AdamW (timm)."""
        import timm.optim

        opt = timm.optim.create_optimizer_v2(model, "adamw", lr=site.lr, weight_decay=site.weight_decay)
        by_id = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        group = opt.param_groups[0]
        return ({k: by_id[id(p)] for k, p in model.named_parameters()}, tuple(group["betas"]),  # type: ignore[return-value]
                group["eps"])

    def update(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Simulated `fine-tuned − base` of the trainable parameters after training on images `x` in [0, 1]."""
        from torch.func import functional_call

        params = {k: v.clone().requires_grad_(True) for k, v in self.start.items()}
        m = {k: torch.zeros_like(v) for k, v in params.items()}
        v2 = {k: torch.zeros_like(v) for k, v in params.items()}
        b1, b2 = self.betas
        for t, (idx, lr) in enumerate(zip(self.site.batches(), self.site.learning_rates())):
            batch = slice(idx.start, idx.stop)
            out = functional_call(self.model, {**self.fixed, **params}, (self.norm(x[batch] * 255),))
            loss = self.criterion(out.float(), y[batch])
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
            for (k, p), g in zip(list(params.items()), grads):
                if self.site.optimizer == "sgd":
                    params[k] = p - lr * g
                    continue
                m[k] = b1 * m[k] + (1 - b1) * g
                v2[k] = b2 * v2[k] + (1 - b2) * g.detach() ** 2  # straight-through: √v̂ held constant
                step = (m[k] / (1 - b1 ** (t + 1))) / ((v2[k] / (1 - b2 ** (t + 1))).sqrt() + self.eps)
                params[k] = p * (1 - lr * self.decay[k]) - lr * step
        return [params[k] - self.start[k] for k in self.names]


@dataclass
class Reconstruction:
    images: torch.Tensor  # n × C × S × S in [0, 1]
    targets: torch.Tensor  # class (n × K) or per-pixel (n × K × S × S) probabilities: given or estimated
    loss: float  # final cosine distance between the simulated and the real update


def reconstruct(model: nn.Module, spec: Any, delta: dict[str, torch.Tensor], site: SiteAssumptions,
                attack: AttackConfig | None = None, labels: torch.Tensor | None = None,
                device: str | torch.device = "cpu", track: Track[Any] = no_track) -> Reconstruction:
    """Rebuild the `site.seen` training images behind `delta` (fine-tuned − base of `model`'s parameters).

    `labels` (class indices, or masks) when the attacker knows them; else they are estimated."""
    attack = attack or AttackConfig()
    site.check()
    attack.check(site)
    device = torch.device(device)
    model = model.to(device)
    names = [k for k, _ in model.named_parameters() if k in delta and bool(delta[k].abs().max() > 0)]
    if not names:
        raise TaskvecError("the vector changes none of the model's parameters: there is nothing to invert")
    target = [delta[k].to(device, torch.float32) for k in names]
    sim = LocalTraining(model, spec, names, site, device)
    n, k, s = site.seen, spec.num_classes, site.img_size
    gen = torch.Generator().manual_seed(attack.seed)
    x = (0.5 + 0.05 * torch.randn(n, spec.in_chans, s, s, generator=gen)).clamp(0, 1).to(device).requires_grad_(True)
    shape = (n, k) if spec.task == "classification" else (n, k, s, s)
    if labels is not None:
        fixed = nn.functional.one_hot(labels[:n].to(device).long(), k).float()
        y_fixed = fixed if spec.task == "classification" else fixed.permute(0, 3, 1, 2)
        variables = [x]
    else:
        logits = (0.01 * torch.randn(shape, generator=gen)).to(device).requires_grad_(True)
        variables = [x, logits]
    opt = torch.optim.Adam(variables, lr=attack.step_size)
    milestones = [round(attack.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    schedule = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in track(range(attack.iterations), "reconstructing", attack.iterations):
        y = y_fixed if labels is not None else logits.softmax(1)
        loss = cosine_distance(sim.update(x, y), target)
        grads = torch.autograd.grad(loss + attack.tv * total_variation(x), variables)
        x.grad = grads[0].sign()  # Geiping et al.: signed gradients for the images
        if labels is None:
            logits.grad = grads[1]
        opt.step()
        schedule.step()
        with torch.no_grad():
            x.clamp_(0, 1)
    y = y_fixed if labels is not None else logits.softmax(1)
    return Reconstruction(x.detach().cpu(), y.detach().cpu(), float(loss.detach()))


# ------------------------------------------------------------------------------------------ scoring


def symmetries(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips/rotations of the square of a batch of images (taskvec's training augmentation)."""
    out = []
    for t in (x, x.transpose(-2, -1)):
        out += [t, t.flip(-1), t.flip(-2), t.flip(-1).flip(-2)]
    return out


@dataclass
class Match:
    """A reconstruction's best-matching real image: its index in the data, which symmetry, PSNR (dB), SSIM."""

    index: int
    symmetry: int
    psnr: float
    ssim: float

    @property
    def recognisable(self) -> bool:
        return self.psnr > RECOGNISABLE_PSNR and self.ssim > RECOGNISABLE_SSIM


def _real_batches(ds: Any, batch_size: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, images in [0, 1]) over a dataset, a batch at a time (memory bounded by the batch)."""
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        yield start, torch.stack([ds[i][0] for i in idx]).float() / 255


def best_matches(images: torch.Tensor, ds: Any) -> list[Match]:
    """For each image (n × C × S × S in [0, 1]), the real image (any of its 8 symmetries) of highest PSNR."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    best: list[tuple[float, int, int]] = [(-math.inf, 0, 0)] * len(images)
    for offset, real in _real_batches(ds):
        for s, variant in enumerate(symmetries(real)):
            for i, img in enumerate(images):
                p = peak_signal_noise_ratio(img.expand_as(variant), variant, data_range=1.0, reduction="none",
                                            dim=(1, 2, 3))
                j = int(p.argmax())
                if float(p[j]) > best[i][0]:
                    best[i] = (float(p[j]), offset + j, s)
    out = []
    for img, (score, j, s) in zip(images, best):
        real = symmetries(ds[j][0][None].float() / 255)[s]
        ssim = structural_similarity_index_measure(img[None], real, data_range=1.0)
        out.append(Match(j, s, score, float(ssim)))  # type: ignore[arg-type]
    return out


def summarize(matches: list[Match]) -> dict[str, Any]:
    psnr, ssim = np.array([m.psnr for m in matches]), np.array([m.ssim for m in matches])
    return {"psnr_median": float(np.median(psnr)), "psnr_max": float(psnr.max()),
            "ssim_median": float(np.median(ssim)), "ssim_max": float(ssim.max()),
            "recognisable": int(sum(m.recognisable for m in matches)), "count": len(matches)}


def verdict(matches: list[Match]) -> str:
    """One line: how many reconstructions are recognisable, against the stated thresholds."""
    s = summarize(matches)
    rule = f"PSNR > {RECOGNISABLE_PSNR:g} dB and SSIM > {RECOGNISABLE_SSIM:g}"
    if s["recognisable"]:
        return (f"LEAKS: {s['recognisable']} of {s['count']} reconstructions are recognisable training images "
                f"({rule}; best {s['psnr_max']:.1f} dB, SSIM {s['ssim_max']:.2f})")
    return (f"no reconstruction recognisable ({rule}; best {s['psnr_max']:.1f} dB, SSIM {s['ssim_max']:.2f}): "
            "this attack under these assumptions did not rebuild an image; an empirical check, not a guarantee")


def baselines(ds: Any, matches: list[Match], seed: int) -> dict[str, dict[str, Any]]:
    """What an attacker gets without the vector: uniform noise (best match over the data), and, against the image
    each reconstruction matched, the mean of the site's other images (a generic image of the kind)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    first = ds[0][0]
    noise = torch.rand((len(matches), *first.shape), generator=torch.Generator().manual_seed(seed))
    out = {"uniform_noise": summarize(best_matches(noise, ds))}
    if len(ds) > 1:
        total = torch.zeros(first.shape)
        for _, real in _real_batches(ds):
            total += real.sum(0)
        scores = []
        for m in matches:
            real = ds[m.index][0][None].float() / 255
            others = (total - real[0])[None] / (len(ds) - 1)
            scores.append(Match(m.index, 0, float(peak_signal_noise_ratio(others, real, data_range=1.0)),
                                float(structural_similarity_index_measure(others, real, data_range=1.0))))  # type: ignore[arg-type]
        out["mean_of_others"] = summarize(scores)
    return out


def save_grid(path: Path, images: torch.Tensor, matches: list[Match], ds: Any, title: str,
              max_pairs: int = 32) -> None:
    """PNG: each reconstruction beside its best match (as trained: the matched symmetry), PSNR/SSIM above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = min(len(images), max_pairs)
    cols = min(pairs, 4)
    rows = math.ceil(pairs / cols)
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2.6 * cols, 1.45 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(pairs):
        m = matches[i]
        real = symmetries(ds[m.index][0][None].float() / 255)[m.symmetry][0]
        for j, (img, label) in enumerate(((images[i], f"{m.psnr:.1f} dB {m.ssim:.2f}"), (real, f"#{m.index}"))):
            ax = axes[i // cols, 2 * (i % cols) + j]
            a = img.permute(1, 2, 0).numpy()
            ax.imshow(a[..., 0] if a.shape[2] == 1 else a, cmap="gray", vmin=0, vmax=1)
            ax.set_title(label, fontsize=7, color="red" if j == 0 and m.recognisable else "black")
    fig.suptitle(title, fontsize=8, wrap=True)
    fig.tight_layout()
    from taskvec.io.files import atomic_output

    with atomic_output(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the audit

RECORDED = ("samples", "batch_size", "lr", "steps", "img_size")  # read from a model's training record


def load_update(target: str | os.PathLike[str],
                base: str | os.PathLike[str]) -> tuple[ModelHeader | VectorHeader, dict[str, torch.Tensor]]:
    """The typed header of a vector or fine-tuned model (or run folder) and the update it implies
    (`fine-tuned − base` of its parameters; BatchNorm statistics left out), checked against `base`."""
    from safetensors.torch import load_file

    from taskvec.io.files import read_header, read_kind
    from taskvec.io.layout import check_against_base, delta_keys, is_statistic
    from taskvec.models.spec import resolve_model_path

    bh = read_kind(base, "model")
    th = read_header(resolve_model_path(target))
    if th.kind not in ("vector", "model"):
        raise TaskvecError(f"{th.path}: is a {th.kind}; the audit takes a vector or a fine-tuned model", path=th.path)
    check_against_base(th, bh)
    if th.kind == "vector":
        delta = {k: v.float() for k, v in load_file(str(th.path)).items() if not is_statistic(k)}
    else:
        ft, b = load_file(str(th.path)), load_file(str(bh.path))
        delta = {k: ft[k].float() - b[k].float() for k in delta_keys(bh.tensors)}
    return (th.vector if th.kind == "vector" else th.model), delta


def site_assumptions(header: ModelHeader | VectorHeader, spec: Any, assume: dict[str, Any]) -> SiteAssumptions:
    """The attacker's assumptions: `assume` (SiteAssumptions fields), else what the file records (a model's
    training record; a vector's sample count), else the base's image size."""
    unknown = set(assume) - set(SiteAssumptions.__dataclass_fields__)
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f"{name} is not an assumption of the attack", field=name)
    training = {} if isinstance(header, VectorHeader) else header.training or {}
    recorded = {**({"samples": header.samples} if isinstance(header, VectorHeader) else training),
                **({} if training.get("img_size") else {"img_size": spec.img_size})}
    values: dict[str, Any] = {k: recorded[k] for k in RECORDED if recorded.get(k) is not None} | assume
    for k in RECORDED:
        if values.get(k) is None:
            raise ConfigError(f"{k} is not recorded in the file: give the value the site trained with (what an "
                              "attacker would assume)", field=k)
    site = SiteAssumptions(**values)
    site.check()
    return site


def audit_reconstruction(
    target: str | os.PathLike[str],
    base: str | os.PathLike[str],
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    split: str = "train",
    assume: dict[str, Any] | None = None,
    attack: AttackConfig | None = None,
    device: str = DEFAULT_DEVICE,
    force: bool = False,
    track: Track[Any] = no_track,
) -> dict[str, Any]:
    """Attack a vector or fine-tuned model and score the reconstructions against the site's images (`data`,
    the training set: a path or dataset); write `reconstruction.json` and `reconstruction.png` to `out_dir`.

    `assume` overrides what the attacker is assumed to know (`SiteAssumptions` fields); the rest comes from the
    file's own record. Known labels are the training set's, in order, so `data` must then be exactly it."""
    from taskvec.io.files import now, read_kind, write_json
    from taskvec.models.spec import ModelSpec, load_model
    from taskvec.training.data import as_splits
    from taskvec.training.evaluate import resolve_device

    attack = attack or AttackConfig()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TaskvecError(f"{out}: exists and is not a directory", path=out)
    for name in (JSON_FILE, GRID_FILE):
        if (out / name).exists() and not force:
            raise OutputExistsError(f"{out / name}: exists; pass `force` to overwrite it", path=out / name)
    spec = ModelSpec.from_dict(read_kind(base, "model").model.model)
    header, delta = load_update(target, base)
    site = site_assumptions(header, spec, dict(assume or {}))
    attack.check(site)
    splits = as_splits(data, spec, img_size=site.img_size, val_fraction=0.0)
    ds = splits.get(split)
    labels = None
    if site.labels_known:
        if len(ds) != site.samples:
            raise ConfigError(f"labels_known: the data holds {len(ds)} images but samples is {site.samples}; known "
                              "labels are the training set's own, so give exactly the training set (or unknown labels)",
                              field="labels_known")
        labels = torch.stack([torch.as_tensor(ds[i][1]) for i in range(site.seen)])
    t0 = time.perf_counter()
    rec = reconstruct(load_model(base), spec, delta, site, attack, labels, resolve_device(device), track)
    matches = best_matches(rec.images, ds)
    line = verdict(matches)
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{Path(target).name}: {site.samples} images, batch {site.batch_size}, {site.steps} steps, "
             f"{site.optimizer}; left: reconstruction, right: best real match")
    save_grid(out / GRID_FILE, rec.images, matches, ds, title)
    record = {
        "target": str(target), "kind": header.kind, "base": str(base), "data": splits.source, "split": split,
        "task": spec.task, "privacy": header.privacy or [], "created": now(),
        "assumptions": asdict(site),
        "attack": {"method": "gradient inversion by simulated local training (Geiping et al. 2020; "
                             "Dimitrov et al. 2022)", **asdict(attack)},
        "thresholds": {"psnr_db": RECOGNISABLE_PSNR, "ssim": RECOGNISABLE_SSIM},
        "final_cosine_distance": rec.loss,
        "reconstructions": [{**asdict(m), "source": str(ds.sources[m.index]), "recognisable": m.recognisable}
                            | ({"label": int(rec.targets[i].argmax())} if spec.task == "classification" else {})
                            for i, m in enumerate(matches)],
        "summary": summarize(matches), "baselines": baselines(ds, matches, attack.seed),
        "verdict": line, "grid": GRID_FILE, "seconds": time.perf_counter() - t0,
    }
    write_json(out / JSON_FILE, record)
    return record
