"""Executors: Ray tasks train the same models as local processes, a Ray task whose worker is killed resumes its
run, and a whole simulation on Ray equals the local one (skipped where Ray is not installed)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec.errors import ConfigError
from taskvec.simulation.executors import Resources, run_job, run_jobs
from taskvec.simulation.simulate import SimulationConfig, simulate
from taskvec.simulation.synthetic import write_classification_npz
from taskvec.training.data import load_data
from taskvec.training.loop import FinetuneConfig

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray() -> object:
    """A Ray instance on this machine with 2 CPUs (loopback only), for the module's tests."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def same_models(a: str | Path, b: str | Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def jobs_for(tmp: Path, make_base, n: int = 96, epochs: int = 2):  # type: ignore[no-untyped-def]
    base = make_base(arch="test_convnext", num_classes=2, in_chans=1, img_size=32)
    data = write_classification_npz(tmp / "data.npz", n_train=n, n_val=8, n_test=8, size=32, seed=1)
    from taskvec.models.spec import model_spec

    ds = load_data(data, model_spec(base), val_fraction=0.0).train
    return str(base), ds, FinetuneConfig(epochs=epochs, batch_size=16, device="cpu", resume=True, train="all",
                                          val_fraction=0.0)


def test_ray_trains_the_same_models_as_local_processes(tmp_path: Path, make_base, local_ray) -> None:  # type: ignore[no-untyped-def]
    base, ds, cfg = jobs_for(tmp_path, make_base)
    halves = [ds.subset(range(0, 48)), ds.subset(range(48, 96))]

    def jobs(root: str) -> list:  # type: ignore[type-arg]
        return [(base, d, str(tmp_path / root / f"site{i}"), replace(cfg, seed=10 + i)) for i, d in enumerate(halves)]

    local = run_jobs(jobs("local"), "local", Resources(jobs=2), print)
    remote = run_jobs(jobs("ray"), "ray", Resources(cpus=1), print)
    assert [Path(p).parent.name for p in remote] == ["site0", "site1"]
    assert all(same_models(a, b) for a, b in zip(local, remote))
    assert not same_models(local[0], local[1])


def test_a_killed_ray_task_resumes_its_run(tmp_path: Path, make_base, local_ray) -> None:  # type: ignore[no-untyped-def]
    psutil = pytest.importorskip("psutil")
    base, ds, cfg = jobs_for(tmp_path, make_base, n=200, epochs=4)
    run = tmp_path / "ray" / "site0"
    killed: list[int] = []

    def kill_after_first_epoch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not (run / "checkpoint.safetensors").exists():
            time.sleep(0.05)
        for p in psutil.process_iter(["cmdline"]):
            if any("ray::run_job" in part for part in p.info["cmdline"] or []):
                p.kill()
                killed.append(p.pid)

    watcher = threading.Thread(target=kill_after_first_epoch)
    watcher.start()
    (model,) = run_jobs([(base, ds, str(run), cfg)], "ray", Resources(cpus=1), print)
    watcher.join()
    assert killed, "the task finished before its worker could be killed"
    assert json.loads((run / "metrics.json").read_text())["resumed_from_epoch"] >= 1
    threads = torch.get_num_threads()
    try:  # uninterrupted, with the task's one thread
        reference = run_job((base, ds, str(tmp_path / "local" / "site0"), cfg), threads=1)
    finally:
        torch.set_num_threads(threads)
    assert same_models(model, reference)


def test_simulation_on_ray_equals_local_and_resumes_across_executors(tmp_path: Path, local_ray) -> None:  # type: ignore[no-untyped-def]
    data = write_classification_npz(tmp_path / "data.npz", n_train=120, n_val=20, n_test=40, size=32, seed=2)
    cfg = SimulationConfig(data=str(data), out=str(tmp_path / "local"), sites=2, arch="test_convnext", in_chans=1,
                           img_size=32, epochs=1, base_epochs=1, methods=["mean"], calibrate=False, batch_size=16,
                           jobs=2)
    rows = {r["name"]: r["value"] for r in simulate(cfg).rows}
    on_ray = replace(cfg, out=str(tmp_path / "ray"), executor="ray", jobs=1)
    assert {r["name"]: r["value"] for r in simulate(on_ray).rows} == rows
    for name in ("sites/site0", "sites/site1", "centralised"):
        assert same_models(*(tmp_path / side / name / "model.safetensors" for side in ("local", "ray")))
    (tmp_path / "ray" / "sites" / "site1" / "model.safetensors").unlink()  # the driver died before it finished
    (tmp_path / "ray" / "sites" / "site1" / "metrics.json").unlink()
    again = simulate(replace(on_ray, executor="local", jobs=2))  # the other executor picks it up
    assert {r["name"]: r["value"] for r in again.rows} == rows


def test_unknown_executor_or_missing_ray_is_refused_before_any_file(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    cfg = SimulationConfig(data=str(tmp_path / "none.npz"), out=str(tmp_path / "out"), executor="slurm")
    with pytest.raises(ConfigError, match="executor must be one of local, ray"):
        simulate(cfg)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'taskvec\[ray\]'"):
        simulate(replace(cfg, executor="ray"))
    assert not (tmp_path / "out").exists()
