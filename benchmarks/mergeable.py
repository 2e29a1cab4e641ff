"""Do the site-side training options make one-shot vectors merge better under label skew?

For each option (none, `prox` μ, each `head` strategy) a `taskvec simulate` on BreastMNIST: sites with
Dirichlet label skew, the pretrained `tf_efficientnet_lite0` from ../shared/weights, every site and the
centralised run trained with that option; then one row per option with the mean ± sd over seeds of test AUROC:
the best single site (per seed), every merge, and centralised training. Resumable (finished runs are reused).

Usage (about 5 CPU minutes per option and seed with the defaults):
  OMP_NUM_THREADS=1 python benchmarks/mergeable.py --out mergeable [--seeds 0,1,2] [--options none,prox:10,frozen]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from taskvec.simulation.simulate import SimulationConfig, simulate_seeds

SHARED = Path(__file__).resolve().parents[2] / "shared"
OPTIONS = ["none", "prox:1", "prox:10", "prox:100", "frozen", "balanced", "lp-ft"]


def option_settings(option: str) -> dict[str, object]:
    """`none`, `prox:MU` or a head strategy → the SimulationConfig fields it sets."""
    if option == "none":
        return {}
    if option.startswith("prox:"):
        return {"prox": float(option.partition(":")[2])}
    return {"head": option}


def _mean_sd(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


def summarize(out: Path, options: list[str], seeds: list[int]) -> str:
    """One markdown row per option: best single site, each merge, centralised (mean ± sd over seeds)."""
    per_option: dict[str, dict[str, list[float]]] = {}
    for option in options:
        cols: dict[str, list[float]] = {}
        for seed in seeds:
            rows = json.loads((out / option / f"seed{seed}" / "results.json").read_text())["rows"]
            cols.setdefault("best single site", []).append(max(r["value"] for r in rows if r["group"] == "local"))
            for r in rows:
                if r["group"] in ("merged", "calibrated", "centralised"):
                    cols.setdefault(r["name"], []).append(r["value"])
        per_option[option] = cols
    names = list(next(iter(per_option.values())))
    names.remove("centralised")
    lines = [f"| option | {' | '.join(names)} | centralised | best merge − best site |",
             "|---|" + "---|" * (len(names) + 2)]
    for option, cols in per_option.items():
        merges = [n for n in names if n != "best single site"]
        best = max(merges, key=lambda n: float(np.mean(cols[n])))
        gap = np.asarray(cols[best]) - np.asarray(cols["best single site"])
        lines.append(f"| {option} | " + " | ".join(_mean_sd(cols[n]) for n in names)
                     + f" | {_mean_sd(cols['centralised'])} | {gap.mean():+.3f} ({best}) |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default=str(SHARED / "data" / "breastmnist" / "breastmnist.npz"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"))
    p.add_argument("--options", default=",".join(OPTIONS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--split", default="dirichlet:0.5")
    p.add_argument("--train", default="norm-bias")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--methods", default="weighted,ties")
    p.add_argument("--summary-only", action="store_true", help="Only print the table of finished runs.")
    a = p.parse_args()
    options, seeds = a.options.split(","), [int(s) for s in a.seeds.split(",")]
    if not a.summary_only:
        for option in options:
            cfg = SimulationConfig(
                data=a.data, out=str(a.out / option), sites=a.sites, split=a.split, arch="tf_efficientnet_lite0",
                weights=a.weights, in_chans=1, img_size=32, labels=["malignant", "normal_benign"], train=a.train,
                epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, methods=a.methods.split(","), device="cpu",
                **option_settings(option),  # type: ignore[arg-type]
            )
            simulate_seeds(cfg, seeds, progress=lambda s, o=option: print(f"[{o}] {s}", flush=True))
    print(f"test AUROC (156 images), {a.sites} sites {a.split}, train {a.train}, {a.epochs} epochs at batch "
          f"{a.batch_size}, seeds {a.seeds}: mean ± sd over seeds\n")
    print(summarize(a.out, options, seeds))


if __name__ == "__main__":
    main()
