"""What DP-SGD costs one site, recipe by recipe: test AUROC of a site fine-tuned without DP and with DP-SGD at a
target ε, on BreastMNIST with the shared pretrained tf_efficientnet_lite0, over seeds (mean ± sd).

Each seed builds the base (seeded, as `taskvec simulate` does), splits the training images into 3 iid sites as
`simulate --split iid` does, and fine-tunes site 0 alone with every recipe; every run is evaluated on the test
split. A recipe is `name:key=value,...` over FinetuneConfig fields (`dp.KEY` for DPConfig fields, `eps` for the
target ε, `eps=none` for no DP); the defaults are `finetune`'s. Example (the table in docs/results):
  OMP_NUM_THREADS=1 python benchmarks/dp_recipe.py --seeds 0,1,2 --recipes 'no-dp:eps=none' 'dp:eps=8'
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2] / "shared"


def parse_recipe(text: str) -> tuple[str, dict[str, Any], dict[str, Any], float | None]:
    """`name:key=value,...` → (name, FinetuneConfig fields, DPConfig fields, target ε or None)."""
    name, _, body = text.partition(":")
    fields: dict[str, Any] = {}
    dp: dict[str, Any] = {}
    eps: float | None = 8.0
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        parsed: Any = value
        for cast in (int, float):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        if key == "eps":
            eps = None if value == "none" else float(value)
        elif key.startswith("dp."):
            dp[key[3:]] = parsed
        else:
            fields[key] = parsed
    return name, fields, dp, eps


def run(seed: int, recipes: list[str], args: argparse.Namespace, work: Path) -> dict[str, float]:
    from taskvec.models.spec import build_base, save_model
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.simulation.splits import split_sites
    from taskvec.training.data import DataSplits, load_data
    from taskvec.training.evaluate import evaluate_model
    from taskvec.training.loop import FinetuneConfig, finetune

    module, spec = build_base(args.arch, num_classes=2, in_chans=1, img_size=args.img_size,
                              labels=["malignant", "normal_benign"], weights=args.weights, dp_compatible=True,
                              seed=seed, zero_head=args.head == "zero")
    base = work / f"base{seed}.safetensors"
    save_model(module, spec, base)
    splits = load_data(args.data, spec, img_size=args.img_size, val_fraction=0.0, seed=seed)
    assert splits.train is not None and splits.test is not None
    sites = split_sites("iid", 3, seed, labels=splits.train.targets, n=len(splits.train))
    site = splits.train.subset(sites[0].tolist())
    test = DataSplits(None, None, splits.test, source="test")
    out: dict[str, float] = {}
    for text in recipes:
        name, fields, dp_fields, eps = parse_recipe(text)
        dp_fields = {"max_grad_norm": 1.0, "delta": 1e-5, **dp_fields}
        dp = None if eps is None else DPConfig(**dp_fields,
                                               target_epsilon=None if "noise_multiplier" in dp_fields else eps)
        cfg = replace(FinetuneConfig(train=args.train, seed=seed + 10, val_fraction=0.0, device="cpu", dp=dp),
                      **fields)
        t0 = time.perf_counter()
        res = finetune(base, site, work / f"{name}-{seed}", cfg)
        auroc = evaluate_model(res.model_path, test, "test", device="cpu").metrics["auroc"]
        out[name] = auroc
        print(f"seed {seed} {name}: auroc {auroc:.3f}, {res.steps} steps, {time.perf_counter() - t0:.0f} s",
              flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT / "data/breastmnist/breastmnist.npz"))
    p.add_argument("--weights", default=str(ROOT / "weights/tf_efficientnet_lite0.in1k.safetensors"))
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--train", default="norm-bias")
    p.add_argument("--head", choices=["random", "zero"], default="zero", help="the base's new head (default: zero)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipes", nargs="+", default=["no-dp:eps=none", "dp:eps=8"])
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(s, args.recipes, args, Path(tmp)) for s in seeds]
    print(f"\nsite 0 of 3 iid sites, --train {args.train}, {args.img_size} px; test AUROC, mean ± sd over seeds "
          f"{args.seeds}\n\n| recipe | AUROC |\n|---|---|")
    for text in args.recipes:
        name = text.partition(":")[0]
        v = [r[name] for r in results]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| `{text}` | {statistics.mean(v):.3f} ± {sd:.3f} |")


if __name__ == "__main__":
    main()
