"""run.json records how each start and resumption ran (command, processes, device, versions), outside the
settings --resume compares, and nothing naming the machine."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch
from synthetic_data import image_folder

import taskvec
from taskvec.training.config import FinetuneConfig
from taskvec.training.run_folder import RUN_FILE, open_run, runtime_record


def test_finetune_records_how_it_ran(make_base, tmp_path: Path) -> None:
    base = make_base(num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    args = ["finetune", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1",
            "--device", "cpu"]
    p = subprocess.run([sys.executable, "-m", "taskvec", *args], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "WORLD_SIZE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    [record] = run["runtime"]
    assert record["command"] == ["python -m taskvec", *args]
    assert (record["processes"], record["device"]) == (1, "cpu")
    packages = record["packages"]
    assert packages["taskvec"] == taskvec.__version__ and packages["torch"] == torch.__version__
    assert {k: packages[k] for k in ("timm", "opacus")} == {k: version(k) for k in ("timm", "opacus")}
    assert record["python"] == platform.python_version()
    text = json.dumps(record)
    assert socket.gethostname() not in text and sys.executable not in text
    assert "runtime" not in run["config"]


def test_resume_appends_a_record_and_compares_only_settings(tmp_path: Path) -> None:
    cfg = FinetuneConfig(steps=2, device="cpu")
    split = {"unit": "image", "train": ["a.png"], "val": []}
    first = runtime_record(1, torch.device("cpu"))
    run_id = open_run(tmp_path / "run", "parent", cfg, "data", split, first)
    later = first | {"processes": 4, "device": "cuda:0", "packages": {"torch": "9.9"}}  # another machine, later
    resumed = FinetuneConfig(steps=2, device="cuda:0", resume=True)
    assert open_run(tmp_path / "run", "parent", resumed, "data", split, later) == run_id
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert run["runtime"] == [first, later] and run["run_id"] == run_id and run["config"]["steps"] == 2
