"""DP-SGD overhead: time of one training step with DP-SGD (Opacus) against the same step without it.

For each backbone (DP-ready base, as `taskvec init --dp-compatible` builds it) and each Opacus grad-sample
mode, the same fixed batch goes through forward, backward and an AdamW step; modes are interleaved round by
round so they share the machine's state, and the table shows medians and the ratio to non-DP. The fastest
mode overall is `taskvec.privacy.dpsgd.DEFAULT_GRAD_SAMPLE_MODE`. Example:
  python benchmarks/dp_overhead.py --img-size 64 --batch 16 --repeats 7

With `--train MODES` it compares training modes instead (`finetune --train`), on one backbone with the DP-ready
conversion a pretrained base gets (frozen BatchNorm statistics), DP-SGD with hooks against the same mode
without DP, and gives DP-SGD images per second (`--device cuda` on a GPU), e.g.:
  python benchmarks/dp_overhead.py --archs tf_efficientnet_lite0 --train all,head,norm-bias,lora:8
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Any

import torch
from torch import nn

ARCHS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "convnext_atto", "convnext_tiny", "resnet18",
         "resnet50"]
MODES = ["none", "hooks", "functorch"]


def make_step(arch: str, mode: str, img_size: int, batch: int, train: str | None = None, device: str = "cpu") -> Any:
    """A closure running one training step on a fixed batch (DP-SGD unless mode is 'none') on `device`; `train`
    selects a training mode on a frozen-BatchNorm base (else: every parameter, the default DP-ready conversion)."""
    from torch.utils.data import DataLoader, TensorDataset

    from taskvec.models.spec import build_base
    from taskvec.privacy.dpsgd import DPConfig, make_private
    from taskvec.training.modes import parse_mode

    torch.manual_seed(0)
    model, _ = build_base(arch, num_classes=2, img_size=img_size, dp_compatible=True,
                          dp_norm="frozen-batchnorm" if train else None)
    if train:
        model, _ = parse_mode(train).prepare(model, "classification")
    model.to(device).train()
    opt: Any = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 2, (batch,))
    if mode != "none":
        data = DataLoader(TensorDataset(x, y), batch_size=batch)
        cfg = DPConfig(1.0, 1e-5, noise_multiplier=1.0, grad_sample_mode=mode, seed=0)
        model, opt, _, _ = make_private(model, opt, data, cfg, steps=1)
    x, y = x.to(device), y.to(device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def median_ms(steps: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median time per step of each closure, after 2 warm-up steps, interleaved round by round."""
    for s in steps.values():
        for _ in range(2):
            s()
    times: dict[str, list[float]] = {m: [] for m in steps}
    for _ in range(repeats):
        for m, s in steps.items():
            t = time.perf_counter()
            s()
            times[m].append(time.perf_counter() - t)
    return {m: statistics.median(v) * 1e3 for m, v in times.items()}


def compare_modes(arch: str, modes: list[str], args: Any) -> None:
    print(f"| {arch} (frozen BatchNorm) | trained params | no DP ms | DP ms | DP × | DP images/s |")
    print("|---|---|---|---|---|---|")
    for train in modes:
        from taskvec.models.spec import build_base
        from taskvec.training.modes import parse_mode

        net = parse_mode(train).prepare(build_base(arch, num_classes=2, img_size=args.img_size)[0],
                                        "classification")[0]
        n = sum(p.numel() for p in net.parameters() if p.requires_grad)
        med = median_ms({m: make_step(arch, m, args.img_size, args.batch, train, args.device)
                         for m in ("none", "hooks")}, args.repeats)
        print(f"| {train} | {n:,} | {med['none']:.0f} | {med['hooks']:.0f} | {med['hooks'] / med['none']:.2f} | "
              f"{args.batch / med['hooks'] * 1e3:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", default=None, help="compare these training modes (comma-separated) instead")
    ap.add_argument("--device", default="cpu", help="device of the --train comparison (e.g. cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import opacus

    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    print(f"torch {torch.__version__}, Opacus {opacus.__version__}, {where}, batch {args.batch} at {args.img_size} px, "
          f"median of {args.repeats} steps (after 2 warm-up steps)\n")
    if args.train:
        for arch in args.archs.split(","):
            compare_modes(arch, args.train.split(","), args)
        return
    print(f"| {'backbone':<22} | {'params':>7} | {'no DP ms':>8} | {'hooks ms':>8} | {'functorch ms':>12} "
          f"| {'hooks ×':>7} | {'functorch ×':>11} | best |")
    print("|" + "|".join("-" * w for w in (24, 9, 10, 10, 14, 9, 13, 6)) + "|")
    for arch in args.archs.split(","):
        med = median_ms({m: make_step(arch, m, args.img_size, args.batch) for m in MODES}, args.repeats)
        from taskvec.models.spec import build_base

        n = sum(p.numel() for p in build_base(arch, num_classes=2, img_size=args.img_size)[0].parameters())
        best = min(("hooks", "functorch"), key=lambda m: med[m])
        print(f"| {arch:<22} | {n / 1e6:>6.1f}M | {med['none']:>8.0f} | {med['hooks']:>8.0f} | "
              f"{med['functorch']:>12.0f} | {med['hooks'] / med['none']:>7.2f} | "
              f"{med['functorch'] / med['none']:>11.2f} | {best} |", flush=True)


if __name__ == "__main__":
    main()
