"""Privacy–utility trade-off on real data: fine-tune each training mode without DP and with DP at several ε
(DP-SGD; `class-means`: its one Gaussian release), then measure utility (test AUROC) and leakage
(membership-inference attack AUC, members = training images, non-members = test images of the same source).

Every setting starts from the same DP-ready base (`build_base(..., dp_compatible=True)`, the shared pretrained
tf_efficientnet_lite0 by default, seeded) with `finetune`'s defaults per mode unless --epochs/--batch/--lr are
given; DP runs use δ = 1e-5, clipping bound --max-grad-norm and the noise that reaches ε. Prints a markdown table
and writes it as JSON and a PNG plot. Example (the table in docs/results):
  python benchmarks/privacy.py --train class-means,norm-bias --seeds 0,1,2 --jobs 2 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
DEFAULT_DATA = SHARED / "data" / "breastmnist" / "breastmnist.npz"
DEFAULT_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def run_setting(base: Path, data: Path, work: Path, mode: str, epsilon: float | None, args: argparse.Namespace,
                seed: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from taskvec.audits.membership import audit_model
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.training.evaluate import evaluate_model
    from taskvec.training.loop import FinetuneConfig, finetune

    dp = None if epsilon is None else DPConfig(args.max_grad_norm, args.delta, target_epsilon=epsilon)
    batch = args.batch if dp is None else None  # DP-SGD samples each unit at a public rate instead
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=batch, lr=args.lr, device="cpu", seed=seed, dp=dp,
                         augment=args.augment, train=mode)
    run_dir = work / f"{mode}-{'nodp' if epsilon is None else f'eps{epsilon:g}'}-s{seed}"
    t = time.perf_counter()
    r = finetune(base, data, run_dir, cfg)
    seconds = time.perf_counter() - t
    test = evaluate_model(run_dir, data, "test", device="cpu").metrics
    audit = audit_model(run_dir, data, data, members_split="train", non_members_split="test", reference=base)
    ledger = audit["privacy"]
    return {
        "mode": mode, "target_epsilon": epsilon, "seed": seed, "epsilon": ledger[0]["epsilon"] if ledger else None,
        "noise_multiplier": ledger[0]["noise_multiplier"] if ledger else None, "steps": r.steps,
        "train_seconds": seconds, "test_auroc": test["auroc"], "test_accuracy": test["accuracy"],
        "attack_auc": audit["attacks"]["loss"]["auc"], "attack_tpr_1pct": audit["attacks"]["loss"]["tpr_at_1pct_fpr"],
        "calibrated_auc": audit["attacks"]["calibrated"]["auc"],
        "calibrated_tpr_1pct": audit["attacks"]["calibrated"]["tpr_at_1pct_fpr"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown row per (mode, ε): mean ± sd over the seeds."""
    keys = [("test_auroc", 3), ("test_accuracy", 3), ("attack_auc", 3), ("attack_tpr_1pct", 3), ("calibrated_auc", 3),
            ("train_seconds", 0)]
    lines = ["| mode | setting | seeds | ε spent | σ | steps | test AUROC | test acc. | loss-attack AUC | TPR@1%FPR "
             "| calibrated AUC | train s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, eps in dict.fromkeys((r["mode"], r["target_epsilon"]) for r in rows):
        sel = [r for r in rows if (r["mode"], r["target_epsilon"]) == (mode, eps)]
        cells = []
        for key, digits in keys:
            vals = [r[key] for r in sel]
            sd = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 and digits else ""
            cells.append(f"{statistics.mean(vals):.{digits}f}{sd}")
        spent = "∞" if sel[0]["epsilon"] is None else f"{max(r['epsilon'] for r in sel):.2f}"
        sigma = "-" if sel[0]["noise_multiplier"] is None else f"{sel[0]['noise_multiplier']:.2f}"
        name = "no DP" if eps is None else f"DP ε={eps:g}"
        lines.append(f"| `{mode}` | {name} | {len(sel)} | {spent} | {sigma} | {sel[0]['steps']} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["target_epsilon"] or math.inf for r in rows})
    labels = ["no DP" if e == math.inf else f"ε={e:g}" for e in settings]

    def stats(key: str, mode: str, e: float) -> tuple[float, float]:
        vals = [r[key] for r in rows if r["mode"] == mode and (r["target_epsilon"] or math.inf) == e]
        return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    xs = range(len(settings))
    for mode, colour in zip(dict.fromkeys(r["mode"] for r in rows), ("C0", "C1", "C2", "C3")):
        for key, name, style in [("test_auroc", "test AUROC", "o-"), ("attack_auc", "loss-attack AUC", "s--")]:
            m, sd = zip(*(stats(key, mode, e) for e in settings))
            ax.errorbar(xs, m, yerr=sd, fmt=style, color=colour, capsize=3, label=f"{mode}: {name}")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("AUC")
    ax.set_title("BreastMNIST: privacy vs. utility per mode (δ = 1e-5)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="timm checkpoint ('none': random init)")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--train", default="class-means,norm-bias", help="training modes, comma-separated")
    ap.add_argument("--epochs", type=int, default=None, help="default: finetune's schedule per mode")
    ap.add_argument("--batch", type=int, default=None, help="runs without DP (DP-SGD: Poisson at q)")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per job")
    ap.add_argument("--jobs", type=int, default=4, help="settings trained side by side, one process each")
    ap.add_argument("--augment", action=argparse.BooleanOptionalAction, default=False,
                    help="flips/rotations (off: the overfitting regime where membership leaks)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    from taskvec.models.spec import build_base, save_model

    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        weights = None if str(args.weights) == "none" else args.weights
        eps_list = [None, *sorted((float(e) for e in args.epsilons.split(",")), reverse=True)]
        seeds = [int(s) for s in args.seeds.split(",")]
        bases = {}
        for seed in seeds:  # each seed its own base (its new head), as `simulate` builds them
            module, spec = build_base(args.arch, num_classes=2, in_chans=1, img_size=args.img_size,
                                      labels=["malignant", "normal_benign"], weights=weights, dp_compatible=True,
                                      seed=seed)
            bases[seed] = work / f"base{seed}.safetensors"
            save_model(module, spec, bases[seed])
        print(f"{args.arch} ({'pretrained' if weights else 'random init'}, DP-ready) at {args.img_size} px, "
              f"finetune's schedule per mode{'' if args.epochs is None else f', {args.epochs} epochs'}, augmentation "
              f"{'on' if args.augment else 'off'}; DP: clip {args.max_grad_norm}, δ {args.delta:g}; data "
              f"{args.data.name} (all {args.data.name} training images); members = its train split, non-members = "
              "its test split\n")
        settings = [(mode, eps, seed) for mode in args.train.split(",") for eps in eps_list for seed in seeds]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_setting, bases[seed], args.data, work, mode, eps, args, seed)
                       for mode, eps, seed in settings]
            for (mode, eps, seed), fut in zip(settings, futures):
                rows.append(fut.result())
                print(f"done: {mode} ε {eps} seed {seed}", flush=True)
        print(table(rows))
    (args.out / "privacy.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=1))
    plot(rows, args.out / "privacy.png")
    print(f"wrote {args.out / 'privacy.json'} and {args.out / 'privacy.png'}")


if __name__ == "__main__":
    main()
