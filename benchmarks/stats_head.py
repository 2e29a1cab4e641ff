"""Statistics heads vs class means on PBC blood cells, merged vs single sites vs centralised, with and without DP.

The pretrained `tf_efficientnet_lite0` (../shared/weights) at `--img-size` px (64 by default), DP-ready as
`taskvec simulate` builds it, extracts every image's pooled feature once (cached per base identity and image
set under `--cache`). Each method then works on those features with the library's own functions:
- the statistics heads sum `taskvec.training.sufficient` statistics over the sites and solve once (what an
  `lda-head` or `ridge-head` merge of `stats-head:P` vectors does, for each P of `--stats-dims`), with the
  projection seeded from the backbone's identity as a `stats-head:P` run seeds it;
- class means fits each site's head with `taskvec.training.class_means` and merges by the mean of the heads
  (what a `mean` merge of `class-means` vectors does).
Under DP each site makes the statistics head's release at ε as its run would (δ = `--delta`, the noise
multiplier its run would calibrate; the centre, then the statistics centred on it), units are images;
"centralised" is one site holding every training image (one release at ε under DP). Sites
(`taskvec.simulation.splits`): 5 iid, or 5 with class proportions Dirichlet(0.5). Test split: macro one-vs-rest
AUROC and balanced accuracy, mean ± sd over `--seeds` (each seed: a new split and new noise; single sites: the
mean over the 5, and the one with the highest AUROC).
`--per-class P` prints each class's test recall under the merged and centralised LDA heads instead.
Example:
  python docs/results/capture.py stats-head-pbc -- nice -n 10 python benchmarks/stats_head.py
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tables import ms
from torchmetrics.functional.classification import multiclass_auroc, multiclass_recall

from taskvec.io.files import read_header, read_kind
from taskvec.merging.heads import backbone_identity
from taskvec.models.spec import ModelSpec, build_base, load_model, save_model
from taskvec.privacy.dpsgd import DPConfig
from taskvec.privacy.mechanisms.gaussian_sum import release_noise
from taskvec.simulation.splits import split_dirichlet, split_iid
from taskvec.training import sufficient
from taskvec.training.class_means import head_from_sums, unit_vectors
from taskvec.training.data import Normalizer, load_data, make_loader
from taskvec.training.modes.base import head_names

ROOT = Path(__file__).resolve().parents[2] / "shared"
Fit = Callable[..., tuple[np.ndarray, np.ndarray]]  # (parts, ε, args=, rng=) -> (W, b)


def features(args: argparse.Namespace) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """(features, labels) of the train and test splits, cached per (base identity, image set), and the
    backbone's identity (what a `stats-head:P` run seeds its projection from)."""
    args.cache.mkdir(parents=True, exist_ok=True)
    base = args.cache / f"base-{args.img_size}.safetensors"
    if not base.exists():  # as `taskvec simulate` builds it: DP-ready (frozen BatchNorm statistics)
        labels = sorted(d.name for d in (args.data / "train").iterdir() if d.is_dir())
        net, spec = build_base("tf_efficientnet_lite0", num_classes=len(labels), img_size=args.img_size,
                               labels=labels, weights=ROOT / "weights" / "tf_efficientnet_lite0.in1k.safetensors",
                               dp_compatible=True)
        save_model(net, spec, base)
    identity = read_kind(base, "model").model.identity
    spec = ModelSpec.from_dict(read_kind(base, "model").model.model)
    model: Any = load_model(base, "cpu").eval()
    backbone = backbone_identity(read_header(base), head_names(model, "classification"))
    splits = load_data(args.data, spec)
    out = {}
    for name in ("train", "test"):
        data = getattr(splits, name)
        key = hashlib.sha256(f"{identity}:{args.img_size}:{sorted(map(str, data.sources))}".encode()).hexdigest()
        path = args.cache / f"{name}-{key[:16]}.npz"
        if not path.exists():
            norm, feats = Normalizer(spec, torch.device("cpu")), []
            with torch.no_grad():
                for x, _ in make_loader(data, 128, torch.device("cpu")):
                    feats.append(model.forward_head(model.forward_features(norm(x)), pre_logits=True).double().numpy())
            np.savez(path, feats=np.concatenate(feats), labels=np.asarray(data.targets))
        f = np.load(path)
        out[name] = (f["feats"], f["labels"])
    return out, backbone


CLEAN: dict[tuple[int, int], tuple[np.ndarray, dict[str, np.ndarray]]] = {}


