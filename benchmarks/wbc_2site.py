"""Cross-site generalisation on two real white-blood-cell sources: each site alone, their merge, centralised.

Data: ../shared/data/wbc_2site, two natural sources as the two sites (jiangxi_tecom, 300 images of about
120 px; cellavision_blog, 100 images of 300 px); `cells.csv` gives each image's cell type (5 classes), the masks
its pixels' classes (background, cytoplasm, nucleus). Each source keeps a test part of its own: an image is in
it when the keyed hash of its path (as `cells.csv` names it) and the seed falls in a `--test-fraction` share
(`taskvec.training.data.hold_out`, the same rule a site's validation split follows), so the split is the same
for every method and both tasks, and new with each seed; the rest is the site's training part (no validation
split). Per seed and task: one base, the real ImageNet `tf_efficientnet_lite0` (../shared/weights), DP-ready
(frozen BatchNorm statistics) for the runs with and without DP alike, as `taskvec simulate` builds it; each site
fine-tunes on its training part (`taskvec.finetune`), exports its vector (`export_vector`), the two vectors are
merged (`merge`: `mean`; the statistics head: `ridge-head`), and a centralised run trains on both training parts
(as many example gradients as the two sites' runs together, as `taskvec simulate` does). Every model is
evaluated (`taskvec.evaluate`) on both sources' test parts.

- Classification at `--img-size` px (`norm-bias`, and the statistics head `stats-head:P`): macro one-vs-rest
  AUROC and balanced accuracy over the 5 types, as taskvec's metrics define them: a class absent from a test part
  (basophils are 1 of 300 and 3 of 100 images) has no AUROC and no recall there and is left out of both means.
- Segmentation at `--seg-img-size` px: an smp U-Net over the same lite0 encoder and weights (`norm-bias`); Dice
  and Jaccard of nucleus and cytoplasm, each over the pixels of the whole test part.
- DP at `--epsilon` (δ = `--delta`, unit: image): DP-SGD with clip 1.0 (the CLI's default) and `DPConfig`'s
  defaults otherwise (sampling rate 0.25, no augmentation multiplicity, 100 steps unless `--steps` is given);
  the statistics head makes its one Gaussian release instead. Without DP: the default schedule (10 epochs and at
  least 200 steps) unless `--steps`.

Runs, vectors and merges are kept under `--cache` by settings, so a second run reuses what the first finished.
Example:
  python docs/results/capture.py wbc-2site -- nice -n 10 python benchmarks/wbc_2site.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import tables

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
SEG_LABELS = ["background", "cytoplasm", "nucleus"]
SEG_CLASSES = ("nucleus", "cytoplasm")
DECODERS = {"unet": "U-Net", "fpn": "FPN"}


def sites(task: str, args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    """Each source's images for `spec` (image ids relative to the data folder, as `cells.csv` names them)."""
    from taskvec.training.data import load_data

    if task == "classification":
        data = load_data(args.data / "cells.csv", spec, val_fraction=0).get("train")
        names = [i.split("/")[0] for i in data.image_ids()]
        return {s: data.subset([i for i, n in enumerate(names) if n == s]) for s in dict.fromkeys(names)}
    found = sorted(p.name for p in args.data.iterdir() if (p / "masks").is_dir())
    return {s: replace(load_data(args.data / s, spec, val_fraction=0).get("train"), root=str(args.data)) for s in found}


def test_split(ds: Any, args: argparse.Namespace, seed: int) -> tuple[Any, Any]:
    """(training part, test part) of one source: the keyed hold-out of `--test-fraction` at `seed`."""
    from taskvec.training.data import hold_out

    train, test = hold_out(ds, args.test_fraction, seed)
    if test is None:
        sys.exit(f"wbc_2site: no image fell in the {args.test_fraction:g} test share at seed {seed}")
    return train, test


def cells_column(args: argparse.Namespace, name: str) -> list[str]:
    """One column of `cells.csv`, row by row."""
    import csv

    with (args.data / "cells.csv").open(newline="") as f:
        return [row[name] for row in csv.DictReader(f)]


def class_labels(args: argparse.Namespace) -> list[str]:
    return sorted(set(cells_column(args, "label")))


