"""The library speaks in parameters, the CLI in flags: a bad value raises `ConfigError` (a `ValueError`) naming
the parameter, and the same value on the command line prints its flag on one stderr line and exits 2."""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from taskvec.errors import ConfigError, TaskvecError
from taskvec.privacy.ledger import PrivacyBudget

ROOT = Path(__file__).resolve().parents[2]


def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """Run the console entry point in this process: (exit code, stderr)."""
    from taskvec.cli.app import main

    monkeypatch.setattr(sys, "argv", ["taskvec", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return int(e.value.code or 0), capsys.readouterr().err


def _files(tmp: Path, make_base: Callable[..., Path], make_finetuned: Callable[..., Path]) -> dict[str, Path]:
    from taskvec.merging.export import export_vector

    base = make_base()
    ft = make_finetuned(base, 1)
    vec = export_vector(ft, base, tmp / "v.safetensors").path
    return {"base": base, "ft": ft, "vec": vec, "out": tmp / "out.safetensors", "run": tmp / "run"}


def _export(f: dict[str, Path], **kw: Any) -> None:
    from taskvec.merging.export import export_vector

    export_vector(f["ft"], f["base"], f["out"], **kw)


def _merge(f: dict[str, Path], **kw: Any) -> None:
    from taskvec.merging.stream import merge_vectors

    merge_vectors([f["vec"]], f["base"], f["out"], **kw)


def _finetune(f: dict[str, Path], **kw: Any) -> None:
    from taskvec.training.loop import FinetuneConfig, finetune

    finetune(f["base"], f["run"], f["run"], FinetuneConfig(**kw))


def _simulate(f: dict[str, Path], **kw: Any) -> None:
    from taskvec.simulation.simulate import SimulationConfig, simulate

    simulate(SimulationConfig(data=str(f["base"]), out=str(f["run"]), **kw))


def _init(f: dict[str, Path], **kw: Any) -> None:
    from taskvec.models.spec import build_base

    build_base("test_vit", **kw)


def _registry(f: dict[str, Path], **kw: Any) -> None:
    from taskvec.registry import open_registry

    open_registry(str(f["run"]), **kw)


# (library call, its bad keyword arguments, the field, the same on the command line, the flag it prints)
CASES = [
    (_export, {"clip": -1.0}, "clip", ["export", "{ft}", "--base", "{base}", "--out", "{out}", "--clip", "-1"],
     "--clip must be"),
    (_export, {"dtype": "fp8"}, "dtype", ["export", "{ft}", "--base", "{base}", "--out", "{out}", "--dtype", "fp8"],
     "--dtype must be"),
    (_export, {"clip": 1.0, "epsilon": 1.0}, "delta",
     ["export", "{ft}", "--base", "{base}", "--out", "{out}", "--clip", "1", "--epsilon", "1"],
     "--delta is needed with --epsilon"),
    (_merge, {"budget": PrivacyBudget(2.0)}, "unit",
     ["merge", "{vec}", "--base", "{base}", "--out", "{out}", "--max-epsilon", "2"],
     "--unit must name what --max-epsilon"),
    (_merge, {"method": "ties", "density": 2.0}, "density",
     ["merge", "{vec}", "--base", "{base}", "--out", "{out}", "--method", "ties", "--density", "2"],
     "--density must be"),
    (_merge, {"budget": PrivacyBudget(-1.0, "site")}, "max_epsilon",
     ["merge", "{vec}", "--base", "{base}", "--out", "{out}", "--max-epsilon", "-1"], "--max-epsilon must be"),
    (_finetune, {"epochs": 1, "steps": 2}, "epochs",
     ["finetune", "--base", "{base}", "--data", "{run}", "--out", "{run}", "--epochs", "1", "--steps", "2"],
     "--epochs and --steps exclude each other"),
    (_finetune, {"lr": -1.0}, "lr",
     ["finetune", "--base", "{base}", "--data", "{run}", "--out", "{run}", "--lr", "-1"], "--lr must be"),
    (_simulate, {"sites": 0}, "sites", ["simulate", "--data", "{base}", "--out", "{run}", "--sites", "0"],
     "--sites must be >= 1"),
    (_simulate, {"rounds": 2, "speeds": [1.0]}, "speeds",
     ["simulate", "--data", "{base}", "--out", "{run}", "--rounds", "2", "--speeds", "1"], "--speeds must give"),
    (_simulate, {"rounds": 2, "train": "stats-head:8"}, "rounds",
     ["simulate", "--data", "{base}", "--out", "{run}", "--rounds", "2", "--train", "stats-head:8"],
     "--rounds re-train each site"),
    (_export, {"samples": 2**60}, "samples",
     ["export", "{ft}", "--base", "{base}", "--out", "{out}", "--samples", str(2**60)], "--samples must be"),
    (_finetune, {"seed": -1}, "seed",
     ["finetune", "--base", "{base}", "--data", "{run}", "--out", "{run}", "--seed", "-1"],
     "--seed must be a non-negative integer"),
    (_finetune, {"contributor": "../x"}, "contributor",
     ["finetune", "--base", "{base}", "--data", "{run}", "--out", "{run}", "--contributor", "../x"],
     "--contributor id '../x' cannot name a registry folder"),
    (_init, {"num_classes": 0}, "num_classes",
     ["init", "--arch", "test_vit", "--num-classes", "0", "--out", "{out}"], "--num-classes must be in 1..100000"),
    (_init, {"num_classes": 10**8}, "num_classes",  # refused before a 10⁸-row head is allocated
     ["init", "--arch", "test_vit", "--num-classes", str(10**8), "--out", "{out}"], "--num-classes must be in"),
    (_init, {"num_classes": 2, "labels": ["a", "a"]}, "labels",
     ["init", "--arch", "test_vit", "--num-classes", "2", "--labels", "a,a", "--out", "{out}"],
     "--labels must name each class once, got 'a' more than once"),
    (_init, {"num_classes": 2, "seed": -1}, "seed",
     ["init", "--arch", "test_vit", "--num-classes", "2", "--seed", "-1", "--out", "{out}"], "--seed must be"),
    (_init, {"num_classes": 2, "labels": ["a"]}, "labels",
     ["init", "--arch", "test_vit", "--num-classes", "2", "--labels", "a", "--out", "{out}"],
     "--labels names 1 classes but --num-classes is 2"),
    (_init, {"num_classes": 2, "img_size": 4}, "img_size",  # below the ViT's patch: no site could fine-tune it
     ["init", "--arch", "test_vit", "--num-classes", "2", "--img-size", "4", "--out", "{out}"],
     "--img-size 4 does not fit test_vit"),
    (_registry, {"revision": "v1"}, "revision", ["list", "--registry", "{run}", "--revision", "v1"],
     "--revision applies"),
]


@pytest.mark.parametrize(("call", "kwargs", "field", "argv", "printed"), CASES,
                         ids=[f"{c[0].__name__[1:]}-{c[2]}" for c in CASES])
def test_bad_parameter_in_python_and_on_the_command_line(
    call: Callable[..., None], kwargs: dict[str, Any], field: str, argv: list[str], printed: str,
    make_base: Callable[..., Path], make_finetuned: Callable[..., Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    files = _files(tmp_path, make_base, make_finetuned)
    with pytest.raises(ConfigError) as e:
        call(files, **kwargs)
    assert isinstance(e.value, ValueError) and e.value.field == field
    assert str(e.value).startswith(field) and "--" not in str(e.value)
    code, err = cli(monkeypatch, capsys, *[a.format(**files) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"error: {printed}"), err
    assert not files["out"].exists() and not files["run"].exists()


@pytest.mark.parametrize("argv", [
    ["merge", "{vec}", "--base", "{base}"],  # no --out
    ["merge", "{vec}", "--base", "{base}", "--out", "{out}", "--state", "{run}"],  # --state without --incremental
    ["merge", "{vec}", "--base", "{base}", "--out", "{out}", "--only-contributor", "a"],  # a filter, no --registry
    ["finetune", "--base", "{base}", "--data", "{run}", "--out", "{run}", "--target-epsilon", "3"],  # no --dp
    ["merge", "{vec}", "--base", "{base}", "--out", "{out}", "--dense"],  # typer's own usage error
])
def test_option_conflicts_exit_2(argv: list[str], make_base: Callable[..., Path], make_finetuned: Callable[..., Path],
                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    files = _files(tmp_path, make_base, make_finetuned)
    code, err = cli(monkeypatch, capsys, *[a.format(**files) for a in argv])
    assert code == 2 and "--" in err and not files["out"].exists(), err


def test_other_errors_name_parameters_in_backticks_and_exit_1(
    make_base: Callable[..., Path], make_finetuned: Callable[..., Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    files = _files(tmp_path, make_base, make_finetuned)
    with pytest.raises(TaskvecError, match="exists; pass `force` to overwrite it") as e:
        _export(files | {"out": files["vec"]})
    assert e.value.path == str(files["vec"]) and not isinstance(e.value, ConfigError)
    code, err = cli(monkeypatch, capsys, "export", files["ft"], "--base", files["base"], "--out", files["vec"])
    assert code == 1 and err.strip() == f"error: {files['vec']}: exists; pass --force to overwrite it"


def test_no_library_message_names_a_flag() -> None:
    """Outside docstrings, a library string names a flag only inside a whole `taskvec ...` command line."""
    found = []
    for folder in ("taskvec", "registry"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            docs = {id(n.body[0].value) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.body and isinstance(n.body[0], ast.Expr)}
            docs |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
            for n in ast.walk(tree):
                if isinstance(n, ast.JoinedStr):  # an f-string: its literal parts joined, commands checked whole
                    text = "{}".join(v.value for v in n.values if isinstance(v, ast.Constant))
                elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
                    text = n.value
                else:
                    continue
                if re.search(r"--[a-z]", re.sub(r"`taskvec [^`]*`?", "", text)):
                    found.append(f"{path.relative_to(ROOT)}:{n.lineno}: {text[:80]!r}")
    assert not found, "\n".join(found)


def test_sigterm_unwinds_like_ctrl_c(tmp_path: Path) -> None:
    """A scheduler's SIGTERM ends the command with one line and exit 143, after the scratch folder of registry
    copies is removed (the default action would kill the process and leave it)."""
    import subprocess

    code = ("import os, signal, sys, time\n"
            "from taskvec.cli import app\n"
            "from taskvec.cli.exchange import scratch_dir\n"
            "@app.app.command('work')\n"
            "def work() -> None:\n"
            "    d = scratch_dir(); (d / 'copy').write_bytes(b'x'); print(d, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(60)\n"
            "sys.argv = ['taskvec', 'work']; app.main()\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (p.returncode, p.stderr) == (143, "error: terminated\n"), p.stderr
    assert Path(p.stdout.strip()).parent == tmp_path and not list(tmp_path.iterdir())
