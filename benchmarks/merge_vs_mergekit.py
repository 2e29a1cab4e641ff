"""taskvec merge against mergekit, and how taskvec's methods scale with the number of vectors.

Table 1 (`--compare N`): N fine-tuned copies of one timm model, merged into their mean delta by
  taskvec  - `taskvec merge v1..vN --base base --method mean` (every input's sha256 verified)
  mergekit - `mergekit-pytorch` with `task_arithmetic`, weight 1/N per model (the same result)
each in a fresh process, interleaved, medians of --repeats: wall time, peak RSS (the child's own ru_maxrss),
and the largest absolute difference between the two merged models.
Table 2 (`--counts`): `taskvec merge` with `sum` and `ties` for growing N, next to `startup` (`taskvec merge
--help`: the imports alone, to subtract from the peaks).

  python benchmarks/merge_vs_mergekit.py --arch vit_base_patch16_224 --compare 16 --counts '' --repeats 3
  python benchmarks/merge_vs_mergekit.py --arch vit_small_patch16_224 --compare 0 --counts 1,4,16,64

mergekit: `pip install -c constraints.txt mergekit` (here, in its own virtual environment: --mergekit PATH).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKVEC = [sys.executable, "-m", "taskvec.cli.app"]


def make_inputs(workdir: Path, arch: str, n: int, keep: int) -> None:
    """The base, n vectors exported from fine-tuned state_dicts base + 1e-3·N(0, 1), and the first `keep`
    of those state_dicts (mergekit's inputs); all kept between runs."""
    import torch
    from safetensors.torch import load_file, save_file

    from taskvec.merging.export import export_vector
    from taskvec.models.spec import build_base, save_model

    base = workdir / "base.safetensors"
    if not base.exists():
        save_model(*build_base(arch, num_classes=2), base)
    sd = None
    for i in range(n):
        ft, v = workdir / f"ft{i}.safetensors", workdir / f"v{i}.safetensors"
        if not v.exists() or (i < keep and not ft.exists()):
            sd = sd or load_file(str(base))
            g = torch.Generator().manual_seed(i)
            save_file({k: t + 1e-3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                       for k, t in sd.items()}, str(ft))
            if not v.exists():
                export_vector(ft, base, v, contributor=f"site{i}", samples=100)
            if i >= keep:
                ft.unlink()


def run(cmd: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read().decode() if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed: {err[-2000:]}")
    return {"seconds": wall, "peak_mb": usage.ru_maxrss / 1024}


def median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def max_abs_difference(a: Path, b_dir: Path) -> float:
    from safetensors.numpy import load_file

    x = load_file(str(a))
    y: dict = {}
    for f in sorted(b_dir.glob("*.safetensors")):
        y.update(load_file(str(f)))
    assert x.keys() == y.keys(), "the two merges hold different tensors"
    return max(float(abs(x[k].astype("f8") - y[k].astype("f8")).max()) for k in x if x[k].dtype.kind == "f")


def compare(workdir: Path, base: Path, fts: list[Path], vecs: list[Path], mergekit: str, repeats: int) -> None:
    n = len(vecs)
    config = workdir / f"mergekit-{n}.yml"
    models = "".join(f"  - model: {ft}\n    parameters:\n      weight: {1 / n!r}\n" for ft in fts)
    config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\nmodels:\n{models}")
    out_tv, out_mk = workdir / "taskvec-mean.safetensors", workdir / "mergekit-out"
    jobs = {
        "taskvec": [*TASKVEC, "merge", *map(str, vecs), "--base", str(base), "--method", "mean", "--out",
                    str(out_tv), "--force"],
        "mergekit": [mergekit, str(config), str(out_mk)],
    }
    res: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
    for _ in range(repeats):
        for j, cmd in jobs.items():  # interleaved: machine noise hits both alike
            if j == "mergekit":
                shutil.rmtree(out_mk, ignore_errors=True)
            res[j].append(run(cmd))
    # in a child, so that this process stays small for the runs after it (see `run`)
    diff = float(subprocess.run([sys.executable, __file__, "--difference", str(out_tv), str(out_mk)],
                                capture_output=True, text=True, check=True).stdout)
    size = sum(v.stat().st_size for v in vecs) / 1e9
    print(f"{n} vectors ({size:.2f} GB of vector files); medians of {repeats}; max |taskvec − mergekit| = {diff:.2e}")
    print()
    print("| | wall s | peak RSS MB |")
    print("|---|---|---|")
    for j in jobs:
        print(f"| {j} | {median(res[j], 'seconds'):.2f} | {median(res[j], 'peak_mb'):.0f} |")
    t, m = (median(res[j], "seconds") for j in jobs), (median(res[j], "peak_mb") for j in jobs)
    print(f"| taskvec / mergekit | {next(t) / next(t):.2f}x | {next(m) / next(m):.2f}x |")
    print(flush=True)


def scaling(base: Path, vecs: list[Path], counts: list[int], repeats: int, workdir: Path) -> None:
    model_mb = base.stat().st_size / 1e6
    print(f"model file {model_mb:.0f} MB; medians of {repeats}; peak RSS per process")
    print()
    print("| vectors | startup s | startup MB | sum s | sum MB | ties s | ties MB | ties / sum time |"
          " (sum − startup) / model | (ties − startup) / model |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    out = str(workdir / "scaling.safetensors")
    for n in counts:
        jobs = {"startup": [*TASKVEC, "merge", "--help"]}
        for m in ("sum", "ties"):
            jobs[m] = [*TASKVEC, "merge", *map(str, vecs[:n]), "--base", str(base), "--method", m, "--out", out,
                       "--force"]
        res: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
        for _ in range(repeats):
            for j, cmd in jobs.items():
                res[j].append(run(cmd))
        med = {j: (median(r, "seconds"), median(r, "peak_mb")) for j, r in res.items()}
        cells = " | ".join(f"{med[j][0]:.2f} | {med[j][1]:.0f}" for j in jobs)
        over = [(med[m][1] - med["startup"][1]) / model_mb for m in ("sum", "ties")]
        print(f"| {n} | {cells} | {med['ties'][0] / med['sum'][0]:.2f} | {over[0]:.2f} | {over[1]:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--compare", type=int, default=16, help="vectors in the mergekit comparison (0: skip it)")
    ap.add_argument("--counts", default="1,4,16", help="vector counts of the scaling table ('': skip it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", default=shutil.which("mergekit-pytorch"), help="the mergekit-pytorch executable")
    ap.add_argument("--workdir", default=None, help="keep the generated files here between runs")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--difference", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.difference:
        print(max_abs_difference(*args.difference))
        return
    counts = [int(c) for c in args.counts.split(",") if c]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="taskvec-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n = max([args.compare, *counts])
    if args.make_only:
        make_inputs(workdir, args.arch, n, args.compare)
        return
    # made in a child, so that this process stays small: a fork carries the parent's peak RSS into ru_maxrss
    subprocess.run([sys.executable, __file__, "--make-only", "--arch", args.arch, "--compare", str(args.compare),
                    "--counts", args.counts, "--workdir", str(workdir)], check=True)
    base = workdir / "base.safetensors"
    fts = [workdir / f"ft{i}.safetensors" for i in range(args.compare)]
    vecs = [workdir / f"v{i}.safetensors" for i in range(n)]
    print(f"{args.arch}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
    print()
    if args.compare:
        if args.mergekit is None:
            print("mergekit-pytorch not found: `pip install mergekit` (or --mergekit PATH); comparison skipped")
        else:
            compare(workdir, base, fts[: args.compare], vecs[: args.compare], args.mergekit, args.repeats)
    if counts:
        scaling(base, vecs, counts, args.repeats, workdir)


if __name__ == "__main__":
    main()