def make_base(task: str, args: argparse.Namespace, seed: int, path: Path, decoder: str) -> Any:
    from taskvec import build_base, model_spec, save_model

    if not path.exists():
        labels = class_labels(args) if task == "classification" else SEG_LABELS
        size = args.img_size if task == "classification" else args.seg_img_size
        net, spec = build_base("tf_efficientnet_lite0", task, len(labels), img_size=size, labels=labels,
                               weights=WEIGHTS, dp_compatible=True, decoder=decoder, seed=seed)
        save_model(net, spec, path, extra={"source": {"pretrained": False, "weights": str(WEIGHTS)}})
    return model_spec(path)


def one_variant(task: str, mode: str, eps: float | None, decoder: str, seed: int, args: argparse.Namespace,
                out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {test source: metrics}} of one training variant and seed (cached in `out/results.json`)."""
    from taskvec import DPConfig, FinetuneConfig, evaluate, export_vector, finetune, merge
    from taskvec.simulation.simulate import central_steps
    from taskvec.training.data import DataSplits

    done = out / "results.json"
    if done.exists():
        return json.loads(done.read_text())  # type: ignore[no-any-return]
    out.mkdir(parents=True, exist_ok=True)
    base = out.parent / ("base.safetensors" if decoder == "unet" else f"base-{decoder}.safetensors")
    spec = make_base(task, args, seed, base, decoder)
    parts = {s: test_split(ds, args, seed) for s, ds in sites(task, args, spec).items()}
    steps = args.steps if task == "classification" else args.seg_steps
    dp = None if eps is None else DPConfig(max_grad_norm=1.0, delta=args.delta, target_epsilon=eps)
    one_pass = mode.startswith("stats-head")
    config = FinetuneConfig(steps=None if one_pass else steps, train=mode, val_fraction=0.0, device="cpu",
                            seed=seed, resume=True, dp=dp)
    models, vectors = {}, []
    for i, (site, (train, _)) in enumerate(parts.items()):
        run = finetune(base, DataSplits(train, None, None, f"{site} training part"), out / site,
                       replace(config, contributor=site, seed=seed + 10 + i))
        models[site] = run.model_path
        vectors.append(out / f"{site}.vector.safetensors")
        if not vectors[-1].exists():
            export_vector(run.model_path, base, vectors[-1], contributor=site)
    merged = out / "merged.safetensors"
    if not merged.exists():
        merge(vectors, base, merged, method=("ridge-head" if task == "classification" else "lda-head") if one_pass
              else "mean")
    models["merged"] = merged
    trains = [t for t, _ in parts.values()]
    union = trains[0].concat(trains[1])
    central = replace(config, contributor="centralised", steps=central_steps([len(t) for t in trains], config))
    models["centralised"] = finetune(base, DataSplits(union, None, None, "both training parts"), out / "central",
                                     central).model_path
    results = {name: {site: evaluate(path, DataSplits(None, None, test, f"{site} test part"), "test",
                                     device="cpu").metrics for site, (_, test) in parts.items()}
               for name, path in models.items()}
    done.write_text(json.dumps(results))
    return results


def split_summary(args: argparse.Namespace) -> list[str]:
    """A table of each source's training and test parts per seed (and the classes in each test part)."""
    from taskvec.models.spec import ModelSpec

    labels = class_labels(args)
    spec = ModelSpec("tf_efficientnet_lite0", "classification", len(labels), img_size=args.img_size, labels=labels)
    lines = ["| source | seed | training images | test images | test images per class (" + ", ".join(labels)
             + ") |", "|---|---|---|---|---|"]
    for seed in args.seeds:
        for site, ds in sites("classification", args, spec).items():
            train, test = test_split(ds, args, seed)
            per_class = [test.targets.count(c) for c in range(len(labels))]
            lines.append(f"| {site} | {seed} | {len(train)} | {len(test)} | {' / '.join(map(str, per_class))} |")
    return lines


def ms(values: list[float | None]) -> str:
    xs = [v for v in values if v is not None]
    if not xs:
        return "n/a"
    text = tables.ms(xs)
    return text if len(xs) == len(values) else f"{text} ({len(xs)} of {len(values)} seeds)"


def metric_columns(task: str) -> list[tuple[str, Any]]:
    """(column name, metrics → value) of a task's table, per test source."""
    if task == "classification":
        return [("AUROC", lambda m: m["auroc"]), ("bal. acc.", lambda m: m["balanced_accuracy"])]
    return [(f"{c} {k}", lambda m, c=c, k=k: m["per_class"][c][k.lower()])
            for c in SEG_CLASSES for k in ("Dice", "Jaccard")]


