"""Reconstruction audit on real data: can the training images be rebuilt from a site's vector?

BreastMNIST training images at 32 px (grayscale), a small random-init ConvNeXt (timm `test_convnext`, 0.2 M
parameters, LayerNorm: DP-ready as it is). Each setting trains a site from the same base, then runs
`taskvec.audits.reconstruction.audit_reconstruction` on the result with the attacker knowing the training
configuration and the labels. Settings:

- `sgd-1x1`, `sgd-8x1`: 1 image / 8 images, one plain SGD step (a site's own script; the papers' FedSGD case);
- `sgd-1x1-dpsgd-eps8|1`: the same step as DP-SGD (gradient clipped to 1, Gaussian noise calibrated by
  taskvec's PRV accountant for one step at sampling rate 1, δ = 1e-5);
- `sgd-1x1-export-eps8|1`: the un-noised SGD model exported with export-time noise (clip 1, δ = 1e-5);
- `adamw-1x1`: taskvec's own `finetune` (AdamW), 1 image, 1 step;
- `adamw-16x8`: taskvec's `finetune` as a site would run it, 16 images, batch 4, 8 steps (2 epochs),
  with its default augmentation (random flips/rotations: the attacker cannot know which were drawn).

Prints a markdown table (median over the reconstructions of each run, mean ± sd over seeds; a seed picks
other images and another attack start) and writes each setting's grid (seed 0) and JSON summary to --out. Example:
  OMP_NUM_THREADS=1 python benchmarks/reconstruction.py --out benchmarks/results/reconstruction
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "breastmnist" / "breastmnist.npz"
SIZE, DELTA, CLIP = 32, 1e-5, 1.0
SETTINGS = ("sgd-1x1", "sgd-8x1", "sgd-1x1-dpsgd-eps8", "sgd-1x1-dpsgd-eps1", "sgd-1x1-export-eps8",
            "sgd-1x1-export-eps1", "adamw-1x1", "adamw-16x8")


def sgd_site(base: Path, ds: Any, lr: float, out: Path, dp_epsilon: float | None) -> Path:
    """One plain SGD step on the whole of `ds` (a site's own script); with `dp_epsilon`, DP-SGD for a single
    example: the gradient clipped to CLIP plus N(0, (z·CLIP)²), z from taskvec's accountant."""
    from taskvec.io.files import read_kind
    from taskvec.models.spec import load_model, model_spec, save_model
    from taskvec.privacy.dpsgd import calibrate_noise
    from taskvec.training.data import Normalizer

    spec = model_spec(base)
    model = load_model(base).train()
    x = Normalizer(spec, "cpu")(torch.stack([ds[i][0] for i in range(len(ds))]))
    nn.functional.cross_entropy(model(x), torch.tensor(ds.targets)).backward()
    grads = [p.grad for p in model.parameters()]
    if dp_epsilon is not None:
        assert len(ds) == 1, "per-example clipping of one example"
        z = calibrate_noise(dp_epsilon, DELTA, 1.0, 1)
        norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
        grads = [g * min(1.0, CLIP / norm) + torch.randn(g.shape) * z * CLIP for g in grads]
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= lr * g
    save_model(model, spec, out, extra={"parent": read_kind(base, "model").meta["identity"]})
    return out


def run(setting: str, base: Path, images: Any, seed: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from taskvec.audits.reconstruction import GRID_FILE, AttackConfig, audit_reconstruction
    from taskvec.merging.export import export_vector
    from taskvec.training.loop import FinetuneConfig, finetune

    kind, shape = setting.split("-")[:2]
    n, steps = (int(v) for v in shape.split("x"))
    batch = n if kind == "sgd" else max(1, n // 4)
    ds = images.subset(range(seed * n, seed * n + n))
    folder = work / f"{setting}-s{seed}"
    folder.mkdir()
    eps = float(setting.rsplit("eps", 1)[1]) if "eps" in setting else None
    if kind == "sgd":
        target = sgd_site(base, ds, args.sgd_lr, folder / "ft.safetensors", eps if "dpsgd" in setting else None)
        assume = {"optimizer": "sgd", "lr": args.sgd_lr}
    else:
        config = FinetuneConfig(steps=steps, batch_size=batch, lr=args.adamw_lr, val_fraction=0.0, device="cpu",
                                seed=seed, augment=n > 1)
        target = finetune(base, ds, folder / "run", config).model_path
        assume = {}
    if "export" in setting:
        vec = folder / "vector.safetensors"
        export_vector(target, base, vec, clip=CLIP, epsilon=eps, delta=DELTA)
        target = vec
    assume |= {"samples": n, "batch_size": batch, "steps": steps, "img_size": SIZE}
    t = time.perf_counter()
    r = audit_reconstruction(target, base, ds, folder / "audit", assume=assume,
                             attack=AttackConfig(iterations=args.iterations, tv=args.tv, seed=seed))
    r["attack_seconds"], r["epsilon"] = time.perf_counter() - t, eps
    if seed == 0:
        shutil.copy(folder / "audit" / GRID_FILE, args.out / f"{setting}.png")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/reconstruction"))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--tv", type=float, default=0.1)
    ap.add_argument("--sgd-lr", type=float, default=0.01)
    ap.add_argument("--adamw-lr", type=float, default=1e-3)
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from taskvec.models.spec import build_base, save_model
    from taskvec.training.data import load_data

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        module, spec = build_base("test_convnext", "classification", 2, 1, SIZE, ["malignant", "benign"])
        base = Path(tmp) / "base.safetensors"
        save_model(module, spec, base)
        images = load_data(args.data, spec, img_size=SIZE, val_fraction=0.0).get("train")
        for setting in args.settings.split(","):
            runs = [run(setting, base, images, int(s), Path(tmp), args) for s in args.seeds.split(",")]
            rows.append(setting)
            (args.out / f"{setting}.json").write_text(json.dumps(
                [{k: v for k, v in r.items() if k != "reconstructions"} for r in runs], indent=2, default=str))
            print_row(setting, runs, header=len(rows) == 1)


def _ms(values: list[float], fmt: str) -> str:
    if len(values) == 1 or not all(math.isfinite(v) for v in values):
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def print_row(setting: str, runs: list[dict[str, Any]], header: bool) -> None:
    if header:
        print("| setting | ε | images | PSNR dB (median) | SSIM (median) | recognisable | noise PSNR / SSIM | "
              "mean of others PSNR / SSIM | cos. dist. | attack s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    eps = runs[0]["epsilon"] or "∞"
    s = [r["summary"] for r in runs]
    b = [r["baselines"] for r in runs]
    mean_of_others = "-" if "mean_of_others" not in b[0] else (
        f"{_ms([x['mean_of_others']['psnr_median'] for x in b], '.1f')} / "
        f"{_ms([x['mean_of_others']['ssim_median'] for x in b], '.2f')}")
    found = f"{sum(x['recognisable'] for x in s)}/{sum(x['count'] for x in s)}"
    print(f"| {setting} | {eps} | {s[0]['count']} | {_ms([x['psnr_median'] for x in s], '.1f')} | "
          f"{_ms([x['ssim_median'] for x in s], '.2f')} | {found} | "
          f"{_ms([x['uniform_noise']['psnr_median'] for x in b], '.1f')} / "
          f"{_ms([x['uniform_noise']['ssim_median'] for x in b], '.2f')} | "
          f"{mean_of_others} | "
          f"{_ms([r['final_cosine_distance'] for r in runs], '.3f')} | "
          f"{_ms([r['attack_seconds'] for r in runs], '.0f')} |", flush=True)


if __name__ == "__main__":
    main()
