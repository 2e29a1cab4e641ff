"""Two stages under one budget: the statistics head, then DP-SGD from it. Does the body stage pay for its ε?

Per seed, the data are cut into sites as `taskvec simulate` cuts them (`prepare_data`, `site_indices`: the same
test split and sites for the same settings and seed), over one DP-ready base with the shared ImageNet weights.
For each total ε (and without DP):
  stage 1  every site releases `stats-head:P` statistics at ε·`--stats-share` (one `gaussian-sum`); the merger
           solves the head (`lda-head`): version 1;
  stage 2  every site fine-tunes `--train` from version 1 with DP-SGD at a target of ε that includes its
           release in version 1's lineage (`DPConfig.include_lineage`: the noise calibrated so that both
           releases compose to ε, where a target of ε·(1 − share) would compose to less; library defaults
           otherwise); the merger averages the vectors onto version 1 (`mean`) under a budget of ε per image
           (`PrivacyBudget`), which composes each site's two releases (PRV accountant over both): version 2.
Both versions, and each site's own stage-2 model before the merge, are evaluated on the test split (macro
one-vs-rest AUROC and balanced accuracy; the best single site is the one with the highest AUROC); the composed ε
column is the largest site's total as the merge computed it. Without DP both stages run without noise (stage 2
on the library's default schedule). Runs, vectors and merges are kept under `--cache`, so a second run reuses
what the first finished (an interrupted fine-tune resumes from its checkpoint).

Example (PBC, 5 iid sites of about 2,400 images; stage 2 is DP-SGD on every site, hours per ε and seed on CPUs):
  python benchmarks/two_stage.py --data ../shared/data/pbc_blood_cells_128 --sites 5 --num-classes 8 \\
      --labels basophil,eosinophil,erythroblast,ig,lymphocyte,monocyte,neutrophil,platelet --epsilons 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from tables import ms

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def _sites(args: argparse.Namespace, seed: int, out: Path) -> tuple[Path, list[Any], Any]:
    """The base (written once) and the sites' and test data of `seed`, cut as `taskvec simulate` cuts them."""
    from taskvec import build_base, save_model
    from taskvec.simulation.simulate import SimulationConfig, prepare_data
    from taskvec.simulation.sites import site_indices
    from taskvec.training.data import DataSplits
    from taskvec.training.data.cache import cached_splits

    cfg = SimulationConfig(data=str(args.data), out=str(out), sites=args.sites, split=args.split, arch=args.arch,
                           num_classes=args.num_classes, labels=args.labels, in_chans=args.in_chans,
                           img_size=args.img_size, weights=args.weights and str(args.weights), calibrate=False,
                           seed=seed)
    net, spec = build_base(cfg.arch, cfg.task, cfg.num_classes, cfg.in_chans, cfg.img_size, cfg.labels,
                           weights=cfg.weights, dp_compatible=True, seed=seed)
    base = out / "base.safetensors"
    if not base.exists():
        out.mkdir(parents=True, exist_ok=True)
        save_model(net, spec, base, extra={"source": {"pretrained": False, "weights": cfg.weights}})
    pool, test, _, _ = prepare_data(cfg, spec)
    decoded = cached_splits(DataSplits(pool, None, test), "auto")  # decoded once for every run and evaluation
    pool, test = decoded.train or pool, decoded.test or test
    return base, [pool.subset(i.tolist()) for i in site_indices(pool, args.split, args.sites, seed, args.data)], test


def _stage(base: Path, sites: list[Any], out: Path, config: Any, method: str, budget: Any) -> tuple[Path, float | None]:
    """Every site fine-tuned from `base` and exported, the vectors merged: (the merged model, the largest
    composed ε a contributor spent, as the merge computed it)."""
    from taskvec import export_vector, finetune, merge

    vectors = []
    for i, site in enumerate(sites):
        run = finetune(base, site, out / f"site{i}", replace(config, contributor=f"site{i}", seed=config.seed + i))
        vectors.append(out / f"site{i}.vector.safetensors")
        if not vectors[-1].exists():
            export_vector(run.model_path, base, vectors[-1])
    merged = out / "merged.safetensors"
    result = merge(vectors, base, merged, method=method, budget=budget, force=True)
    spent = (result.record.get("privacy_budget") or {}).get("contributors") or {}
    return merged, max(c["epsilon"] for c in spent.values()) if spent else None


def _metrics(model: Path, test: Any, device: str) -> dict[str, float]:
    """Test macro AUROC and balanced accuracy of `model`."""
    from taskvec import evaluate
    from taskvec.training.data import DataSplits

    m = evaluate(model, DataSplits(None, None, test, "test split"), "test", device=device).metrics
    return {"auroc": m["auroc"], "balanced_accuracy": m["balanced_accuracy"]}


def _site_metrics(stage: Path, n: int, test: Any, device: str) -> list[dict[str, float]]:
    """Each site's own stage-2 model (before the merge) on the test split."""
    return [_metrics(stage / f"site{i}" / "model.safetensors", test, device) for i in range(n)]