def table(task: str, variants: list[tuple[str, float | None, str]], args: argparse.Namespace, root: Path
          ) -> list[str]:
    cols = metric_columns(task)
    rows, names = [], None
    for mode, eps, decoder in variants:
        folder = f"{mode}-eps{eps}" + ("" if decoder == "unet" else f"-{decoder}")
        runs = [one_variant(task, mode, eps, decoder, seed, args, root / task / f"seed{seed}" / folder)
                for seed in args.seeds]
        label = mode if task == "classification" else f"{mode}, {DECODERS[decoder]}"
        names = [s for s in dict.fromkeys(cells_column(args, "site")) if s in runs[0]["merged"]]
        for model in [*names, "merged", "centralised"]:
            cells = [ms([f(r[model][site]) for r in runs]) for site in names for _, f in cols]
            rows.append(f"| {label} | {'∞' if eps is None else f'{eps:g}'} | {model} | " + " | ".join(cells) + " |")
            print(rows[-1], file=sys.stderr, flush=True)  # progress
    assert names is not None
    head = [f"{c} on {site}" for site in names for c, _ in cols]
    return ["| training | ε | model | " + " | ".join(head) + " |", "|" + "---|" * (3 + len(head)), *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED / "data" / "wbc_2site")
    ap.add_argument("--cache", type=Path, default=ROOT / ".cache" / "wbc_2site")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--test-fraction", type=float, default=0.3)
    ap.add_argument("--img-size", type=int, default=64, help="classification input size")
    ap.add_argument("--seg-img-size", type=int, default=64, help="segmentation input size")
    ap.add_argument("--steps", type=int, help="classification optimiser steps (default: the library's schedule)")
    ap.add_argument("--seg-steps", type=int, help="segmentation optimiser steps (default: the library's schedule)")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--stats-dim", type=int, default=128, help="P of the statistics head, `stats-head:P`")
    ap.add_argument("--tasks", default="classification,segmentation")
    args = ap.parse_args()
    if len(args.seeds) < 2:
        ap.error("--seeds: give at least two (the tables are mean ± sd)")
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("cache", "seeds", "tasks")}
    root = args.cache / hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root.mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(settings, indent=1))
    steps = {t: getattr(args, s) for t, s in (("classification", "steps"), ("segmentation", "seg_steps"))}
    schedule = "; ".join(f"{t} runs: " + ("the library's default schedule" if n is None else
                                          f"{n} optimiser steps (fewer than the library's default schedule)")
                         for t, n in steps.items())
    lines = [f"Cross-site generalisation, two real sources of white-blood-cell images as two sites "
             f"(wbc_2site: jiangxi_tecom, cellavision_blog; each with a {args.test_fraction:.0%} keyed test part), "
             f"each site alone, their merge and centralised training, evaluated on both test parts; "
             f"tf_efficientnet_lite0 (ImageNet weights), classification of 5 cell types at {args.img_size} px, "
             f"segmentation at {args.seg_img_size} px (smp U-Net or FPN decoder); without DP and at "
             f"ε = {args.epsilon:g} (δ = {args.delta:g}, per image, add-remove neighbours: DP-SGD for norm-bias, one "
             f"`gaussian-sum` release for the statistics head); one DP-ready base (frozen BatchNorm statistics) per "
             f"seed, task and decoder for every row; {schedule}; mean ± sd over seeds {args.seeds}.", ""]
    tasks = args.tasks.split(",")
    eps = [None, args.epsilon]
    if "classification" in tasks:
        lines += ["## Classification", "", "Macro one-vs-rest AUROC and balanced accuracy over the cell types "
                  "present in each test part (merge: `mean` for norm-bias, `ridge-head` for the statistics head).",
                  "", *table("classification", [("norm-bias", e, "unet") for e in eps]
                             + [(f"stats-head:{args.stats_dim}", e, "unet") for e in eps], args, root), ""]
    if "segmentation" in tasks:
        lines += ["## Segmentation", "", "Dice and Jaccard of nucleus and cytoplasm (merge: `mean` for norm-bias; "
                  "`lda-head` for the per-pixel statistics head, which keeps the base's decoder as initialised).", "",
                  *table("segmentation", [(m, e, d) for m, d in (("norm-bias", "unet"), ("norm-bias", "fpn"),
                                                                 (f"stats-head:{args.stats_dim}", "fpn")) for e in eps],
                         args, root), ""]
    lines += ["## Test parts", "", *split_summary(args), ""]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
