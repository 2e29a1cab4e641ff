"""DP-SGD overhead: time of one training step with DP-SGD (Opacus) against the same step without it.

For each backbone (DP-ready base, as `taskvec init --dp-compatible` builds it) and each Opacus grad-sample
mode, the same fixed batch goes through forward, backward and an AdamW step; modes are interleaved round by
round so they share the machine's state, and the table shows medians and the ratio to non-DP. The fastest
mode overall is `taskvec.privacy.dpsgd.DEFAULT_GRAD_SAMPLE_MODE`. Example:
  python benchmarks/dp_overhead.py --img-size 64 --batch 16 --repeats 7
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


def make_step(arch: str, mode: str, img_size: int, batch: int) -> Any:
    """A closure running one training step on a fixed batch (DP-SGD unless mode is 'none')."""
    from torch.utils.data import DataLoader, TensorDataset

    from taskvec.models.spec import build_base
    from taskvec.privacy.dpsgd import DPConfig, make_private

    torch.manual_seed(0)
    model, _ = build_base(arch, num_classes=2, img_size=img_size, dp_compatible=True)
    model.train()
    opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 2, (batch,))
    if mode != "none":
        data = DataLoader(TensorDataset(x, y), batch_size=batch)
        cfg = DPConfig(1.0, 1e-5, noise_multiplier=1.0, grad_sample_mode=mode, seed=0)
        model, opt, _, _ = make_private(model, opt, data, cfg, epochs=1)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} at {args.img_size} px, "
          f"median of {args.repeats} steps (after 2 warm-up steps)")
    print(f"| {'backbone':<22} | {'params':>7} | {'no DP ms':>8} | {'hooks ms':>8} | {'functorch ms':>12} "
          f"| {'hooks ×':>7} | {'functorch ×':>11} | best |")
    print("|" + "|".join("-" * w for w in (24, 9, 10, 10, 14, 9, 13, 6)) + "|")
    for arch in args.archs.split(","):
        steps = {m: make_step(arch, m, args.img_size, args.batch) for m in MODES}
        for s in steps.values():
            for _ in range(2):
                s()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.repeats):
            for m, s in steps.items():
                t = time.perf_counter()
                s()
                times[m].append(time.perf_counter() - t)
        med = {m: statistics.median(v) * 1e3 for m, v in times.items()}
        from taskvec.models.spec import build_base

        n = sum(p.numel() for p in build_base(arch, num_classes=2, img_size=args.img_size)[0].parameters())
        best = min(("hooks", "functorch"), key=lambda m: med[m])
        print(f"| {arch:<22} | {n / 1e6:>6.1f}M | {med['none']:>8.0f} | {med['hooks']:>8.0f} | "
              f"{med['functorch']:>12.0f} | {med['hooks'] / med['none']:>7.2f} | "
              f"{med['functorch'] / med['none']:>11.2f} | {best} |", flush=True)


if __name__ == "__main__":
    main()
