"""Throughput of `taskvec finetune`'s loop against a bare timm + torch loop, and epoch times on real data.

    python benchmarks/finetune.py --arch resnet18 --img-size 64 --batch-size 32 --images 640 --repeats 3
    python benchmarks/finetune.py --data ../shared/data/pbc_blood_cells_128 --arch tf_efficientnet_lite0 \
        --img-size 64 --images 1024 --skip-real
    python benchmarks/finetune.py --real-only --device cuda
    python benchmarks/finetune.py --nproc 2 --arch resnet18 --img-size 64 --batch-size 32 --images 256 --repeats 3

Throughput: the same model, batch size and images: random uint8 arrays (2 classes), or with `--data` the first
`--images` image files of a folder data set's training split. The bare loop is what a user would write: a
TensorDataset of ready uint8 tensors (decoded beforehand, outside the timing), AdamW, cross-entropy, the same
autocast; taskvec's loop adds its Dataset, augmentation, the LR schedule and loss logging. With `--data`,
taskvec runs twice: reading the decoded-image cache (built before the first epoch; its build time is
reported) and decoding the files in every epoch (`--image-cache off`).
Each repeat trains two epochs of each loop, alternating, and times the second epoch (warm); the table
gives medians and the ratio of medians. Real data: `taskvec finetune` on ../shared/data (BreastMNIST,
MoNuSeg), median seconds of the training part of an epoch and of the whole epoch (with validation and the
checkpoint).

`--nproc N`: images/s of the second epoch of `taskvec finetune` as one process against N processes under
torchrun (DDP; the same global batch). On CPU the one process gets N threads and each of the N gloo
processes one (the same cores); on GPUs, 1 GPU against N.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

from taskvec.models.spec import build_base, save_model
from taskvec.training.data import ImageDataset
from taskvec.training.data.cache import cached
from taskvec.training.evaluate import autocast, resolve_device
from taskvec.training.loop import FinetuneConfig, finetune

SHARED = Path(os.environ.get("TASKVEC_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


def bare_epoch_rate(arch: str, images: np.ndarray, labels: np.ndarray, batch: int, device: torch.device) -> float:
    """images/s of the second epoch of a plain timm + torch training loop."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=int(labels.max()) + 1, in_chans=3).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    loss_fn = torch.nn.CrossEntropyLoss()
    ds = torch.utils.data.TensorDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                                        torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True,
                                         pin_memory=device.type == "cuda")
    rate = 0.0
    for _ in range(2):
        n, t0 = 0, time.perf_counter()
        for x, y in loader:
            x = x.to(device, non_blocking=True).float().div_(255).sub_(0.5).div_(0.5)
            y = y.to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(device):
                loss = loss_fn(model(x).float(), y)
            loss.backward()
            opt.step()
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
    return rate


def taskvec_epoch_rate(base: Path, ds: ImageDataset, batch: int, device: str, work: Path, tag: str,
                       cache: str) -> float:
    cfg = FinetuneConfig(epochs=2, batch_size=batch, lr=1e-4, device=device, val_fraction=0, train="all",
                         image_cache=cache)
    r = finetune(base, ds, work / tag, cfg)
    return float(r.history[-1]["images_per_s"])


def inputs(args: argparse.Namespace) -> tuple[ImageDataset | None, np.ndarray, np.ndarray, list[str]]:
    """(the data set of files or None, its images decoded N×S×S×3, labels, class names)."""
    s = args.img_size
    if args.data is None:
        rng = np.random.default_rng(0)
        return (None, rng.integers(0, 256, (args.images, s, s, 3), dtype=np.uint8),
                (np.arange(args.images) % 2).astype(np.int64), ["0", "1"])
    from taskvec.models.spec import ModelSpec
    from taskvec.training.data import load_data

    root = args.data / "train" if (args.data / "train").is_dir() else args.data
    labels = sorted(d.name for d in root.iterdir() if d.is_dir())
    train = load_data(root, ModelSpec(args.arch, "classification", len(labels), 3, s, labels), val_fraction=0).train
    assert train is not None
    ds = train.subset(np.random.default_rng(0).permutation(len(train))[:args.images].tolist())
    images = np.stack([ds[i][0].permute(1, 2, 0).numpy() for i in range(len(ds))])
    return ds, images, np.asarray(ds.targets, dtype=np.int64), labels


