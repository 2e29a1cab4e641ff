"""Privacy–utility trade-off on real data: fine-tune without DP and with DP-SGD at several ε, then measure
utility (test AUROC) and leakage (membership-inference attack AUC, members = training images, non-members =
test images of the same source).

Every setting starts from the same DP-ready base (`build_base(..., dp_compatible=True)`) with the same
optimizer, epochs and batch size; DP runs use δ = 1e-5, clipping bound --max-grad-norm and the noise that
reaches ε after the planned epochs. Prints a markdown table and writes it as JSON and a PNG plot. Example:
  python benchmarks/privacy.py --data ../shared/data/breastmnist/breastmnist.npz --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "breastmnist" / "breastmnist.npz"


def run_setting(base: Path, data: Path, work: Path, epsilon: float | None, args: argparse.Namespace,
                seed: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from taskvec.audits.membership import audit_model
    from taskvec.privacy.dpsgd import DPConfig
    from taskvec.training.evaluate import evaluate_model
    from taskvec.training.loop import FinetuneConfig, finetune

    dp = None if epsilon is None else DPConfig(args.max_grad_norm, args.delta, target_epsilon=epsilon)
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch, lr=args.lr, device="cpu", seed=seed, dp=dp,
                         augment=args.augment)
    run_dir = work / f"{'nodp' if epsilon is None else f'eps{epsilon:g}'}-s{seed}"
    t = time.perf_counter()
    r = finetune(base, data, run_dir, cfg)
    seconds = time.perf_counter() - t
    test = evaluate_model(run_dir, data, "test", device="cpu")
    audit = audit_model(run_dir, data, data, members_split="train", non_members_split="test", reference=base)
    ledger = audit["privacy"]
    return {
        "target_epsilon": epsilon, "seed": seed, "epsilon": ledger[0]["epsilon"] if ledger else None,
        "noise_multiplier": ledger[0]["noise_multiplier"] if ledger else None, "steps": r.steps,
        "train_seconds": seconds, "test_auroc": test["auroc"], "test_accuracy": test["accuracy"],
        "attack_auc": audit["attacks"]["loss"]["auc"], "attack_tpr_1pct": audit["attacks"]["loss"]["tpr_at_1pct_fpr"],
        "calibrated_auc": audit["attacks"]["calibrated"]["auc"],
        "calibrated_tpr_1pct": audit["attacks"]["calibrated"]["tpr_at_1pct_fpr"],
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r["target_epsilon"] or math.inf for r in rows})
    labels = ["no DP" if e == math.inf else f"ε={e:g}" for e in settings]

    def mean(key: str, e: float) -> float:
        vals = [r[key] for r in rows if (r["target_epsilon"] or math.inf) == e]
        return sum(vals) / len(vals)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = range(len(settings))
    for key, name, style in [("test_auroc", "test AUROC (utility)", "o-"),
                             ("attack_auc", "loss-attack AUC (leakage)", "s--"),
                             ("calibrated_auc", "calibrated-attack AUC (leakage)", "^:")]:
        ax.plot(xs, [mean(key, e) for e in settings], style, label=name)
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("AUC")
    ax.set_title("BreastMNIST: DP-SGD privacy vs. utility (δ = 1e-5)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--arch", default="test_resnet")
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
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
        torch.manual_seed(0)
        module, spec = build_base(args.arch, num_classes=2, in_chans=1, img_size=args.img_size,
                                  labels=["malignant", "normal_benign"], dp_compatible=True)
        base = work / "base.safetensors"
        save_model(module, spec, base)
        print(f"{args.arch} (DP-ready, random init) at {args.img_size} px, {args.epochs} epochs, batch {args.batch}, "
              f"AdamW lr {args.lr}, augmentation {'on' if args.augment else 'off'}; DP: clip {args.max_grad_norm}, "
              f"δ {args.delta:g}, PRV accountant; data {args.data.name}; members = its train split, non-members = "
              "its test split")
        print("| setting | ε spent | σ | steps | test AUROC | test acc. | loss-attack AUC | TPR@1%FPR "
              "| calibrated AUC | TPR@1%FPR | train s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        eps_list = [None, *sorted((float(e) for e in args.epsilons.split(",")), reverse=True)]
        settings = [(eps, int(seed)) for seed in args.seeds.split(",") for eps in eps_list]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_setting, base, args.data, work, eps, args, seed) for eps, seed in settings]
            for (eps, seed), fut in zip(settings, futures):
                r = fut.result()
                rows.append(r)
                name = "no DP" if eps is None else f"DP ε={eps:g}"
                spent = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
                sigma = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.2f}"
                print(f"| {name} (seed {seed}) | {spent} | {sigma} | {r['steps']} | {r['test_auroc']:.3f} | "
                      f"{r['test_accuracy']:.3f} | {r['attack_auc']:.3f} | {r['attack_tpr_1pct']:.3f} | "
                      f"{r['calibrated_auc']:.3f} | {r['calibrated_tpr_1pct']:.3f} | {r['train_seconds']:.0f} |",
                      flush=True)
    (args.out / "privacy.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows}, indent=1))
    plot(rows, args.out / "privacy.png")
    print(f"wrote {args.out / 'privacy.json'} and {args.out / 'privacy.png'}")


if __name__ == "__main__":
    main()
