"""taskvec merge against mergekit, and how taskvec's methods scale with the number of vectors.

Table 1 (`--compare N`): N fine-tuned copies of one timm model, merged into their mean delta by
  taskvec  - `taskvec merge v1..vN --base base --method mean` (every input's sha256 verified)
  mergekit - `mergekit-pytorch` with `task_arithmetic`, weight 1/N per model (the same result)
  floor    - the I/O floor: the merge engine's own reader (`taskvec.merging.reading`, the same hash threads)
             reads and sha256-verifies the same N vector files and reads the base, with no arithmetic and no output
each in a fresh process, interleaved, medians of --repeats, every input read once before (in the page cache):
wall time, peak RSS (the child's own ru_maxrss), and the largest absolute difference between the two merges.
Table 2 (`--counts`): `taskvec merge` with each of --methods for growing N, next to `startup` (`taskvec merge
--help`: the imports alone, to subtract from the peaks): wall time with the ratio to `sum`, then peak RSS.
Table 3 (`--profile METHOD:N`, repeatable): where one merge's time goes, from cProfile in this process (the main
thread's calls; helper threads' hashing and column blocks show as waits).

  python benchmarks/merge_vs_mergekit.py --arch vit_base_patch16_224 --compare 16 --counts '' --repeats 3
  python benchmarks/merge_vs_mergekit.py --arch vit_tiny_patch16_224 --compare 0 --counts 1,4,16,64

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
METHODS = "sum,ties,dare_ties,median,trimmed_mean"


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
        "floor": [sys.executable, __file__, "--floor", str(base), *map(str, vecs)],
    }
    for f in [base, *fts, *vecs]:  # every input in the page cache before the first timed run
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass
    res: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
    for _ in range(repeats):
        for j, cmd in jobs.items():  # interleaved: machine noise hits all alike
            if j == "mergekit":
                shutil.rmtree(out_mk, ignore_errors=True)
            res[j].append(run(cmd))
    # in a child, so that this process stays small for the runs after it (see `run`)
    diff = float(subprocess.run([sys.executable, __file__, "--difference", str(out_tv), str(out_mk)],
                                capture_output=True, text=True, check=True).stdout)
    size = sum(v.stat().st_size for v in vecs) / 1e9
    print(f"{n} vectors ({size:.2f} GB of vector files, in the page cache); medians of {repeats}; "
          f"max |taskvec − mergekit| = {diff:.2e}")
    print()
    print("| | wall s | peak RSS MB |")
    print("|---|---|---|")
    names = {"floor": "I/O floor (read + sha256, no arithmetic)"}
    for j in jobs:
        print(f"| {names.get(j, j)} | {median(res[j], 'seconds'):.2f} | {median(res[j], 'peak_mb'):.0f} |")
    for other in ("mergekit", "floor"):
        t, m = (median(res[j], "seconds") for j in ("taskvec", other)), (median(res[j], "peak_mb") for j in
                                                                        ("taskvec", other))
        print(f"| taskvec / {other} | {next(t) / next(t):.2f}x | {next(m) / next(m):.2f}x |")
    print(flush=True)


def floor(base: Path, vecs: list[Path]) -> None:
    """Read and verify every vector file with the merge's own reader and read the base: what a merge cannot avoid."""
    from taskvec.io.files import read_kind
    from taskvec.merging.reading import Reading

    with Reading([read_kind(v, "vector") for v in vecs]) as reading:
        for f in reading.files:
            for k in sorted(f.header.tensors):
                f.read(k)
        reading.verify()
    with open(base, "rb", buffering=0) as fb:
        while fb.read(1 << 24):
            pass