def throughput(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    files, images, labels, names = inputs(args)
    s = args.img_size
    torch.manual_seed(0)
    module, spec = build_base(args.arch, "classification", len(names), 3, s, names)
    base = work / "base.safetensors"
    save_model(module, spec, base)
    ds = files or ImageDataset("classification", 3, s, len(names), list(range(len(images))), labels.tolist(),
                               array=images)
    loops: dict[str, list[float]] = {"bare timm + torch, decoded tensors": []}
    cache = work / "image-cache"
    if files is not None:
        t0 = time.perf_counter()
        cached(files, cache)  # built once, outside the timed epochs, as `finetune` does before its first
        build = time.perf_counter() - t0
        loops |= {"taskvec finetune, image cache": [], "taskvec finetune, decoding files": []}
    else:
        loops["taskvec finetune"] = []
    for i in range(args.repeats):
        for name, rates in loops.items():
            if name.startswith("bare"):
                rates.append(bare_epoch_rate(args.arch, images, labels, args.batch_size, device))
            else:
                setting = "off" if name.endswith("files") else str(cache)
                rates.append(taskvec_epoch_rate(base, ds, args.batch_size, str(device), work, f"run{i}-{len(rates)}"
                                                f"-{setting == 'off'}", setting))
    source = f"{args.data.name}, {len(images)} training images" if args.data else f"{len(images)} random images"
    print(f"\n{args.arch} @ {s}px, batch {args.batch_size}, {source}, {device}, median of {args.repeats} "
          "(second epoch each, the loops interleaved)")
    print("| loop | images/s (median) | all runs | ratio to bare |")
    print("|---|---|---|---|")
    bare = statistics.median(loops["bare timm + torch, decoded tensors"])
    for name, rates in loops.items():
        m = statistics.median(rates)
        print(f"| {name} | {m:.1f} | {', '.join(f'{v:.1f}' for v in rates)} | **{m / bare:.2f}** |")
    if files is not None:
        print(f"\nbuilding the image cache of {len(images)} images took {build:.1f} s (once per data set and size)")
        loader_rates(files, cached(files, cache), args)


def loader_rates(files: ImageDataset, fast: ImageDataset, args: argparse.Namespace) -> None:
    """images/s of taskvec's DataLoader alone (no model), from the cache and from the files, by worker count."""
    from taskvec.training.data import make_loader

    print(f"\n| data loader alone, batch {args.batch_size}, shuffled | workers | images/s (median of "
          f"{args.repeats}) |")
    print("|---|---|---|")
    for workers in sorted({0, os.cpu_count() or 1}):
        for name, ds in (("image cache", fast), ("decoding files", files)):
            rates = []
            for _ in range(args.repeats):
                t0, n = time.perf_counter(), 0
                for x, _ in make_loader(ds, args.batch_size, torch.device("cpu"), shuffle=True, num_workers=workers):
                    n += x.shape[0]
                rates.append(n / (time.perf_counter() - t0))
            print(f"| {name} | {workers} | {statistics.median(rates):.0f} |")


def real(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    sets = [
        ("BreastMNIST", SHARED / "breastmnist" / "breastmnist.npz", "classification", args.real_cls_arch,
         args.real_cls_size, 1, 64),
        ("MoNuSeg", SHARED / "monuseg_256", "segmentation", args.real_seg_arch, 256, 3, 8),
    ]
    print(f"\nepoch time on real data ({device}, median of {args.real_epochs - 1} epochs after the first)")
    print("| data | task | model | img px | batch | train images | train s/epoch | epoch s (with val + ckpt) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, path, task, arch, size, chans, batch in sets:
        if not path.exists():
            print(f"| {name} | absent at {path} | | | | | | |")
            continue
        torch.manual_seed(0)
        module, spec = build_base(arch, task, 2, chans, size)
        base = work / f"{name}.safetensors"
        save_model(module, spec, base)
        t_start = time.perf_counter()
        marks: list[float] = []
        cfg = FinetuneConfig(epochs=args.real_epochs, batch_size=batch, lr=1e-4, device=str(device))
        r = finetune(base, path, work / f"real-{name}", cfg,
                     on_epoch=lambda rec, m=marks: m.append(time.perf_counter()))
        walls = np.diff([t_start, *marks])[1:]
        train_s = statistics.median(h["seconds"] for h in r.history[1:])
        print(f"| {name} | {task} | {arch} | {size} | {batch} | {r.samples} | {train_s:.2f} | "
              f"{statistics.median(walls):.2f} |")


def processes(args: argparse.Namespace, device: torch.device, work: Path) -> None:
    rng = np.random.default_rng(0)
    s, n = args.img_size, args.nproc
    data = work / "bench.npz"
    np.savez(data, train_images=rng.integers(0, 256, (args.images, s, s, 3), dtype=np.uint8),
             train_labels=(np.arange(args.images) % 2).astype(np.int64))
    torch.manual_seed(0)
    module, spec = build_base(args.arch, "classification", 2, 3, s)
    base = work / "base.safetensors"
    save_model(module, spec, base)
    cpu = device.type == "cpu"

    def rate(tag: str, launcher: list[str], threads: int) -> float:
        out = work / tag
        cmd = [*launcher, "-m", "taskvec.cli.app", "finetune", "--base", str(base), "--data", str(data), "--out",
               str(out), "--epochs", "2", "--batch-size", str(args.batch_size), "--val-fraction", "0",
               "--device", device.type]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if cpu else None
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return float(json.loads((out / "metrics.json").read_text())["history"][-1]["images_per_s"])

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"]
    one, many = [], []
    for i in range(args.repeats):
        one.append(rate(f"one{i}", [sys.executable], n))
        many.append(rate(f"many{i}", torchrun, 1))
    m1, mn = statistics.median(one), statistics.median(many)
    unit = f"{n} CPU threads" if cpu else "1 GPU"
    print(f"\n{args.arch} @ {s}px, global batch {args.batch_size}, {args.images} images, {device.type}, "
          f"median of {args.repeats} (second epoch each)")
    print("| run | images/s (median) | all runs |")
    print("|---|---|---|")
    print(f"| 1 process ({unit}) | {m1:.1f} | {', '.join(f'{v:.1f}' for v in one)} |")
    print(f"| {n} processes, torchrun ({'gloo, 1 thread each' if cpu else 'NCCL, 1 GPU each'}) | {mn:.1f} | "
          f"{', '.join(f'{v:.1f}' for v in many)} |")
    print(f"| ratio {n} processes / 1 | {mn / m1:.2f} | |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images", type=int, default=640)
    p.add_argument("--data", type=Path, help="a folder data set (its train/ split when it has one) instead of "
                                             "random images")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--real-only", action="store_true")
    p.add_argument("--skip-real", action="store_true")
    p.add_argument("--real-cls-arch", default="resnet18")
    p.add_argument("--real-cls-size", type=int, default=64)
    p.add_argument("--real-seg-arch", default="resnet18")
    p.add_argument("--real-epochs", type=int, default=4)
    p.add_argument("--nproc", type=int, default=0, help="compare 1 process with N under torchrun (only that)")
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, timm {timm.__version__}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU threads {torch.get_num_threads()}'}")
    print("command: python benchmarks/finetune.py " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory() as tmp:
        if args.nproc:
            processes(args, device, Path(tmp))
            return
        if not args.real_only:
            throughput(args, device, Path(tmp))
        if not args.skip_real:
            real(args, device, Path(tmp))


if __name__ == "__main__":
    main()
