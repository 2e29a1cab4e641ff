"""A run folder: its files, `run.json` (run id, parent, settings), `split.json` (the units that trained and
validated, which stays at the site: no model or vector file carries it), the end-of-epoch checkpoint (written
atomically, safetensors, no pickle) and the result read back from `metrics.json`."""

from __future__ import annotations

import json
import uuid
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from taskvec.errors import FileFormatError, MismatchError, OutputExistsError, TaskvecError, first_line
from taskvec.io.files import Fields, read_kind, read_record, write_json
from taskvec.io.schema import FORMAT, FORMAT_VERSION
from taskvec.io.tensors import save_tensors
from taskvec.privacy.dpsgd import DPConfig
from taskvec.training.config import RUNTIME_FIELDS, FinetuneConfig

MODEL_FILE, CHECKPOINT_FILE = "model.safetensors", "checkpoint.safetensors"
METRICS_FILE, RUN_FILE, SPLIT_FILE = "metrics.json", "run.json", "split.json"


@dataclass
class FinetuneResult:
    run_dir: Path
    model_path: Path
    identity: str
    run_id: str
    samples: int
    epochs: int
    steps: int
    history: list[dict[str, Any]]
    val_metrics: dict[str, Any]
    resumed_from_epoch: int = 0
    skipped: int = 0
    warnings: list[str] = field(default_factory=list)
    composed_epsilon: float | None = None  # ε of this run and its earlier releases (`DPConfig.prior`) together


_DP_DEFAULTS = json.loads(json.dumps({f.name: f.default for f in fields(DPConfig) if f.default is not MISSING}))


def config_dict(config: FinetuneConfig) -> dict[str, Any]:
    """The settings a resumed run must repeat."""
    stored = json.loads(json.dumps(asdict(config), default=str))  # as run.json holds it (tuples as lists)
    return {k: v for k, v in stored.items() if k not in RUNTIME_FIELDS}


