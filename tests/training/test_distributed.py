"""`taskvec finetune` under torchrun (2 gloo processes on CPU): the same model as one process with the same
global batch, the same DP ledger, resume after `kill -9` of one rank; samplers and the distributed DP step
checked against one process. GPU checks (NCCL, mixed precision under DDP) run only with 2 GPUs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic_data import npz_file

from taskvec.errors import ConfigError
from taskvec.io.files import read_header, read_kind
from taskvec.models.spec import load_model
from taskvec.privacy.dpsgd import DPConfig, PatientPoissonSampler
from taskvec.training.distributed import Group, ShardSampler, augment_bits, shard_loader
from taskvec.training.loop import FinetuneConfig, finetune

pytestmark = pytest.mark.filterwarnings("ignore")
SUPPORT = Path(__file__).resolve().parents[1] / "support"
IMAGES, EPOCHS, BATCH, LR = 32, 12, 8, 2e-3  # 12 short epochs: time to kill a rank between checkpoints
# One process vs two with the same global batch: the same images and augmentations in every step; only the
# order of floating-point sums differs (DDP averages two half-batch means), which AdamW's normalisation
# amplifies over the steps. Tolerance: the largest weight difference stays below 2% of the largest weight
# change from the base (measured: 1.4e-4 against 4.4e-2, 0.3%, after 48 steps).
WEIGHT_TOL = 0.02


# A rank of a finished run can abort in gloo's teardown on a loaded machine (seen twice in full suites at load
# ~5 on 2 cores; the same test passed alone and on rerun): where a rerun is harmless, a test retries it once.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def torchrun(*args: str, nproc: int = 2, check: bool = True, **popen: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, **popen)  # type: ignore[call-overload]
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r  # type: ignore[no-any-return]


def finetune_cli(base: Path, data: Path, out: Path, *extra: str, epochs: int = EPOCHS,
                 device: str = "cpu") -> list[str]:
    batch = ["--batch-size", str(BATCH)] if "--dp" not in extra else []  # DP-SGD samples at --sample-rate
    return ["-m", "taskvec.cli.app", "finetune", "--base", str(base), "--data", str(data), "--out", str(out),
            "--epochs", str(epochs), *batch, "--lr", str(LR), "--device", device, *extra]


@pytest.fixture
def site(tmp_path: Path, make_base: Callable[..., Path]) -> tuple[Path, Path]:
    return make_base("test_vit", num_classes=2, in_chans=1), npz_file(tmp_path / "d.npz", n=IMAGES)


def test_two_processes_train_the_one_process_model(tmp_path: Path, site: tuple[Path, Path]) -> None:
    base, data = site
    r = torchrun(*finetune_cli(base, data, tmp_path / "two"))
    assert r.stdout.count("wrote ") == 1 and r.stdout.count(f"epoch {EPOCHS}: train loss") == 1  # rank 0 reports
    torch.set_num_threads(1)
    try:
        one = finetune(base, data, tmp_path / "one", FinetuneConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR,
                                                                   device="cpu"))
    finally:
        torch.set_num_threads(2)
    two = read_kind(tmp_path / "two" / "model.safetensors", "model").meta
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["metrics.json", "model.safetensors", "run.json",
                                                                    "split.json"]
    assert two["training"]["steps"] == one.steps == EPOCHS * IMAGES // BATCH
    assert two["training"]["samples"] == IMAGES
    assert two["model"] == read_kind(one.model_path, "model").meta["model"]
    w1, w2, w0 = (load_file(str(p)) for p in (one.model_path, tmp_path / "two" / "model.safetensors", base))
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w0)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w0)
    assert diff < WEIGHT_TOL * moved, (diff, moved)
    history = json.loads((tmp_path / "two" / "metrics.json").read_text())["history"]
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in one.history], rel=1e-3)
    load_model(tmp_path / "two" / "model.safetensors")  # the file loads as any fine-tuned model

    # kill -9 one rank after the first checkpoint: torchrun stops the other; --resume ends at the same model
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             *finetune_cli(base, data, cut)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "checkpoint.safetensors").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not (cut / "model.safetensors").exists(), "the run finished before a rank could be killed"
    done = read_header(cut / "checkpoint.safetensors").meta["epoch"]
    assert 1 <= done < EPOCHS
    r = torchrun(*finetune_cli(base, data, cut, "--resume"))
    assert f"resumed after epoch {done}" in r.stdout
    resumed = read_kind(cut / "model.safetensors", "model").meta
    assert resumed["identity"] == two["identity"]  # gloo sums in a fixed order: bit for bit
    for run, starts in ((tmp_path / "two", 1), (cut, 2)):  # how it ran: the start, then each resumption
        runtime = json.loads((run / "run.json").read_text())["runtime"]
        assert [(r["processes"], r["device"]) for r in runtime] == [(2, "cpu")] * starts


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (Linux /proc)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for pid in children:
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_dp_ledger_is_the_one_process_ledger(tmp_path: Path, site: tuple[Path, Path]) -> None:
    base, data = site
    dp = ["--dp", "--target-epsilon", "3.7", "--noise-multiplier", "1.2", "--no-augment"]
    torchrun(*finetune_cli(base, data, tmp_path / "two", *dp, epochs=2))
    config = FinetuneConfig(epochs=2, lr=LR, device="cpu", augment=False,
                            dp=DPConfig(max_grad_norm=1.0, delta=1e-5, target_epsilon=3.7, noise_multiplier=1.2))
    one = finetune(base, data, tmp_path / "one", config)
    (e1,) = read_kind(one.model_path, "model").meta["privacy"]
    (e2,) = read_kind(tmp_path / "two" / "model.safetensors", "model").meta["privacy"]
    assert (e1["steps"], e1["sample_rate"]) == (6, 0.25)  # stopped at the target ε before the planned 8 steps
    own = ("run_id", "model")  # each run's id and the (noised) model it released
    assert {k: v for k, v in e2.items() if k not in own} == {k: v for k, v in e1.items() if k not in own}


def test_distributed_dp_step_is_the_one_process_step(tmp_path: Path) -> None:
    """Noise off, the same global batch: clipping per image or per patient on two ranks (patients whole per
    rank), summed across ranks, gives the one-process update.
    And rank 0's results and errors reach every rank."""
    from distributed_worker import one_step

    r = torchrun(str(SUPPORT / "distributed_worker.py"), str(tmp_path), check=False)
    if r.returncode and GLOO_TEARDOWN_ABORT in r.stderr:  # the worker rewrites every file: safe to run again
        r = torchrun(str(SUPPORT / "distributed_worker.py"), str(tmp_path), check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        told = json.loads((tmp_path / f"world2-rank{rank}.json").read_text())
        expected = "run folder exists" if rank == 0 else "rank 0 stopped: run folder exists"
        assert told == {"value": "from rank 0", "error": expected}
    for unit in ("image", "patient"):
        alone = one_step(Group(), unit == "patient")
        for rank in (0, 1):
            two = torch.load(tmp_path / f"world2-rank{rank}-{unit}.pt")
            assert torch.allclose(two, alone, atol=1e-6), (unit, rank, (two - alone).abs().max())
        assert (alone - one_step(Group(), unit == "image")).abs().max() > 1e-4  # the unit changes the step


def test_shard_sampler_splits_the_one_process_batches() -> None:
    ds = list(range(37))
    one = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5),
                                      drop_last=True)
    expected = [sorted(b.tolist()) for b in one]
    shards = []
    for rank in (0, 1):
        gen = torch.Generator().manual_seed(5)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, generator=gen, drop_last=True)
        shards.append([b.tolist() for b in shard_loader(loader, Group(rank, 2))])
    assert len(shards[0]) == len(shards[1]) == len(expected) == 4
    assert [sorted(a + b) for a, b in zip(*shards)] == expected
    assert not set(sum(shards[0], [])) & set(sum(shards[1], []))
    with pytest.raises(ConfigError, match="batch_size must be a multiple of the number of processes \\(3\\)"):
        shard_loader(one, Group(0, 3))
    assert isinstance(shard_loader(one, Group(1, 2)).sampler, ShardSampler)


