"""taskvec against Flower FedAvg on the same sites, base, local recipe and evaluation, with and without DP.

Sites are cut exactly as `taskvec simulate` cuts them (`taskvec.simulation.simulate`: the data's train split,
its val split as the merger's validation share, its test split for every evaluation), `--sites` sites per
split rule of `--splits` and seed of `--seeds`. Every local fine-tune of every arm is
`taskvec.training.loop.finetune` from the current model file with the same settings (`--epochs` local epochs,
the base's default training mode: `norm-bias` for pretrained weights) and site/round seeds as
`taskvec.simulation.rounds` uses (seed + 10 + site + 100 × round); every model is evaluated by
`taskvec.training.evaluate.evaluate_model` on the same test split (macro one-vs-rest AUROC).

Arms:
- taskvec one-shot: each site fine-tunes the base once, the vectors merged by each of `--methods`
  (`taskvec.simulation.simulate.simulate`; `+cal`: calibrated on the validation share, unless `--no-calibrate`);
- taskvec asynchronous rounds (`simulate --rounds R`): every site arrives R times, re-basing on the newest
  version, merged (mean, staleness-weighted) every `--buffer` arrivals (default: the number of sites);
- taskvec statistics head: `stats-head:P` vectors (one forward pass, no gradient) merged by `lda-head`;
- Flower FedAvg (`flwr.serverapp.strategy.FedAvg`) for R rounds: each round every site fine-tunes the global
  model (a Flower `ClientApp` whose train function calls `finetune`) and sends back the tensors its training
  mode trains; the strategy averages them weighted by the sites' image counts. The strategy runs in this
  process through an in-process `Grid` that hands each message to the `ClientApp` (no network, no Ray).

Clock. A site of relative speed s needs s time units per local fine-tune; `--slow F` makes the last site F
times slower than the others. A synchronous FedAvg round ends when its slowest site does (round r at
r·max(s)); taskvec's asynchronous versions are published when the schedule says
(`taskvec.simulation.schedule`: no site waits); a one-shot merge and the statistics head need every site's
first (and only) upload, max(s) (for the statistics head an upper bound: its sites make one forward pass).
Gradient passes: site-epochs summed over all sites and rounds (the statistics head: 0). Uploads: models (or
vectors) each site sends, on average.

DP, at the same ε per site (δ = `--delta`) for every arm of each ε in `--epsilons`:
- taskvec one-shot: DP-SGD at ε (unit: image, add/remove neighbours), one release per site;
- taskvec rounds: every arrival DP-SGD at the noise multiplier that makes R arrivals compose to ε (Opacus PRV
  accountant over all R·T steps); the merges report the composed ε;
- taskvec statistics head: the statistics released once at ε (unit: image);
- Flower + DP-SGD: every client fine-tune DP-SGD at that same noise multiplier, so R rounds compose to ε per
  site (unit: image);
- Flower client-level DP: `DifferentialPrivacyClientSideFixedClipping` + `fixedclipping_mod`: each site's update
  clipped to `--client-clip` (L2), Gaussian noise on the unweighted mean; noise multiplier z·√R with z
  one Gaussian release's at ε (analytic Gaussian), so R rounds compose to ε (unit: a whole site). The noise is
  drawn from numpy's generator seeded per seed (reproducible; a deployment draws it secretly).
Every fine-tune, with DP-SGD or without, makes `--epochs` epochs (under DP-SGD an epoch is ⌊1/q⌋ = 4 Poisson
steps at sampling rate q = 0.25, taskvec's default).

Everything is kept under `--out` and reused when the command runs again with the same settings (finished
fine-tunes, simulations and Flower runs). `--images-per-site` and `--test-images` subsample the data (a fixed
random subset written as a folder of links) for a reduced run. Mean ± sd over seeds.
Examples:
  nice -n 10 python benchmarks/vs_flower.py                 # the full grid
  python benchmarks/vs_flower.py --smoke                    # one tiny round of each arm (seconds)
Flower (`pip install flwr`) pins older typer/rich/protobuf than taskvec's development environment: run this in
an environment of its own (`python -m venv V && V/bin/pip install flwr -e .`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from tables import ms

from taskvec.errors import OutputExistsError, TaskvecError
from taskvec.io.files import read_kind, write_json
from taskvec.models.spec import ModelSpec, create_module, save_model
from taskvec.privacy.accounting import (
    calibrate_noise,
    composed_noise_multiplier,
    dp_sgd_epsilon,
    epsilon_spent,
    gaussian_epsilon,
    gaussian_noise_multiplier,
)
from taskvec.privacy.dpsgd import DPConfig
from taskvec.simulation.simulate import SimulationConfig, evaluate_row, open_simulation, prepare_data, simulate
from taskvec.simulation.sites import data_spec, site_indices
from taskvec.training.data import ImageDataset
from taskvec.training.loop import FinetuneConfig, finetune
from taskvec.training.schedule import plan_steps

ROOT = Path(__file__).resolve().parents[2] / "shared"
Row = dict[str, Any]


# ---------------------------------------------------------------- data


def subsample(data: Path, out: Path, train: int | None, val: int | None, test: int | None, seed: int = 0) -> Path:
    """`data` (an image folder with train/val/test class folders) itself, or a fixed random subset of it written
    as links under `out`: `train`, `val` and `test` images of those splits (None: all)."""
    if train is None and test is None:
        return data
    target = out / f"data-{train}-{val}-{test}"
    if (target / "done").exists():
        return target
    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val), ("test", test)):
        files = sorted(p for p in (data / split).glob("*/*") if p.is_file())
        keep = files if n is None or n >= len(files) else [files[i] for i in sorted(rng.choice(len(files), n, False))]
        for f in keep:
            link = target / split / f.parent.name / f.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(f.resolve())
    (target / "done").write_text("")
    return target


# ---------------------------------------------------------------- taskvec arms


def taskvec_arms(args: argparse.Namespace, data: Path, split: str, seed: int, out: Path) -> dict[str, Any]:
    """Run (or reuse) the taskvec simulations of one split and seed; their rows, the base and the run config."""
    labels = data_spec(data).labels  # the data's classes, as `taskvec split` reads them
    common = dict(data=str(data), task="classification", sites=args.sites, split=split, arch=args.arch,
                  num_classes=len(labels), labels=labels, img_size=args.img_size, weights=str(args.weights),
                  epochs=args.epochs, seed=seed, device=args.device, delta=args.delta)
    speeds = [1.0] * (args.sites - 1) + [args.slow]
    oneshot = SimulationConfig(out=str(out / "oneshot"), methods=args.methods, calibrate=args.calibrate,
                               epsilons=args.epsilons, **common)
    rounds = SimulationConfig(out=str(out / "rounds"), methods=["mean"], calibrate=False, rounds=args.rounds,
                              speeds=speeds, buffer=args.buffer,
                              epsilons=[per_arrival_epsilon(args, e) for e in args.epsilons], **common)
    stats = SimulationConfig(out=str(out / "stats"), methods=["lda-head"], train=f"stats-head:{args.stats_dim}",
                             calibrate=False, epsilons=args.epsilons, **{**common, "epochs": None})  # one pass
    results = {}
    for name, cfg in (("oneshot", oneshot), ("rounds", rounds), ("stats", stats)):
        if name == "rounds":  # its runs without DP are the one-shot simulation's: reuse them
            link_runs(Path(oneshot.out), open_simulation(cfg), ["base.safetensors", "sites", "centralised"])
        say = lambda s, n=name: print(f"  [{n}] {s}", file=sys.stderr, flush=True)  # noqa: E731
        results[name] = simulate(cfg, progress=say).rows
    train_cfg = FinetuneConfig(epochs=args.epochs, img_size=args.img_size, device=args.device, seed=seed,
                               resume=True, val_fraction=0.0).for_base(True)
    return {"rows": results, "base": Path(oneshot.out) / "base.safetensors", "config": oneshot,
            "train": train_cfg, "speeds": speeds}


def link_runs(src: Path, dst: Path, names: list[str]) -> None:
    """Hard-link the finished runs `names` of simulation `src` into simulation `dst` (where absent), so that
    `dst` reuses them instead of training them again."""
    for name in names:
        for f in [src / name] if (src / name).is_file() else (src / name).rglob("*"):
            target = dst / f.relative_to(src)
            if f.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, target)


def dp_steps(args: argparse.Namespace) -> tuple[float, int]:
    """(sampling rate, steps) of one DP-SGD fine-tune."""
    cfg = FinetuneConfig(epochs=args.epochs, dp=DPConfig(max_grad_norm=1.0, delta=args.delta, target_epsilon=1.0))
    assert cfg.dp is not None
    return cfg.dp.sample_rate, plan_steps(cfg)[0]


def round_noise(args: argparse.Namespace, eps: float) -> float:
    """DP-SGD noise multiplier at which `--rounds` fine-tunes of one site compose to `eps`."""
    q, steps = dp_steps(args)
    return _calibrated(eps, args.delta, q, args.rounds * steps)


@functools.cache
def _calibrated(eps: float, delta: float, q: float, steps: int) -> float:
    return calibrate_noise(eps, delta, q, steps)


def per_arrival_epsilon(args: argparse.Namespace, eps: float) -> float:
    """The target ε of one fine-tune at `round_noise` (what `simulate` takes per run)."""
    q, steps = dp_steps(args)
    return round(epsilon_spent(round_noise(args, eps), q, steps, args.delta)[0], 4)


# ---------------------------------------------------------------- Flower arm


def local_grid(app: Any, contexts: dict[int, Any]) -> Any:
    """A Flower `Grid` in this process: every message goes straight to the `ClientApp` of its node (by its
    context), one after another."""
    from flwr.app import Message
    from flwr.serverapp import Grid

    class LocalGrid(Grid):
        def __init__(self) -> None:
            self._run: Any = None

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                           ttl: float | None = None) -> Any:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> list[int]:
            return sorted(contexts)

        def push_messages(self, messages: Any) -> list[str]:
            raise NotImplementedError("LocalGrid answers in send_and_receive")

        def pull_messages(self, message_ids: Any) -> list[Any]:
            raise NotImplementedError("LocalGrid answers in send_and_receive")

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
            replies = []
            for i, msg in enumerate(sorted(messages, key=lambda m: m.metadata.dst_node_id)):
                msg.metadata.__dict__["_message_id"] = f"{msg.metadata.group_id}-{i}"
                replies.append(app(msg, contexts[msg.metadata.dst_node_id]))
            return replies

    return LocalGrid()


def flower_arm(name: str, root: Path, base: Path, sites: list[ImageDataset], test: ImageDataset,
               run_cfg: FinetuneConfig, rounds: int, seed: int, client_dp: tuple[float, float] | None,
               eps: float | None) -> list[Row]:
    """Flower FedAvg for `rounds` rounds into `root`; one row per round. `client_dp` (noise multiplier, clip):
    Flower's client-side fixed clipping with uniform weights. Reused when `root/rows.json` exists."""
    import torch
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.torch import load_file

    done, record = root / "rows.json", root / "settings.json"
    settings = json.loads(json.dumps({"rounds": rounds, "seed": seed, "client_dp": client_dp, "sites": len(sites),
                                      "finetune": asdict(run_cfg)}, default=str))
    if record.exists() and json.loads(record.read_text()) != settings:
        raise OutputExistsError(f"{root}: holds a Flower run with other settings; choose another --out", path=root)
    if done.exists():
        return list(json.loads(done.read_text()))
    root.mkdir(parents=True, exist_ok=True)
    write_json(record, settings)
    header = read_kind(base, "model").model
    spec = ModelSpec.from_dict(header.model)
    base_state = load_file(str(base))
    keys = run_cfg.mode.trainable_names(create_module(spec), spec.task)  # what a site trains and sends

    def model_file(arrays: Any, path: Path) -> Path:
        if not path.exists():
            state = dict(base_state)
            for k in keys:
                state[k] = torch.from_numpy(np.ascontiguousarray(arrays[k].numpy())).to(base_state[k].dtype)
            save_model(state, spec, path, extra={"source": header.source})
        return path

    app = ClientApp(mods=[fixedclipping_mod] if client_dp else [])
    norms: list[float] = []

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, rnd = int(context.node_config["partition-id"]), int(msg.content["config"]["server-round"])
        start = model_file(msg.content["arrays"], root / f"global-r{rnd - 1}.safetensors")
        run = finetune(start, sites[site], root / f"site{site}-r{rnd}",
                       replace(run_cfg, contributor=f"site{site}", seed=run_cfg.seed + 10 + site + 100 * (rnd - 1)))
        trained, given = load_file(str(run.model_path)), load_file(str(start))
        norms.append(float(sum(((trained[k] - given[k]).double() ** 2).sum() for k in keys) ** 0.5))
        arrays = ArrayRecord({k: Array(trained[k].numpy()) for k in keys})
        weight = 1 if client_dp else len(sites[site])  # client-level DP's sensitivity assumes uniform weights
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": weight})}),
                       reply_to=msg)

    rows: list[Row] = []

    def evaluate(rnd: int, arrays: ArrayRecord) -> MetricRecord:
        if rnd > 0:
            path = model_file(arrays, root / f"global-r{rnd}.safetensors")
            rows.append(evaluate_row(f"{name}-r{rnd}", "flower", path, test, eps, "fedavg", {"round": rnd}))
        return MetricRecord({})

    strategy: Any = FedAvg(fraction_evaluate=0.0, min_train_nodes=len(sites), min_available_nodes=len(sites))
    if client_dp:
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, client_dp[0], client_dp[1], len(sites))
    contexts = {i + 1: Context(run_id=1, node_id=i + 1, node_config={"partition-id": i}, state=RecordDict(),
                               run_config={}) for i in range(len(sites))}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0  # the ServerApp's
    random.seed(seed)
    np.random.seed(seed)  # Flower's DP noise (np.random.normal)
    initial = ArrayRecord({k: Array(base_state[k].numpy()) for k in keys})
    strategy.start(local_grid(app, contexts), initial, num_rounds=rounds, evaluate_fn=evaluate)
    for r in rows:
        r["update_norms"] = norms[(r["round"] - 1) * len(sites):r["round"] * len(sites)]
    write_json(done, rows)
    return rows