def runtime_record(processes: int, device: torch.device) -> dict[str, Any]:
    """How a run (or a resumption of it) ran: the command line (the program's name without its folder),
    processes, device, Python, OS and the installed versions of taskvec and its dependencies. Nothing that
    names the machine or its user (host name, user name, environment). Never compared on --resume."""
    import platform
    import re
    import sys
    from importlib.metadata import PackageNotFoundError, requires, version

    from taskvec.io.files import now

    names = ["taskvec", *(m.group(0) for r in requires("taskvec") or [] if "extra ==" not in r
                          and (m := re.match(r"[A-Za-z0-9._-]+", r)))]
    packages: dict[str, str | None] = {}
    for name in names:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    packages["torch"] = torch.__version__  # with its build (e.g. 2.5.1+cu124), which the metadata leaves out
    program = Path(sys.argv[0] if sys.argv else "")
    record: dict[str, Any] = {
        "started": now(), "command": [f"python -m {program.parent.name}" if program.name == "__main__.py"
                                      else program.name, *sys.argv[1:]],
        "processes": processes, "device": str(device), "python": platform.python_version(),
        "os": f"{platform.system()} {platform.machine()}", "packages": packages,
    }
    if device.type == "cuda":
        record |= {"accelerator": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return record


def _differences(started: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'name old (now new)' for each setting that differs, nested ones by their dotted name (dp.earlier)."""
    found = []
    for k, v in now.items():
        old = started.get(k)
        if isinstance(old, dict) and isinstance(v, dict):
            found += _differences(old, v, f"{prefix}{k}.")
        elif old != v:
            found.append(f"{prefix}{k} {old!r} (now {v!r})")
    return found


_RUN_FIELDS: Fields = {"parent": str, "run_id": str, "config": dict, "runtime": (list, type(None))}
_SPLIT_FIELDS: Fields = {"train": list, "val": list}
_METRICS_FIELDS: Fields = {"identity": str, "run_id": str, "samples.train": int, "epochs": int, "steps": int,
                            "history": list, "val_metrics": dict, "resumed_from_epoch": int, "skipped": int,
                            "composed_epsilon": (float, int, type(None))}


def _read_record(path: Path, fields: Fields) -> dict[str, Any]:
    return read_record(path, fields, "start a new run in another folder")


def _check_same_run(out: Path, run: dict[str, Any], parent: str, config: FinetuneConfig) -> None:
    """Refuse to resume a run from another base or with other settings than it started with."""
    if run["parent"] != parent:
        raise MismatchError(f"{out}: was started from base {run['parent'][:12]}, not {parent[:12]}")
    started = config_dict(FinetuneConfig()) | run["config"]  # a field newer than the run: its default
    if isinstance(started.get("dp"), dict):  # and so for a DP field
        started["dp"] = _DP_DEFAULTS | started["dp"]
    diff = _differences(started, config_dict(config))
    if diff:
        raise MismatchError(f"{out}: the run was started with {', '.join(diff)}; repeat its options to resume it")


def open_run(out: Path, parent: str, config: FinetuneConfig, source: str, split: dict[str, Any],
             runtime: dict[str, Any]) -> str:
    """Create or reopen a run folder and record its split and how it runs (`runtime_record`: `runtime` in
    run.json lists the start and each resumption); return its run id. Refuse to reuse a folder without
    --resume, or to resume it on other units than it started with."""
    run_file = out / RUN_FILE
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise OutputExistsError(f"{out}: run folder exists; pass `resume` to continue it, or choose another `out_dir`",
                                path=out)
    if config.resume and run_file.exists():
        run = _read_record(run_file, _RUN_FIELDS)
        _check_same_run(out, run, parent, config)
        _check_split(out / SPLIT_FILE, split)
        write_json(run_file, run | {"runtime": [*(run.get("runtime") or []), runtime]})
        return str(run["run_id"])
    if config.resume and out.exists() and any(out.iterdir()):
        raise TaskvecError(f"{out}: holds no {RUN_FILE}; it is not a taskvec run folder")
    out.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex
    write_json(run_file, {"run_id": run_id, "parent": parent, "config": config_dict(config), "data": source,
                          "runtime": [runtime]})
    write_json(out / SPLIT_FILE, split)
    return run_id


def _check_split(path: Path, split: dict[str, Any]) -> None:
    """Refuse to resume a run on other training or validation units than it started with (its privacy ledger
    would then describe no one data set); record the split of a run folder that predates `split.json`."""
    if not path.exists():
        write_json(path, split)
        return
    before = _read_record(path, _SPLIT_FIELDS)
    if before != split:
        moved = {side: len(set(before.get(side, [])) ^ set(split[side])) for side in ("train", "val")}
        raise MismatchError(f"{path.parent}: the data changed since the run started ({moved['train']} training and "
                            f"{moved['val']} validation {split['unit']}s differ from {path.name}); resume it on the "
                            "same data, or start a new run", path=path)


def finished(out: Path, parent: str, config: FinetuneConfig, split: dict[str, Any]) -> FinetuneResult:
    """The result of a finished run, from its `metrics.json`, if it ran from base `parent` with `config` on the
    units of `split` (as `open_run` refuses to resume a run otherwise)."""
    _check_same_run(out, _read_record(out / RUN_FILE, _RUN_FIELDS), parent, config)
    if (out / SPLIT_FILE).exists():
        _check_split(out / SPLIT_FILE, split)
    m = _read_record(out / METRICS_FILE, _METRICS_FIELDS)
    return FinetuneResult(out, out / MODEL_FILE, m["identity"], m["run_id"], m["samples"]["train"], m["epochs"],
                          m["steps"], m["history"], m["val_metrics"], m["resumed_from_epoch"], m["skipped"],
                          ["the run had already finished; nothing to do"], m.get("composed_epsilon"))


def save_checkpoint(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    """Model, optimizer and EMA tensors plus JSON state, written atomically as safetensors."""
    tensors = {f"model/{k}": v for k, v in net.state_dict().items()} | {f"ema/{k}": v for k, v in ema.items()}
    sd = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optimizer/{pid}/{name}"] = v
            else:
                scalars.setdefault(str(pid), {})[name] = v
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "checkpoint", **meta,
            "optimizer": {"param_groups": sd["param_groups"], "scalars": scalars}}
    save_tensors(tensors, path, meta, force=True)


def load_checkpoint(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer,
                    ema: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Restore model, optimizer and EMA in place; return the checkpoint's JSON state. A checkpoint whose tensors
    or optimizer state do not fit this run (edited, truncated, or from another model) is a FileFormatError."""
    meta = read_kind(path, "checkpoint").meta
    tensors = load_file(str(path))
    try:
        net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
        for k in ema:
            ema[k].copy_(tensors[f"ema/{k}"])
        state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer/"):
                _, pid, name = k.split("/", 2)
                state.setdefault(int(pid), {})[name] = v
        for pid, d in meta["optimizer"]["scalars"].items():
            state.setdefault(int(pid), {}).update(d)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise FileFormatError(f"{path}: does not fit this run ({first_line(e)[:200]}); delete it to start the run over",
                              path=path) from None
    return meta