def one_seed(args: argparse.Namespace, seed: int, root: Path) -> list[dict[str, Any]]:
    """The rows of one seed: per ε, both versions' test metrics and the composed ε (each cached as row.json, so
    a run with more ε reuses the rows it has)."""
    from taskvec import DPConfig, FinetuneConfig, PrivacyBudget
    from taskvec.io.files import write_json

    rows, data = [], None
    for eps in [None, *args.epsilons]:
        out = root / f"seed{seed}" / ("no-dp" if eps is None else f"eps{eps:g}")
        if (out / "row.json").exists():
            row: dict[str, Any] = json.loads((out / "row.json").read_text())
            if "sites" not in row:  # a row cached before the single-site column: its site models are cached too
                data = data or _sites(args, seed, root / f"seed{seed}")
                row["sites"] = _site_metrics(out / "stage2", len(data[1]), data[2], args.device)
                write_json(out / "row.json", row)
            rows.append(row)
            continue
        base, sites, test = data = data or _sites(args, seed, root / f"seed{seed}")

        def dp(target: float, eps: float | None = eps, **kw: Any) -> Any:
            return None if eps is None else DPConfig(max_grad_norm=1.0, delta=args.delta, target_epsilon=target, **kw)

        common = FinetuneConfig(val_fraction=0.0, device=args.device, seed=seed + 10, resume=True)
        budget = None if eps is None else PrivacyBudget(max_epsilon=eps, unit="image")
        v1, _ = _stage(base, sites, out / "stage1", replace(common, train=f"stats-head:{args.stats_dim}",
                                                             dp=dp((eps or 0) * args.stats_share)), "lda-head", None)
        stage2 = replace(common, train=args.train, steps=args.steps, head=args.head,
                         dp=dp(eps or 0, include_lineage=True))
        v2, spent = _stage(v1, sites, out / "stage2", stage2, "mean", budget)
        row = {"epsilon": eps, "spent": spent, "stage1": _metrics(v1, test, args.device),
               "stage2": _metrics(v2, test, args.device),
               "sites": _site_metrics(out / "stage2", len(sites), test, args.device)}
        write_json(out / "row.json", row)
        rows.append(row)
        print(json.dumps({"seed": seed, **row}), file=sys.stderr, flush=True)  # stdout: the table alone
    return rows


def best_site(row: dict[str, Any]) -> dict[str, float]:
    """The single site of a row whose own stage-2 model has the highest AUROC."""
    return max(row["sites"], key=lambda m: m["auroc"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--split", default="iid", help="as `taskvec simulate --split`")
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--weights", type=lambda s: None if s == "none" else Path(s), default=WEIGHTS,
                    help="timm checkpoint of the base (none: random weights, for a smoke test)")
    ap.add_argument("--num-classes", type=int, required=True)
    ap.add_argument("--labels", type=lambda s: s.split(","), default=None)
    ap.add_argument("--in-chans", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--stats-dim", type=int, default=256, help="P of stage 1, `stats-head:P`")
    ap.add_argument("--train", default="norm-bias", help="stage 2's training mode")
    ap.add_argument("--steps", type=int, help="stage 2's optimiser steps (default: the library's schedule)")
    ap.add_argument("--head", default="train", help="stage 2's head strategy, as `finetune --head` (frozen: keep "
                    "stage 1's head, learn features)")
    ap.add_argument("--epsilons", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 3.0, 8.0])
    ap.add_argument("--stats-share", type=float, default=0.375, help="stage 1's share of each total ε")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "two_stage")
    args = ap.parse_args()
    if not 0 < args.stats_share < 1:
        ap.error("--stats-share must be in (0, 1)")
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("cache", "seeds", "epsilons",
                                                                      "device")}
    if args.head == "train":  # the default leaves the key of runs cached before the option unchanged
        del settings["head"]
    root = args.cache / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=1))
    runs = [one_seed(args, seed, root) for seed in args.seeds]
    lines = [f"Two stages under one budget on {args.data.name}: {args.sites} {args.split} sites, {args.arch} at "
             f"{args.img_size} px, stage 1 `stats-head:{args.stats_dim}` at {args.stats_share:g} of ε (merged by "
             f"`lda-head`), stage 2 `{args.train}` DP-SGD from it at the rest"
             f"{'' if args.head == 'train' else f' with head {args.head}'} (merged by `mean`), δ = {args.delta:g}, "
             f"DP per image (add-remove neighbours: stage 1 one `gaussian-sum` release, stage 2 DP-SGD); test macro "
             f"AUROC and balanced accuracy, mean ± sd over seeds {args.seeds}.", "",
             "| ε | composed ε (largest site) | stage 1 AUROC | stage 1 bal. acc. | stage 2 AUROC "
             "| stage 2 bal. acc. | best single site AUROC | best single site bal. acc. |",
             "|---|---|---|---|---|---|---|---|"]
    for i, eps in enumerate([None, *args.epsilons]):
        rows = [r[i] for r in runs]
        best = [best_site(r) for r in rows]
        spent = "–" if eps is None else f"{max(r['spent'] for r in rows):.2f}"
        cells = [ms(v) for m in ([r["stage1"] for r in rows], [r["stage2"] for r in rows], best)
                 for v in ([x["auroc"] for x in m], [x["balanced_accuracy"] for x in m])]
        lines.append(f"| {'∞' if eps is None else f'{eps:g}'} | {spent} | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        lines += ["", "Per seed: the stage-2 merge against that seed's best single site (AUROC / balanced accuracy).",
                  "", "| ε | " + " | ".join(f"seed {s}" for s in args.seeds) + " |", "|---|" + "---|" * len(runs)]
        for i, eps in enumerate([None, *args.epsilons]):
            pairs = [(r[i]["stage2"], best_site(r[i])) for r in runs]
            lines.append(f"| {'∞' if eps is None else f'{eps:g}'} | " + " | ".join(
                f"{m['auroc']:.3f} / {m['balanced_accuracy']:.3f} against {b['auroc']:.3f} / "
                f"{b['balanced_accuracy']:.3f}" for m, b in pairs) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