def flower_arms(args: argparse.Namespace, tv: dict[str, Any], out: Path) -> dict[str, list[Row]]:
    """Every Flower arm of one split and seed, on the sites the taskvec simulation used."""
    cfg: SimulationConfig = tv["config"]
    spec = ModelSpec.from_dict(read_kind(tv["base"], "model").model.model)
    pool, test, _, _ = prepare_data(cfg, spec)
    sites = [pool.subset(idx.tolist()) for idx in site_indices(pool, cfg.split, cfg.sites, cfg.seed, cfg.data)]
    run_cfg: FinetuneConfig = tv["train"]
    arms = {"flower": flower_arm("fedavg", out / "fedavg", tv["base"], sites, test, run_cfg, args.rounds,
                                 cfg.seed, None, None)}
    for eps in args.epsilons:
        z = round_noise(args, eps)
        dp_cfg = replace(run_cfg, dp=DPConfig(max_grad_norm=cfg.max_grad_norm, delta=args.delta, noise_multiplier=z))
        arms[f"flower-dpsgd-{eps:g}"] = flower_arm(f"fedavg+dpsgd-eps{eps:g}", out / f"fedavg-dpsgd-eps{eps:g}",
                                                   tv["base"], sites, test, dp_cfg, args.rounds, cfg.seed, None, eps)
        zc = gaussian_noise_multiplier(eps, args.delta) * math.sqrt(args.rounds)
        arms[f"flower-client-{eps:g}"] = flower_arm(f"fedavg+clientdp-eps{eps:g}", out / f"fedavg-clientdp-eps{eps:g}",
                                                    tv["base"], sites, test, run_cfg, args.rounds, cfg.seed,
                                                    (zc, args.client_clip), eps)
    return arms


