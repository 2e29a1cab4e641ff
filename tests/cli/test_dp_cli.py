"""The DP command line: `init --dp-compatible`, `merge --max-epsilon/--require-dp`, ledger in `inspect --json`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.errors import PrivacyError


def run(*args: object) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.stdout, r.stderr


def refused(*args: object) -> str:
    """The message of the error a command raises (the console script prints it as `error: ...`, exit 1)."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(r.exception, PrivacyError), r.output
    return str(r.exception)


def test_init_dp_compatible(tmp_path: Path) -> None:
    from taskvec.models.dp_ready import dp_problems
    from taskvec.models.spec import load_model, model_spec

    code, out, err = run("init", "--arch", "test_resnet", "--num-classes", "2", "--img-size", "32",
                         "--out", tmp_path / "b.safetensors", "--dp-compatible")
    assert code == 0, err
    assert "DP-ready" in out
    assert model_spec(tmp_path / "b.safetensors").dp_compatible is not None
    assert dp_problems(load_model(tmp_path / "b.safetensors")) == []
    code, _, err = run("init", "--arch", "test_convnext", "--num-classes", "2", "--img-size", "32",
                       "--out", tmp_path / "c.safetensors", "--dp-compatible")
    assert code == 0, err


@pytest.fixture
def vectors(make_base, make_finetuned, tmp_path: Path) -> tuple[Path, list[Path]]:
    base = make_base()
    paths = []
    for i, noise in enumerate([None, 1.0, 3.0]):
        out = tmp_path / f"v{i}.safetensors"
        extra = ["--clip", "1", "--noise-multiplier", str(noise), "--delta", "1e-5"] if noise else []
        code, _, err = run("export", make_finetuned(base, i), "--base", base, "--out", out, *extra)
        assert code == 0, err
        paths.append(out)
    return base, paths


