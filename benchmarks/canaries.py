"""Claimed vs empirical ε of the export mechanism (`taskvec audit --canaries`, Andrew et al. 2024).

For each noise multiplier z, one release of the export code's clip-and-noise mechanism carries `--canaries`
clipped random canaries over `--dim` coordinates; the table gives the claimed ε of one release (site,
add-remove, analytic Gaussian) and the empirical estimate and lower bound at about 95% confidence (approximate:
the canaries share one noise draw), mean ± sd over `--seeds` runs (each run: new canaries, new secret
noise). The last row removes the noise (the tests' hook), which the audit must flag. Example:
  OMP_NUM_THREADS=1 python benchmarks/canaries.py
"""

from __future__ import annotations

import argparse

import torch
from tables import ms

from taskvec.audits.canaries import audit_export_mechanism
from taskvec.merging import export


def row(label: str, z: float, args: argparse.Namespace) -> str:
    shapes = [(args.dim // 2,), (args.dim - args.dim // 2,)]
    runs = [audit_export_mechanism(shapes, clip=1.0, noise_multiplier=z, delta=args.delta, canaries=args.canaries,
                                   seed=1000 * s) for s in range(args.seeds)]

    return (f"| {label} | {runs[0].claimed_epsilon:.2f} | {ms([r.epsilon_estimate for r in runs], 2)} | "
            f"{ms([r.epsilon_lower_bound for r in runs], 2)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{args.canaries} canaries, {args.dim:,} coordinates, δ = {args.delta:g}, {args.seeds} runs each\n")
    print("| export noise | claimed ε | empirical ε (estimate) | empirical ε (~95% lower bound) |")
    print("|---|---|---|---|")
    for z in (0.5, 1.0, 2.0):
        print(row(f"z = {z:g}", z, args))
    export.draw_noise = lambda shape, sigma, generator: torch.zeros(shape)  # the tests' hook: no noise
    print(row("z = 1, noise removed", 1.0, args))


if __name__ == "__main__":
    main()