# ---------------------------------------------------------------- table


def points(args: argparse.Namespace, tv: dict[str, Any], fl: dict[str, list[Row]]) -> list[Row]:
    """Every evaluated model of one split and seed as (arm, ε, unit, uploads, site-epochs, time, AUROC)."""
    k, slow, r = args.sites, max(tv["speeds"]), args.rounds
    out: list[Row] = []

    def add(arm: str, eps: float | None, unit: str, uploads: float | None, passes: float | None,
            time: float | None, row: Row, composed: float | None = None) -> None:
        out.append({"arm": arm, "eps": eps, "unit": unit, "uploads": uploads, "passes": passes, "time": time,
                    "auroc": row["metrics"]["auroc"], "composed": composed})

    for eps in [None, *args.epsilons]:
        tag = "" if eps is None else f"-eps{eps:g}"
        unit = "—" if eps is None else "image"
        epochs = args.epochs
        for row in tv["rows"]["oneshot"]:
            if row["group"] in ("merged", "calibrated") and row["epsilon"] == eps:  # one release at ε (a target)
                add(f"taskvec one-shot {row['name'].removesuffix(tag)}", eps, unit, 1, k * epochs, slow, row, eps)
            if row["group"] == "centralised" and row["epsilon"] == eps:
                add("centralised (reference)", eps, unit, None, k * epochs, None, row)
        per = None if eps is None else per_arrival_epsilon(args, eps)
        for row in tv["rows"]["rounds"]:
            if row["group"] == "async" and row["epsilon"] == per:
                composed = max(row["composed_epsilon"].values()) if "composed_epsilon" in row else None
                add(f"taskvec rounds v{row['version']}", eps, unit, row["arrivals"] / k,
                    row["arrivals"] * epochs, row["time"], row, composed)
        for row in tv["rows"]["stats"]:
            if row["group"] == "merged" and row["epsilon"] == eps:
                add(f"taskvec stats-head:{args.stats_dim} + lda-head", eps, unit, 1, 0, slow, row, eps)
        arms = [("flower", "Flower FedAvg", "—")] if eps is None else [
            (f"flower-dpsgd-{eps:g}", "Flower FedAvg + DP-SGD", "image"),
            (f"flower-client-{eps:g}", "Flower FedAvg + client-level DP", "site")]
        for key, label, u in arms:
            for row in fl[key]:
                composed = None
                if u == "image":
                    q, steps = dp_steps(args)
                    composed = dp_sgd_epsilon([(round_noise(args, eps), q, steps)] * row["round"], args.delta)[0]
                elif u == "site":
                    assert eps is not None
                    z = gaussian_noise_multiplier(eps, args.delta) * math.sqrt(r)
                    composed = gaussian_epsilon(composed_noise_multiplier([z] * row["round"]), args.delta)
                add(f"{label} round {row['round']}", eps, u, row["round"], row["round"] * k * epochs,
                    row["round"] * slow, row, composed)
    return out


def fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:g}"


def tables(args: argparse.Namespace, per_seed: dict[str, list[list[Row]]]) -> list[str]:
    """The markdown tables: every model (mean ± sd over seeds), then the targets."""
    lines = ["| split | ε per site | arm | DP unit | uploads per site | site-epochs | simulated time | composed ε "
             "| AUROC |", "|" + "---|" * 9]
    summary = ["| split | ε per site | Flower final AUROC (best Flower arm) | taskvec best AUROC (arm) | "
               "Flower time to its final | taskvec first time within 0.01 of it (arm) | time ratio |",
               "|" + "---|" * 7]
    for split, seeds in per_seed.items():
        for eps in [None, *args.epsilons]:
            by_arm: dict[str, list[Row]] = {}
            for pts in seeds:
                for p in pts:
                    if p["eps"] == eps:
                        by_arm.setdefault(p["arm"], []).append(p)
            mean = {a: statistics.mean(p["auroc"] for p in ps) for a, ps in by_arm.items()}
            e = "∞" if eps is None else f"{eps:g}"
            for arm, ps in by_arm.items():
                p = ps[0]
                comp = [x["composed"] for x in ps if x["composed"] is not None]
                lines.append(f"| {split} | {e} | {arm} | {p['unit']} | {fmt(p['uploads'])} | {fmt(p['passes'])} | "
                             f"{fmt(p['time'])} | {f'{max(comp):.2f}' if comp else '—'} | "
                             f"{ms([x['auroc'] for x in ps])} |")
            flower = {a: ps for a, ps in by_arm.items() if a.startswith("Flower")}
            finals = {a: ps for a, ps in flower.items() if a.endswith(f"round {args.rounds}")}
            best_fl = max(finals, key=lambda a: mean[a])
            tv = {a: ps for a, ps in by_arm.items() if a.startswith("taskvec")}
            best_tv = max(tv, key=lambda a: mean[a])
            reach = [(tv[a][0]["time"], a) for a in tv if mean[a] >= mean[best_fl] - 0.01]
            first = min(reach) if reach else None
            fl_time = finals[best_fl][0]["time"]
            summary.append(f"| {split} | {e} | {mean[best_fl]:.3f} ({best_fl}) | {mean[best_tv]:.3f} ({best_tv}) | "
                           f"{fmt(fl_time)} | {f'{first[0]:g} ({first[1]})' if first else 'not reached'} | "
                           f"{f'{first[0] / fl_time:.2f}' if first else '—'} |")
    return lines + [""] + summary