def scaling(base: Path, vecs: list[Path], counts: list[int], methods: list[str], repeats: int,
            workdir: Path) -> None:
    model_mb = base.stat().st_size / 1e6
    print(f"model file {model_mb:.0f} MB; medians of {repeats}, jobs interleaved; in brackets: time / `sum` time")
    print()
    rows = []
    out = str(workdir / "scaling.safetensors")
    for n in counts:
        jobs = {"startup": [*TASKVEC, "merge", "--help"]}
        for m in methods:
            jobs[m] = [*TASKVEC, "merge", *map(str, vecs[:n]), "--base", str(base), "--method", m, "--out", out,
                       "--force"]
        res: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
        for _ in range(repeats):
            for j, cmd in jobs.items():
                res[j].append(run(cmd))
        rows.append((n, {j: (median(r, "seconds"), median(r, "peak_mb")) for j, r in res.items()}))
    print("| vectors | startup s | " + " | ".join(f"{m} s" for m in methods) + " |")
    print("|---" * (2 + len(methods)) + "|")
    for n, med in rows:
        cells = [f"{med[m][0]:.2f}" + (f" ({med[m][0] / med['sum'][0]:.2f}x)" if m != "sum" else "") for m in methods]
        print(f"| {n} | {med['startup'][0]:.2f} | " + " | ".join(cells) + " |")
    print()
    print("peak RSS MB; in brackets: (peak − startup) / model file size")
    print()
    print("| vectors | startup MB | " + " | ".join(f"{m} MB" for m in methods) + " |")
    print("|---" * (2 + len(methods)) + "|")
    for n, med in rows:
        cells = [f"{med[m][1]:.0f} ({(med[m][1] - med['startup'][1]) / model_mb:.2f})" for m in methods]
        print(f"| {n} | {med['startup'][1]:.0f} | " + " | ".join(cells) + " |", flush=True)


def profile(base: Path, vecs: list[Path], spec: str, workdir: Path, top: int = 8) -> None:
    """cProfile of one in-process merge (`METHOD:N`): the calls with the most own time, as a table."""
    import cProfile
    import pstats

    from taskvec.merging.stream import merge_vectors

    method, n = spec.split(":")
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(merge_vectors, vecs[: int(n)], base, workdir / "profile.safetensors", method=method, force=True)
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(((tt, nc, fn) for fn, (_, nc, tt, _, _) in stats.items()), reverse=True)[:top]
    print(f"`{method}` over {n} vectors in this process: {wall:.2f} s wall; main thread's own time by call")
    print()
    print("| call | calls | own s | share of wall |")
    print("|---|---|---|---|")
    for tt, nc, (file, line, name) in rows:
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        print(f"| `{where}` | {nc} | {tt:.2f} | {tt / wall:.0%} |")
    print(flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--compare", type=int, default=16, help="vectors in the mergekit comparison (0: skip it)")
    ap.add_argument("--counts", default="1,4,16", help="vector counts of the scaling table ('': skip it)")
    ap.add_argument("--methods", default=METHODS, help="methods of the scaling table (the first one: `sum`)")
    ap.add_argument("--profile", action="append", default=[], metavar="METHOD:N",
                    help="profile one in-process merge of N vectors (repeatable)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mergekit", default=shutil.which("mergekit-pytorch"), help="the mergekit-pytorch executable")
    ap.add_argument("--workdir", default=None, help="keep the generated files here between runs")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--difference", nargs=2, type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--floor", nargs="+", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.difference:
        print(max_abs_difference(*args.difference))
        return
    if args.floor:
        floor(args.floor[0], args.floor[1:])
        return
    counts = [int(c) for c in args.counts.split(",") if c]
    methods = args.methods.split(",")
    if counts and methods[0] != "sum":
        ap.error("--methods must start with sum (the others' times are given relative to it)")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="taskvec-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    n = max([args.compare, *counts, *(int(p.split(":")[1]) for p in args.profile)])
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
        scaling(base, vecs, counts, methods, args.repeats, workdir)
    for spec in args.profile:
        profile(base, vecs, spec, workdir)


if __name__ == "__main__":
    main()
