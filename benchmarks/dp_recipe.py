"""What DP-SGD costs one site, recipe by recipe: test metrics of a site fine-tuned without DP and with DP-SGD at
a target ε, with the shared pretrained tf_efficientnet_lite0, over seeds (mean ± sd).

Each seed builds the base (seeded, as `taskvec simulate` does), cuts the training split into `--sites` sites as
`simulate --split` does, and fine-tunes site `--site` alone with every recipe; every run is evaluated on the test
split (AUROC: binary, or macro one-vs-rest; balanced accuracy). A recipe is `name:key=value,...` over
FinetuneConfig fields (`dp.KEY` for DPConfig fields, `eps` for the target ε, `eps=none` for no DP); the defaults
are `finetune`'s. Each finished run's row is kept under `--cache` (keyed by the settings and the recipe's text,
not by the code or the data's content: give another `--cache` after changing either), so a second run reuses it
and an interrupted fine-tune resumes from its checkpoint. Examples:
  # BreastMNIST, site 0 of 3 iid sites, 32 px (the defaults)
  OMP_NUM_THREADS=1 python benchmarks/dp_recipe.py --seeds 0,1,2 --recipes 'no-dp:eps=none' 'dp:eps=8'
  # PBC blood cells, site 0 of 5 iid sites (about 2,150 training images), 64 px
  python benchmarks/dp_recipe.py --data ../shared/data/pbc_blood_cells_128 --in-chans 3 --num-classes 8 \\
      --labels basophil,eosinophil,erythroblast,ig,lymphocyte,monocyte,neutrophil,platelet --sites 5 \\
      --img-size 64 --seeds 0 --recipes 'no-dp:eps=none' 'dp:eps=8' 'clip-only:dp.noise_multiplier=0.001'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from tables import ms

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


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


def _site(args: argparse.Namespace, seed: int, work: Path) -> tuple[Path, Any, Any]:
    """The seeded base (written once) and site `--site`'s and the test data of `seed`, decoded once."""
    from taskvec.models.spec import build_base, save_model
    from taskvec.simulation.sites import site_indices
    from taskvec.training.data import DataSplits, load_data
    from taskvec.training.data.cache import cached_splits

    module, spec = build_base(args.arch, num_classes=args.num_classes, in_chans=args.in_chans,
                              img_size=args.img_size, labels=args.labels, weights=args.weights, dp_compatible=True,
                              seed=seed, zero_head=args.head == "zero")
    base = work / f"base{seed}.safetensors"
    if not base.exists():
        work.mkdir(parents=True, exist_ok=True)
        save_model(module, spec, base)
    splits = load_data(args.data, spec, img_size=args.img_size, val_fraction=0.0, seed=seed)
    assert splits.train is not None and splits.test is not None
    site = splits.train.subset(site_indices(splits.train, args.split, args.sites, seed, args.data)[args.site].tolist())
    decoded = cached_splits(DataSplits(site, None, splits.test), "auto")
    return base, decoded.train or site, DataSplits(None, None, decoded.test or splits.test, source="test")


def run(seed: int, recipes: list[str], args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    """Each recipe's row for `seed`: test AUROC and balanced accuracy, steps, noise multiplier (and seconds,
    kept in the cache only: this machine's other work makes them noisy)."""
    from taskvec.io.files import write_json
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.training.evaluate import evaluate_model
    from taskvec.training.loop import FinetuneConfig, finetune

    data: tuple[Path, Any, Any] | None = None
    out: dict[str, dict[str, Any]] = {}
    for text in recipes:
        name, fields, dp_fields, eps = parse_recipe(text)
        folder = root / f"seed{seed}" / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
        if (folder / "row.json").exists():
            out[name] = json.loads((folder / "row.json").read_text())
            continue
        base, site, test = data = data or _site(args, seed, root)
        dp_fields = {"max_grad_norm": 1.0, "delta": 1e-5, **dp_fields}
        dp = None if eps is None else DPConfig(**dp_fields,
                                               target_epsilon=None if "noise_multiplier" in dp_fields else eps)
        cfg = replace(FinetuneConfig(train=args.train, seed=seed + 10, val_fraction=0.0, device=args.device, dp=dp,
                                     resume=True), **fields)
        t0 = time.perf_counter()
        res = finetune(base, site, folder / "run", cfg)
        metrics = evaluate_model(res.model_path, test, "test", device=args.device).metrics
        ledger = json.loads((folder / "run" / "metrics.json").read_text()).get("privacy") or [{}]
        row = {"recipe": text, "auroc": metrics["auroc"], "balanced_accuracy": metrics["balanced_accuracy"],
               "steps": res.steps, "noise_multiplier": ledger[-1].get("noise_multiplier"),
               "epsilon": ledger[-1].get("epsilon"), "seconds": time.perf_counter() - t0}
        write_json(folder / "row.json", row)
        out[name] = row
        print(json.dumps({"seed": seed, **row}), file=sys.stderr, flush=True)  # stdout: the table alone
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(SHARED / "data/breastmnist/breastmnist.npz"))
    p.add_argument("--weights", type=lambda s: None if s == "none" else s,
                   default=str(SHARED / "weights/tf_efficientnet_lite0.in1k.safetensors"), help="or none: random")
    p.add_argument("--arch", default="tf_efficientnet_lite0")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--labels", type=lambda s: s.split(","), default=["malignant", "normal_benign"])
    p.add_argument("--sites", type=int, default=3, help="sites the training split is cut into")
    p.add_argument("--split", default="iid", help="as `taskvec simulate --split`")
    p.add_argument("--site", type=int, default=0, help="the site that fine-tunes")
    p.add_argument("--train", default="norm-bias")
    p.add_argument("--head", choices=["random", "zero"], default="zero", help="the base's new head (default: zero)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--recipes", nargs="+", default=["no-dp:eps=none", "dp:eps=8"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "dp_recipe")
    args = p.parse_args()
    if not 0 <= args.site < args.sites:
        p.error(f"--site must be in [0, {args.sites})")
    names = [r.partition(":")[0] for r in args.recipes]
    if len(set(names)) != len(names):
        p.error("--recipes: give each recipe its own name")
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("cache", "seeds", "recipes", "device")}
    root = args.cache / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    results = {s: run(s, args.recipes, args, root) for s in seeds}
    over = f"mean ± sd over seeds {args.seeds}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"Site {args.site} of {args.sites} {args.split} sites of {Path(args.data).name}, `--train {args.train}`, "
          f"{args.arch} at {args.img_size} px, δ = 1e-5, DP per image (add-remove); test AUROC and balanced "
          f"accuracy of the site's model, {over}.\n\n"
          "| recipe | steps | noise multiplier | AUROC | balanced accuracy |\n|---|---|---|---|---|")
    for text in args.recipes:
        rows = [results[s][text.partition(":")[0]] for s in seeds]
        z = rows[0]["noise_multiplier"]
        print(f"| `{text}` | {rows[0]['steps']} | {'–' if z is None else f'{z:.3g}'} | "
              f"{ms([r['auroc'] for r in rows])} | {ms([r['balanced_accuracy'] for r in rows])} |")


if __name__ == "__main__":
    main()