def clean_statistics(f: np.ndarray, y: np.ndarray, proj: np.ndarray) -> dict[str, np.ndarray]:
    """A site's statistics without DP, computed once per feature array and P (the array kept alive with them,
    so that its id stays its own)."""
    key = (id(f), proj.shape[0])
    if key not in CLEAN:
        CLEAN[key] = (f, sufficient.contributions(f, y.tolist(), np.ones(len(y)), 8, proj, None))
    return CLEAN[key][1]


def site_pass(f: np.ndarray, y: np.ndarray) -> sufficient.Pass:
    """A pass over one site's cached features (each image weighs 1), as a run's pass over its images."""
    return lambda part: part(f, y.tolist(), np.ones(len(y)))


def stats_head(parts: list[tuple[np.ndarray, np.ndarray]], eps: float | None, solver: str, dim: int,
               args: argparse.Namespace, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The head solved once from the sum of the sites' statistics (each released once at ε)."""
    d = parts[0][0].shape[1]
    p = min(d, dim)
    proj = sufficient.projection(None if p == d else sufficient.projection_seed(args.backbone, d, p), d, p)
    std = None
    if eps is None:
        released = [clean_statistics(f, y, proj) for f, y in parts]
    else:  # the run's two releases (centre, then the statistics centred on it), as `stats-head:P` makes them
        z = release_noise(DPConfig(max_grad_norm=1.0, delta=args.delta, target_epsilon=eps), "feature statistics")[0]
        runs = [sufficient.dp_release(site_pass(f, y), z, sufficient.clip_bound(d, p), 8, proj, rng.standard_normal)
                for f, y in parts]
        released = [r[0] for r in runs]
        std = {k: math.sqrt(sum(r[1][k] ** 2 for r in runs)) for k in sufficient.KEYS}  # of the sum, as merged
    total = {k: np.sum([r[k] for r in released], axis=0) for k in sufficient.KEYS}
    strength = sufficient.DEFAULT_SHRINK if solver == "lda" else sufficient.DEFAULT_RIDGE
    return sufficient.SOLVERS[solver](total, proj, strength, std)


def class_means(parts: list[tuple[np.ndarray, np.ndarray]], eps: float | None, args: argparse.Namespace,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The mean of the sites' class-means heads (each released once at ε)."""
    heads = []
    clip = args.clip_cm if eps is not None else 1.0
    dp = DPConfig(max_grad_norm=clip, delta=args.delta, target_epsilon=eps) if eps else None
    z = release_noise(dp, "class-means")[0] if dp else 0.0
    for f, y in parts:
        rows = unit_vectors(torch.from_numpy(f), clip)
        table = torch.zeros(8, f.shape[1] + 1, dtype=torch.float64)
        table.index_add_(0, torch.from_numpy(y).long(), rows[:, :-1])
        log_norms = rows[:, -1].sum()
        if eps is not None:
            noise = torch.from_numpy(rng.standard_normal(table.numel() + 1)) * z * clip
            table += noise[:-1].view_as(table)
            log_norms = log_norms + noise[-1]
        w, b = head_from_sums(table, log_norms, clip, z)
        heads.append((w.double().numpy(), b.double().numpy()))
    return np.mean([h[0] for h in heads], 0), np.mean([h[1] for h in heads], 0)


def scores(head: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    logits = torch.from_numpy(test[0] @ head[0].T + head[1])
    y = torch.from_numpy(test[1]).long()
    return (float(multiclass_auroc(logits, y, 8, average="macro")),
            float(multiclass_recall(logits.argmax(1), y, 8, average="macro")))


def per_class(args: argparse.Namespace, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              epsilons: list[float | None]) -> list[str]:
    """Each class's test recall under the merged (iid sites) and centralised LDA head at P = `--per-class`."""
    names = sorted(d.name for d in (args.data / "train").iterdir() if d.is_dir())
    fit = partial(stats_head, solver="lda", dim=args.per_class, args=args)
    y = torch.from_numpy(test[1]).long()
    cells: dict[tuple[str, float | None], list[np.ndarray]] = {}
    for seed in range(args.seeds):
        parts = [(train[0][i], train[1][i]) for i in split_iid(len(train[1]), args.sites, seed)]
        for eps in epsilons:
            for where, data in (("merged", parts), ("centralised", [train])):
                if where == "centralised" and eps is None:
                    continue  # without DP the merged head is the centralised one
                weight, bias = fit(data, eps, rng=np.random.default_rng(seed))
                logits = torch.from_numpy(test[0] @ weight.T + bias)
                recall = multiclass_recall(logits.argmax(1), y, 8, average=None)
                cells.setdefault((where, eps), []).append(recall.double().numpy())
    label = {None: "no DP"} | {e: f"ε = {e:g}" for e in epsilons if e is not None}
    keys = sorted(cells, key=lambda k: (k[0] != "merged", -math.inf if k[1] is None else -k[1]))
    lines = [f"Test recall of each class, LDA head at P = {args.per_class} from the statistics of {args.sites} iid "
             f"sites (merged) or of one site holding every training image (centralised), PBC blood cells, "
             f"tf_efficientnet_lite0 at {args.img_size} px, δ = {args.delta:g}, per image; mean ± sd over "
             f"{args.seeds} seeds (the mean of the rows is the balanced accuracy).", "",
             "| class | training images | " + " | ".join(f"{w} {label[e]}" for w, e in keys) + " |",
             "|" + "---|" * (len(keys) + 2)]
    for k, name in enumerate(names):
        lines.append(f"| {name} | {int((train[1] == k).sum()):,} | "
                     + " | ".join(ms([r[k] for r in cells[key]]) for key in keys) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "pbc_blood_cells_128")
    ap.add_argument("--cache", type=Path, default=Path(".cache/stats_head"))
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--epsilons", default="1,3,8,inf")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip-cm", type=float, default=1.0, help="clip of class means' unit vectors")
    ap.add_argument("--stats-dims", default="64,128,256", help="P of the LDA heads (the ridge head: the middle one)")
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--per-class", type=int, metavar="P",
                    help="print only each class's recall under the merged and centralised LDA head at this P")
    args = ap.parse_args()
    feats, args.backbone = features(args)
    train, test = feats["train"], feats["test"]
    epsilons = [None if e == "inf" else float(e) for e in args.epsilons.split(",")]
    if args.per_class:
        print("\n".join(per_class(args, train, test, epsilons)))
        return
    dims = [int(p) for p in args.stats_dims.split(",")]
    methods: list[tuple[str, Fit]] = [(f"LDA head, P = {p}", partial(stats_head, solver="lda", dim=p)) for p in dims]
    mid = dims[len(dims) // 2]
    methods += [(f"ridge head, P = {mid}", partial(stats_head, solver="ridge", dim=mid)), ("class means", class_means)]
    lines = [f"Statistics heads (`stats-head:P` merged by `lda-head` or `ridge-head`) vs class means (clip "
             f"{args.clip_cm:g}), PBC blood cells, tf_efficientnet_lite0 (ImageNet) at {args.img_size} px, "
             f"{args.sites} sites; under DP each site (and the centralised one) makes one `gaussian-sum` release at "
             f"ε (a statistics head's: its centre, then the statistics centred on it), δ = {args.delta:g}, per image "
             f"(add-remove neighbours); test macro AUROC / balanced accuracy, mean ± sd over {args.seeds} seeds. "
             f"Without DP a statistics head's merged and centralised rows do not depend on the split: the summed "
             f"statistics are those of the pooled data.", "",
             "| split | method | ε | merged AUROC | merged bal. acc. | single sites' mean AUROC | single sites' mean "
             "bal. acc. | best single site AUROC | best single site bal. acc. | centralised AUROC | centralised bal. "
             "acc. |", "|" + "---|" * 11]
    for split, alpha in (("iid", None), ("Dirichlet 0.5", 0.5)):
        CLEAN.clear()
        sites = [[(train[0][i], train[1][i]) for i in (
            split_iid(len(train[1]), args.sites, seed) if alpha is None
            else split_dirichlet(train[1].tolist(), args.sites, alpha, seed))] for seed in range(args.seeds)]
        for name, fit in methods:
            for eps in epsilons:
                cells: dict[str, list[tuple[float, float]]] = {"merged": [], "single": [], "best": [],
                                                               "central": []}
                for seed, parts in enumerate(sites):
                    rng = np.random.default_rng(seed)
                    cells["merged"].append(scores(fit(parts, eps, args=args, rng=rng), test))
                    single = [scores(fit([p], eps, args=args, rng=rng), test) for p in parts]
                    cells["single"].append(tuple(np.mean(single, 0)))  # type: ignore[arg-type]
                    cells["best"].append(max(single))  # by AUROC
                    cells["central"].append(scores(fit([train], eps, args=args, rng=rng), test))

                row = [ms([c[i] for c in cells[k]]) for k in ("merged", "single", "best", "central") for i in (0, 1)]
                lines.append(f"| {split} | {name} | {'∞' if eps is None else f'{eps:g}'} | " + " | ".join(row) + " |")
                print(lines[-1], file=sys.stderr, flush=True)  # progress
    print("\n".join(lines))


if __name__ == "__main__":
    main()
