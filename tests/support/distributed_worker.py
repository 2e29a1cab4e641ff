"""Run under torchrun (or alone) by tests/training/test_distributed.py. Writes to OUT, for the test to check:
`world<N>-rank<r>-<unit>.pt`, the weight after one DP-SGD step of a tiny linear model, noise switched off, on
a fixed global batch split among the ranks (to compare with the one-process step), and
`world<N>-rank<r>.json`, what `Group.on_main` gave each rank.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/support/distributed_worker.py OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from taskvec.errors import TaskvecError
from taskvec.privacy.dpsgd import Chunk, DPConfig, make_private
from taskvec.training.distributed import Group, process_group, wrap_model


def one_step(group: Group, patients: bool) -> torch.Tensor:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(16, 3, 2, 2), torch.randint(0, 3, (16,))
    ds = TensorDataset(x, y)
    loader = DataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator(), drop_last=True)
    ids = [i // 2 for i in range(16)] if patients else None  # 8 patients of 2 images, or 16 images
    model, optimizer, _, _ = make_private(
        net, torch.optim.SGD(net.parameters(), lr=1.0), loader,
        DPConfig(max_grad_norm=0.05, delta=1e-5, noise_multiplier=1.0, seed=group.rank),
        epochs=1, patient_ids=ids, shard=group.shard,
    )
    optimizer.noise_multiplier = 0.0  # type: ignore[attr-defined]
    model = wrap_model(model, group, private=True)
    # the global batch: images 0..7 (patients 0..3); rank r holds every world-th unit of it, as its sampler
    units = [list(range(2 * p, 2 * p + 2)) for p in range(4)] if patients else [[i] for i in range(8)]
    mine = [i for u in units[group.rank::group.world] for i in u]
    if optimizer.chunks is not None:  # type: ignore[attr-defined]  # the unit of each image, as the sampler queues it
        owner = torch.tensor([k for k, u in enumerate(units[group.rank::group.world]) for _ in u])
        optimizer.chunks.append(Chunk(owner, last=True))  # type: ignore[attr-defined]
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
    optimizer.step()
    return net[1].weight.detach().clone()


def on_main(group: Group) -> dict[str, str]:
    """A value and an error of rank 0 reach every rank (none waits forever)."""

    def refuse() -> None:
        raise TaskvecError("run folder exists")

    try:
        group.on_main(refuse)
    except TaskvecError as e:
        return {"value": group.on_main(lambda: f"from rank {group.rank}"), "error": str(e)}
    return {}


def main() -> None:
    out = Path(sys.argv[1])
    with process_group(torch.device("cpu")) as group:
        for unit in ("image", "patient"):
            torch.save(one_step(group, unit == "patient"), out / f"world{group.world}-rank{group.rank}-{unit}.pt")
        (out / f"world{group.world}-rank{group.rank}.json").write_text(json.dumps(on_main(group)))


if __name__ == "__main__":
    main()
