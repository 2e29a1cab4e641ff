"""Merge scaling: wall time and peak RSS of `taskvec merge` as the number of vectors grows.

Side by side in one run, each in a fresh subprocess (so peak RSS is that job's alone):
  startup - import torch and safetensors only (subtract it from the peaks)
  read    - read every tensor of the N vector files once (the I/O floor of any merge)
  stream  - `merge_vectors(..., method=sum)`: one accumulator, one vector file at a time
  ties    - `merge_vectors(..., method=ties)`: tensor by tensor, all files memory-mapped
  naive   - load all N vectors into memory, then sum (what streaming avoids)
Medians over --repeats runs. Example:
  python benchmarks/merge_scaling.py --arch vit_base_patch16_224 --counts 1,4,16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

JOBS = {
    "startup": "pass",
    "read": """
from safetensors import safe_open
for p in vecs:
    with safe_open(p, "pt") as f:
        for k in f.keys():
            f.get_tensor(k).sum()
""",
    "stream": "from taskvec.merging.stream import merge_vectors\n"
             "merge_vectors(vecs, base, out, method='sum', force=True)",
    "ties": "from taskvec.merging.stream import merge_vectors\n"
             "merge_vectors(vecs, base, out, method='ties', force=True)",
    "naive": """
from safetensors.torch import load_file
loaded = [load_file(p) for p in vecs]
total = {k: sum(v[k].float() for v in loaded) for k in loaded[0]}
""",
}

RUNNER = """
import json, sys, time
vecs, base, out = json.loads(sys.argv[1])
import torch, safetensors  # imported before the clock: every job pays the same start-up
t0 = time.perf_counter()
{job}
dt = time.perf_counter() - t0
# VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across fork+exec)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({{"seconds": dt, "peak_rss_mb": hwm / 1024}}))
"""


def make_vectors(workdir: Path, arch: str, n: int) -> tuple[str, list[str]]:
    import torch
    from safetensors.torch import load_file, save_file

    from taskvec.merging.export import export_vector
    from taskvec.models.spec import build_base, save_model

    base = workdir / "base.safetensors"
    if not base.exists():
        module, spec = build_base(arch, num_classes=2)
        save_model(module, spec, base)
    base_sd = None
    vecs = []
    for i in range(n):
        v = workdir / f"v{i}.safetensors"
        if not v.exists():
            base_sd = base_sd or load_file(str(base))
            g = torch.Generator().manual_seed(i)
            ft = workdir / "ft.safetensors"
            save_file({k: t + 1e-3 * torch.randn(t.shape, generator=g) if t.is_floating_point() else t
                       for k, t in base_sd.items()}, str(ft))
            export_vector(ft, base, v, samples=100, contributor=f"site{i}")
            ft.unlink()
        vecs.append(str(v))
    return str(base), vecs


def run_job(job: str, vecs: list[str], base: str, out: str) -> dict[str, float]:
    code = RUNNER.format(job=JOBS[job])
    p = subprocess.run([sys.executable, "-c", code, json.dumps([vecs, base, out])],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base_patch16_224")
    ap.add_argument("--counts", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", default="startup,read,stream,ties,naive")
    ap.add_argument("--workdir", default=None, help="keep vector files here between runs")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    jobs = args.jobs.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="taskvec-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, all_vecs = make_vectors(workdir, args.arch, max(counts))
    size_mb = Path(all_vecs[0]).stat().st_size / 1e6
    print(f"{args.arch}: vector file {size_mb:.0f} MB; medians of {args.repeats} runs; peak RSS per process")
    print()
    print("| vectors | " + " | ".join(f"{j} s | {j} peak MB" for j in jobs) + " | stream / read |")
    print("|---|" + "---|---|" * len(jobs) + "---|")
    for n in counts:
        vecs = all_vecs[:n]
        res: dict[str, list[dict[str, float]]] = {j: [] for j in jobs}
        for _ in range(args.repeats):
            for j in jobs:  # interleaved, so machine noise hits every job alike
                res[j].append(run_job(j, vecs, base, str(workdir / "merged.safetensors")))
        med = {j: {m: statistics.median(r[m] for r in res[j]) for m in ("seconds", "peak_rss_mb")} for j in jobs}
        ratio = med["stream"]["seconds"] / med["read"]["seconds"] if {"stream", "read"} <= set(jobs) else float("nan")
        cells = " | ".join(f"{med[j]['seconds']:.2f} | {med[j]['peak_rss_mb']:.0f}" for j in jobs)
        print(f"| {n} | {cells} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
