"""Where a simulation's fine-tunes run: `local` processes on this machine (the default) or `ray` tasks on a Ray
instance, local or a cluster's.

Every job is one `taskvec.training.loop.finetune` into its own run folder with `resume` on, so an executor only
decides where it runs: a job whose run finished is reused, one that was interrupted (a worker killed, the driver
gone) continues from its last finished epoch when it runs again, and each run's seeds come from its config, so
the models are the same whichever executor trained them with the same number of threads per run. Executors
register in `EXECUTORS` by name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from taskvec.errors import ConfigError, TaskvecError, first_line
from taskvec.training.run_folder import METRICS_FILE

if TYPE_CHECKING:
    from taskvec.training.config import FinetuneConfig
    from taskvec.training.data import ImageDataset

Job = tuple[str, "ImageDataset", str, "FinetuneConfig"]  # (base, data, run folder, config)
Progress = Callable[[str], None]
RAY_MISSING = "executor ray needs Ray: pip install 'taskvec[ray]'"
RAY_RETRIES = 3  # a Ray task whose worker died is run again (resuming its run) up to this many times


@dataclass(frozen=True)
class Resources:
    """What the executor may use: `jobs` runs at once (local), the Ray `address` (None: a new local instance,
    `auto`: the running one), and each Ray task's CPUs (its torch threads) and GPUs."""

    jobs: int = 1
    address: str | None = None
    cpus: int = 1
    gpus: float = 0.0


def finished(run: str | Path) -> bool:
    return (Path(run) / METRICS_FILE).exists()


def run_job(job: Job, threads: int | None) -> str:
    """Fine-tune one job (with `threads` torch threads when given); the path of its model."""
    import torch

    from taskvec.training.loop import finetune

    if threads:
        torch.set_num_threads(threads)
    base, ds, run, config = job
    return str(finetune(base, ds, run, config).model_path)


def _run_star(args: tuple[Job, int | None]) -> str:
    return run_job(*args)


def run_local(jobs: list[Job], res: Resources, progress: Progress) -> list[str]:
    """In this process one after another, or in `res.jobs` spawned processes sharing the CPU's cores."""
    if res.jobs == 1:
        out = []
        for job in jobs:
            if not finished(job[2]):
                progress(f"fine-tuning {Path(job[2]).name} on {len(job[1])} samples")
            out.append(run_job(job, None))
        return out
    todo = sum(not finished(j[2]) for j in jobs)
    threads = max(1, (os.cpu_count() or 1) // res.jobs)
    if todo:
        progress(f"fine-tuning {todo} runs in {res.jobs} processes")
    with ProcessPoolExecutor(res.jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_run_star, [(j, threads) for j in jobs]))


def run_ray(jobs: list[Job], res: Resources, progress: Progress) -> list[str]:
    """As Ray tasks of `res.cpus` CPUs and `res.gpus` GPUs each, on the instance at `res.address` (started
    here, with this machine's cores, when None); a task whose worker dies is retried and resumes its run."""
    import ray

    if not ray.is_initialized():
        ray.init(address=res.address, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": str(res.cpus)}})
    task = ray.remote(num_cpus=res.cpus, num_gpus=res.gpus, max_retries=RAY_RETRIES)(run_job)
    todo = sum(not finished(j[2]) for j in jobs)
    if todo:
        progress(f"fine-tuning {todo} runs as Ray tasks ({res.cpus} CPU, {res.gpus:g} GPU each)")
    try:
        return list(ray.get([task.remote(j, res.cpus) for j in jobs]))
    except ray.exceptions.RayError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, TaskvecError):
            raise cause from None
        raise TaskvecError(f"a Ray task failed: {first_line(e)}") from None


EXECUTORS: dict[str, Callable[[list[Job], Resources, Progress], list[str]]] = {"local": run_local, "ray": run_ray}


def check_executor(name: str) -> None:
    """Refuse an unknown executor, and `ray` where Ray is not installed, before anything runs."""
    import importlib.util

    if name not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {name!r}", field="executor",
                          expected=list(EXECUTORS), got=name)
    if name == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError(RAY_MISSING, field="executor", got=name)


def run_jobs(jobs: list[Job], executor: str, res: Resources, progress: Progress) -> list[str]:
    """Every job's model path, in order, trained by `executor`."""
    check_executor(executor)
    return EXECUTORS[executor](jobs, res, progress)

