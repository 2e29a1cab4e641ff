"""benchmarks/vs_flower.py --smoke: one tiny round of every arm (taskvec one-shot, rounds and statistics head;
Flower FedAvg, with DP-SGD and with client-level DP), run by a Python that has Flower.

Flower pins older typer/rich/protobuf than taskvec's development environment, so it usually lives in an
environment of its own: set TASKVEC_FLOWER_PYTHON to that environment's python (with taskvec installed there too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def flower_python() -> str:
    """A Python that imports flwr and taskvec: TASKVEC_FLOWER_PYTHON, else this one; skip when there is none."""
    given = os.environ.get("TASKVEC_FLOWER_PYTHON")
    if given:
        return given
    try:
        import flwr  # noqa: F401
    except ImportError:
        pytest.skip("Flower is not installed here: set TASKVEC_FLOWER_PYTHON to a python with flwr and taskvec")
    return sys.executable


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("vs_flower")
    run = subprocess.run([flower_python(), str(ROOT / "benchmarks" / "vs_flower.py"), "--smoke", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return out / "smoke" / "iid-seed0", run.stdout


def rows(table: str, eps: str) -> dict[str, list[str]]:
    """The first table's rows at `eps`, by arm: [unit, uploads, site-epochs, time, composed ε, AUROC]."""
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0] == "iid" and cells[1] == eps:
            out[cells[2]] = cells[3:]
    return out


def test_every_arm_has_a_row_with_and_without_dp(smoke) -> None:
    _, table = smoke
    plain = rows(table, "∞")
    assert {"taskvec one-shot mean", "taskvec rounds v1", "taskvec stats-head:8 + lda-head",
            "Flower FedAvg round 1", "centralised (reference)"} <= set(plain)
    dp = rows(table, "8")
    assert {"taskvec one-shot mean", "taskvec rounds v1", "taskvec stats-head:8 + lda-head",
            "Flower FedAvg + DP-SGD round 1", "Flower FedAvg + client-level DP round 1"} <= set(dp)
    assert dp["Flower FedAvg + DP-SGD round 1"][0] == "image"
    assert dp["Flower FedAvg + client-level DP round 1"][0] == "site"
    for arm in ("taskvec rounds v1", "Flower FedAvg + DP-SGD round 1", "Flower FedAvg + client-level DP round 1"):
        assert 0 < float(dp[arm][4]) <= 8.0, arm  # composed over the rounds by the accountant: within the budget
    # the slow site (3x) sets a synchronous round's end; one round: 1 upload, 2 sites x 1 epoch
    assert plain["Flower FedAvg round 1"][1:4] == ["1", "2", "3"]
    assert "| split | ε per site | Flower final AUROC" in table


def test_flower_round_one_is_taskvecs_mean_merge(smoke) -> None:
    """Same base, sites, local recipe and seeds: with two equal iid sites FedAvg's first global model (the
    example-weighted mean of the sites' models) is the base plus the mean of the sites' vectors."""
    from safetensors.torch import load_file

    folder, _ = smoke
    fedavg = load_file(str(folder / "flower" / "fedavg" / "global-r1.safetensors"))
    merged = load_file(str(folder / "oneshot" / "merged" / "mean.safetensors"))
    assert fedavg.keys() == merged.keys()
    assert max(float((fedavg[k].double() - merged[k].double()).abs().max()) for k in fedavg) < 1e-5
    base = load_file(str(folder / "oneshot" / "base.safetensors"))
    assert any(not fedavg[k].equal(base[k]) for k in base)  # the sites did train
    # client-level DP adds noise to what FedAvg averages
    noised = load_file(str(folder / "flower" / "fedavg-clientdp-eps8" / "global-r1.safetensors"))
    assert any(not noised[k].equal(fedavg[k]) for k in fedavg)
    flower_rows = json.loads((folder / "flower" / "fedavg" / "rows.json").read_text())
    assert [r["round"] for r in flower_rows] == [1] and len(flower_rows[0]["update_norms"]) == 2
