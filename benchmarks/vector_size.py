"""Vector size and export-time noise-to-signal ratio per training mode (`finetune --train`).

A vector carries d coordinates: every delta of `all`, only the trained keys of `head`/`norm-bias`/`last:K`, and
the two rank-R factors of each adapted weight (plus the head) for `lora:R`. Export-time DP (`export --clip C
--epsilon E --delta D`) adds N(0, (Z·C)²) to each coordinate, Z from the analytic Gaussian mechanism, so with
the clip at the delta's own norm the noise-to-signal ratio of the released vector is ‖noise‖/‖Δ‖ = Z·√d:
it depends on d alone. Counts come from the model (no training); bytes are fp32 tensors. Example:
  python benchmarks/vector_size.py --arch tf_efficientnet_lite0 --in-chans 1 --modes all,last:2,norm-bias,head,lora:8
"""

from __future__ import annotations

import argparse
import math

from taskvec.io.layout import factor_shapes
from taskvec.models.spec import build_base
from taskvec.privacy.ledger import gaussian_noise_multiplier
from taskvec.training.modes import parse_mode


def coordinates(arch: str, in_chans: int, task: str, mode: str) -> int:
    """Number of coordinates a vector of `mode` carries."""
    net, _ = build_base(arch, task, 2, in_chans, 64, dp_compatible=True, dp_norm="frozen-batchnorm")
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    _, layout = parse_mode(mode).prepare(net, task)
    d = sum(math.prod(shapes[k]) for k in layout.trained)
    return d + sum(math.prod(s) for k, r in layout.factored.items() for s in factor_shapes(k, shapes[k], r).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--in-chans", type=int, default=1)
    ap.add_argument("--task", default="classification")
    ap.add_argument("--modes", default="all,last:2,norm-bias,head,lora:8")
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--delta", type=float, default=1e-5)
    args = ap.parse_args()
    eps = [float(e) for e in args.epsilons.split(",")]
    zs = {e: gaussian_noise_multiplier(e, args.delta) for e in eps}
    print(f"{args.arch} {args.task}, {args.in_chans} channel(s), 2 classes; export noise Z at δ = {args.delta:g}: "
          + ", ".join(f"ε {e:g} → Z {z:.3g}" for e, z in zs.items()))
    print("| mode | coordinates d | vector (fp32) | " + " | ".join(f"noise/signal ε={e:g}" for e in eps) + " |")
    print("|---|---|---|" + "---|" * len(eps))
    for mode in args.modes.split(","):
        d = coordinates(args.arch, args.in_chans, args.task, mode)
        ratios = " | ".join(f"{zs[e] * math.sqrt(d):.3g}" for e in eps)
        print(f"| {mode} | {d:,} | {4 * d / 1e6:.3g} MB | {ratios} |", flush=True)


if __name__ == "__main__":
    main()