def test_merge_budget_refusals(vectors: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from taskvec.privacy.ledger import gaussian_epsilon

    base, (clear, loose, tight) = vectors
    out = tmp_path / "m.safetensors"
    assert "v0.safetensors: carries no DP guarantee" in refused("merge", clear, tight, "--base", base, "--out", out,
                                                                "--require-dp")
    # the three exports are all of contributor 'anonymous': their runs compose (two Gaussian releases: μ-GDP)
    composed = gaussian_epsilon((1.0 + 3.0**-2) ** -0.5, 1e-5)
    msg = refused("merge", loose, tight, "--base", base, "--out", out, "--max-epsilon", "4.5", "--unit", "site")
    assert f"contributor 'anonymous': ε = {composed:.4g} per site (add-remove)" in msg and "2 runs composed" in msg
    msg = refused("merge", tight, "--base", base, "--out", out, "--max-epsilon", "2", "--unit", "patient")
    assert f"ε = {gaussian_epsilon(1.5, 1e-5):.4g} per patient" in msg  # replace-one: sensitivity 2·clip
    assert not out.exists()
    from taskvec.cli.console import error_message
    from taskvec.errors import ConfigError

    r = CliRunner().invoke(app, [str(a) for a in ("merge", tight, "--base", base, "--out", out, "--max-epsilon", "5")])
    assert isinstance(r.exception, ConfigError)  # exit 2 from the console script
    assert error_message(r.exception).startswith("--unit must name")  # a budget names its unit
    p = subprocess.run([sys.executable, "-m", "taskvec.cli.app", "merge", str(clear), "--base", str(base), "--out",
                        str(out), "--max-epsilon", "10", "--unit", "image"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("error: ") and "ε = ∞" in p.stderr

    code, printed, err = run("merge", loose, tight, "--base", base, "--out", out, "--max-epsilon", "7", "--unit",
                             "site", "--require-dp")
    assert code == 0, err
    assert "composed per site (add-remove)" in printed and re.search(rf"anonymous\s*│\s*{composed:.3g}\s", printed)
    code, js, _ = run("inspect", out, "--json")
    merged = json.loads(js)["metadata"]["merge"]
    assert [v["privacy"][0]["epsilon"] for v in merged["vectors"]] == pytest.approx(
        [gaussian_epsilon(1.0, 1e-5), gaussian_epsilon(3.0, 1e-5)])
    budget = merged["privacy_budget"]
    assert (budget["max_epsilon"], budget["unit"], budget["relation"], budget["require_dp"]) == (
        7.0, "site", "add-remove", True)
    assert budget["contributors"]["anonymous"]["epsilon"] == pytest.approx(composed)


def test_export_seed_is_gone(vectors: tuple[Path, list[Path]], make_finetuned, tmp_path: Path) -> None:
    """Seeded noise is public noise: there is no way to seed export noise."""
    base, _ = vectors
    code, _, err = run("export", make_finetuned(base, 9), "--base", base, "--out", tmp_path / "s.safetensors",
                       "--clip", "1", "--noise-multiplier", "1", "--delta", "1e-5", "--seed", "0")
    assert code == 2 and "--seed" in err and not (tmp_path / "s.safetensors").exists()


def test_finetune_dp_cli_reports_epsilon_and_refuses(make_base, tmp_path: Path) -> None:
    from synthetic_data import image_folder

    from taskvec.io.files import read_kind

    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=8, size=32)
    code, out, err = run("finetune", "--base", base, "--data", data, "--out", tmp_path / "run", "--epochs", "2",
                         "--sample-rate", "0.5", "--device", "cpu", "--dp", "--noise-multiplier", "1.2",
                         "--delta", "1e-5", "--max-grad-norm", "0.5")
    assert code == 0, err
    (entry,) = read_kind(tmp_path / "run" / "model.safetensors", "model").meta["privacy"]
    assert entry["noise_multiplier"] == 1.2 and entry["max_grad_norm"] == 0.5 and entry["unit"] == "image"
    assert (entry["sample_rate"], entry["steps"]) == (0.5, 4)  # 2 epochs of 1/q steps
    args = ("finetune", "--base", base, "--data", data, "--out", tmp_path / "r1", "--dp", "--target-epsilon", "3",
            "--batch-size", "4")
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code != 0 and "batch_size does not apply to DP-SGD" in str(r.exception)
    assert not (tmp_path / "r1").exists()
    assert f"dp-sgd ε {entry['epsilon']:.3g}" in out  # the last epoch's line states what the model carries
    code, _, _ = run("finetune", "--base", base, "--data", data, "--out", tmp_path / "r2", "--target-epsilon", "3")
    assert code != 0 and not (tmp_path / "r2").exists()  # DP options without --dp
    resnet = make_base("test_resnet", num_classes=2, name="resnet.safetensors")
    msg = refused("finetune", "--base", resnet, "--data", data, "--out", tmp_path / "r3", "--dp",
                  "--target-epsilon", "3")
    assert "`dp_compatible`" in msg and not (tmp_path / "r3").exists()


def test_finetune_epsilon_includes_lineage_flag(make_base, tmp_path: Path) -> None:
    """`--epsilon-includes-lineage` reaches the library (its refusals) and needs --dp (the lineage's calibration:
    tests/privacy/test_two_stages.py)."""
    from synthetic_data import image_folder

    from taskvec.errors import ConfigError

    base = make_base("test_vit", num_classes=2)
    data = image_folder(tmp_path / "data", n_per_class=4, size=32)
    common = ("finetune", "--base", base, "--data", data, "--out", tmp_path / "run", "--epsilon-includes-lineage")
    code, _, err = run(*common, "--target-epsilon", "3")
    assert code == 2 and "add --dp" in err
    r = CliRunner().invoke(app, [str(a) for a in (*common, "--dp", "--target-epsilon", "3", "--device", "cpu")])
    assert isinstance(r.exception, ConfigError) and "give `contributor`" in str(r.exception)
    assert "count against a `target_epsilon`" in refused(*common, "--dp", "--noise-multiplier", "1")
    assert not (tmp_path / "run").exists()

def test_dp_option_defaults_are_the_library_recipe() -> None:
    """The command line's DP defaults come from `taskvec.privacy`, not copies (simulate's too)."""
    import typer

    from taskvec import privacy
    from taskvec.simulation.simulate import SimulationConfig

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    finetune = {p.name: p.default for p in commands["finetune"].params}
    simulate = {p.name: p.default for p in commands["simulate"].params}
    assert (finetune["delta"], finetune["max_grad_norm"], finetune["sample_rate"], finetune["augmult"]) == (
        privacy.DEFAULT_DELTA, privacy.DEFAULT_MAX_GRAD_NORM, privacy.DEFAULT_SAMPLE_RATE, privacy.DEFAULT_AUGMULT)
    config = SimulationConfig(data="d", out="o")
    assert (simulate["delta"], simulate["max_grad_norm"]) == (config.delta, config.max_grad_norm) == (
        privacy.DEFAULT_DELTA, privacy.DEFAULT_MAX_GRAD_NORM)