def test_augment_bits_are_the_one_process_bits() -> None:
    alone = augment_bits((3, 8), torch.Generator().manual_seed(1), Group())
    parts = [augment_bits((3, 4), torch.Generator().manual_seed(1), Group(r, 2)) for r in (0, 1)]
    assert torch.equal(alone[:, 0::2], parts[0]) and torch.equal(alone[:, 1::2], parts[1])


def test_patient_sampler_keeps_patients_whole_per_rank() -> None:
    ids = [f"p{i % 7}" for i in range(30)]  # 7 patients, images interleaved
    samplers = [PatientPoissonSampler(ids, 0.25, torch.Generator().manual_seed(r), shard=(r, 2)) for r in (0, 1)]
    mine = [{ids[i] for p in s.patients for i in p} for s in samplers]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == set(ids)
    assert sum(len(p) for s in samplers for p in s.patients) == 30
    batches = [list(s) for s in samplers]
    assert len(batches[0]) == len(batches[1]) == 4  # the same number of steps on every rank, empty or not
    for r in (0, 1):
        for b in batches[r]:
            assert {ids[i] for i in b} <= mine[r]
            for pid in {ids[i] for i in b}:  # a sampled patient comes with all of their images
                assert sorted(i for i in b if ids[i] == pid) == [i for i in range(30) if ids[i] == pid]


def test_one_process_without_launcher_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    from taskvec.training.distributed import launched_rank, process_group

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "3")
    assert launched_rank() == 0
    with process_group(torch.device("cpu")) as g:
        assert (g.rank, g.world, g.main) == (0, 1, True) and g.on_main(lambda: 7) == 7 and g.sum(2.5) == 2.5
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL, mixed precision under DDP)")
def test_nccl_ddp_with_mixed_precision(tmp_path: Path, site: tuple[Path, Path]) -> None:
    base, data = site
    torchrun(*finetune_cli(base, data, tmp_path / "gpu", device="cuda"))
    meta = read_kind(tmp_path / "gpu" / "model.safetensors", "model").meta
    assert meta["training"]["steps"] == EPOCHS * IMAGES // BATCH
    w, w0 = load_file(str(tmp_path / "gpu" / "model.safetensors")), load_file(str(base))
    assert all(torch.isfinite(w[k]).all() for k in w) and any(not torch.equal(w[k], w0[k]) for k in w0)