# ---------------------------------------------------------------- main


def smoke_setup(args: argparse.Namespace) -> None:
    """A tiny synthetic data set and a tiny randomly initialised timm model as the "pretrained" weights."""
    import timm
    import torch
    from safetensors.torch import save_file

    from taskvec.simulation.synthetic import write_classification_npz

    args.out.mkdir(parents=True, exist_ok=True)
    args.data = args.out / "smoke.npz"
    if not args.data.exists():
        write_classification_npz(args.data, n_train=48, n_val=16, n_test=32, size=32)
    args.weights = args.out / "test_convnext.safetensors"
    if not args.weights.exists():
        torch.manual_seed(0)
        save_file(timm.create_model("test_convnext", pretrained=False).state_dict(), str(args.weights))
    args.arch, args.img_size, args.sites = "test_convnext", 32, 2
    args.rounds, args.epochs, args.stats_dim = 1, 1, 8
    args.seeds, args.splits, args.epsilons, args.methods = [0], ["iid"], [8.0], ["mean"]
    args.images_per_site = args.test_images = None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "pbc_blood_cells_128")
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "tf_efficientnet_lite0.in1k.safetensors")
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--sites", type=int, default=5)
    ap.add_argument("--splits", default="iid,dirichlet:0.5", help="comma-separated simulate --split rules")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=5, help="Flower's rounds; each taskvec site's arrivals")
    ap.add_argument("--epochs", type=int, default=1, help="local epochs of every fine-tune without DP")
    ap.add_argument("--epsilons", default="8,3", help="comma-separated ε per site, or 'none'")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--client-clip", type=float, default=0.5, help="Flower client-level DP: L2 clip of an update")
    ap.add_argument("--slow", type=float, default=3.0, help="relative time per fine-tune of the last site")
    ap.add_argument("--buffer", type=int, default=None, help="taskvec rounds: merge every this many arrivals")
    ap.add_argument("--methods", default="mean,ties", help="taskvec one-shot merge methods")
    ap.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                    help="also calibrate each one-shot merge on the validation share (one evaluation per scale tried)")
    ap.add_argument("--stats-dim", type=int, default=64, help="P of stats-head:P")
    ap.add_argument("--images-per-site", type=int, default=None, help="subsample the training split to this many "
                    "images per site (and the validation share to as many)")
    ap.add_argument("--test-images", type=int, default=None, help="subsample the test split")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(".cache/vs_flower"))
    ap.add_argument("--smoke", action="store_true", help="one tiny round of each arm on synthetic data")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.splits = args.splits.split(",")
    args.epsilons = [] if args.epsilons == "none" else [float(e) for e in args.epsilons.split(",")]
    args.methods = args.methods.split(",")
    if args.smoke:
        args.out = args.out / "smoke"
        smoke_setup(args)
    for name in ("sites", "rounds", "epochs", "images_per_site", "test_images"):
        v = getattr(args, name)
        if v is not None and v < 1:
            sys.exit(f"vs_flower: --{name.replace('_', '-')} must be >= 1, got {v}")
    try:
        import flwr
    except ImportError:
        sys.exit("vs_flower: Flower is not installed here (pip install flwr, in an environment of its own)")
    per_image = None if args.images_per_site is None else args.images_per_site * args.sites
    data = (subsample(args.data, args.out, per_image, args.images_per_site, args.test_images)
            if args.data.is_dir() else args.data)
    per_seed: dict[str, list[list[Row]]] = {}
    norms: list[float] = []  # L2 norms of the sites' updates in Flower FedAvg without DP (for --client-clip)
    for split in args.splits:
        for seed in args.seeds:
            folder = args.out / f"{split.replace(':', '')}-seed{seed}"
            print(f"{split}, seed {seed}: taskvec", file=sys.stderr, flush=True)
            tv = taskvec_arms(args, data, split, seed, folder)
            print(f"{split}, seed {seed}: Flower {flwr.__version__}", file=sys.stderr, flush=True)
            fl = flower_arms(args, tv, folder / "flower")
            per_seed.setdefault(split, []).append(points(args, tv, fl))
            norms += [n for row in fl["flower"] for n in row["update_norms"]]
    subset = ("" if per_image is None and args.test_images is None else
              f" (subsampled: {args.images_per_site or 'all'} training images per site, {args.test_images or 'all'} "
              "test images)")
    head = (f"taskvec against Flower {flwr.__version__} FedAvg on {args.data.name}{subset}, {args.arch} at "
            f"{args.img_size} px, {args.sites} sites "
            f"(the last {args.slow:g}× slower), {args.rounds} rounds, {args.epochs} local epoch(s) per fine-tune "
            f"(DP-SGD: {dp_steps(args)[1]} steps at q = {dp_steps(args)[0]:g}), "
            f"δ = {args.delta:g}, test macro AUROC, mean ± sd over seeds {', '.join(map(str, args.seeds))}.")
    clip = (f"Flower client-level DP clips each site's update to L2 norm {args.client_clip:g}; without DP the "
            f"updates' norms were {min(norms):.3g} to {max(norms):.3g} (median {statistics.median(norms):.3g}).")
    text = "\n".join([head, "", *tables(args, per_seed), "", clip]) + "\n"
    print(text)


if __name__ == "__main__":
    try:
        main()
    except TaskvecError as e:  # settings refused, or an --out holding other settings
        sys.exit(f"vs_flower: {e}")
