"""End to end through the real console script: init → export ×3 → merge → inspect, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taskvec.io.files import read_kind


def taskvec(*args: str | Path, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(
        [sys.executable, "-m", "taskvec.cli.app", *map(str, args)], cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_init_export_merge_inspect(make_finetuned, tmp_path: Path) -> None:
    taskvec("init", "--arch", "test_vit", "--num-classes", "2", "--labels", "benign,malignant", "--img-size", "32",
            "--out", "base.safetensors", cwd=tmp_path)
    base = tmp_path / "base.safetensors"
    meta = read_kind(base, "model").meta
    assert meta["model"]["labels"] == ["benign", "malignant"] and meta["model"]["model_kwargs"] == {"img_size": 32}
    for i in range(3):
        dp = ["--clip", "1", "--noise-multiplier", "1", "--delta", "1e-5"] if i == 2 else []
        out = taskvec("export", make_finetuned(base, i), "--base", base, "--out", f"v{i}.safetensors",
                      "--samples", str(10 + i), "--contributor", f"site{i}", *dp, cwd=tmp_path)
        assert "privacy: " in out.stdout
    taskvec("merge", "v0.safetensors", "v1.safetensors", "v2.safetensors", "--base", base, "--method", "weighted",
            "--out", "merged.safetensors", cwd=tmp_path)
    info = json.loads(taskvec("inspect", "merged.safetensors", "--json", cwd=tmp_path).stdout)
    assert info["kind"] == "model" and info["integrity"] is True
    vecs = info["metadata"]["merge"]["vectors"]
    assert [v["contributor"] for v in vecs] == ["site0", "site1", "site2"]
    assert [len(v["privacy"]) for v in vecs] == [0, 0, 2] and vecs[2]["privacy"][0]["unit"] == "site"
    want = sum(p.numel() for p in load_file(str(tmp_path / "merged.safetensors")).values() if p.is_floating_point())
    assert info["parameters"] == want
    vinfo = json.loads(taskvec("inspect", "v2.safetensors", "--json", cwd=tmp_path).stdout)
    v2 = load_file(str(tmp_path / "v2.safetensors"))
    assert vinfo["l2_norm"] == pytest.approx(float(torch.cat([t.flatten() for t in v2.values()]).norm()), rel=1e-5)
    assert vinfo["privacy"][0]["mechanism"] == "gaussian-output"
    text = taskvec("inspect", "merged.safetensors", cwd=tmp_path).stdout
    assert "weighted of 3 vectors" in text and "site2" in text


def _assert_one_line_error(p: subprocess.CompletedProcess[str], match: str) -> None:
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], p.stderr


def test_bad_input_gives_one_line_and_no_output(make_base, make_finetuned, tmp_path: Path) -> None:
    base = make_base()
    ft = make_finetuned(base, 1)
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")
    _assert_one_line_error(taskvec("export", "model.pt", "--base", base, "--out", "v.safetensors", cwd=tmp_path,
                                   ok=False), "pickle")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(ft.read_bytes()[:-100])
    _assert_one_line_error(taskvec("export", trunc, "--base", base, "--out", "v.safetensors", cwd=tmp_path, ok=False),
                           "truncated")
    _assert_one_line_error(taskvec("merge", ft, "--base", base, "--out", "m.safetensors", cwd=tmp_path, ok=False),
                           "expected a taskvec vector")
    _assert_one_line_error(taskvec("init", "--arch", "no_such_net", "--num-classes", "2", "--out", "b.safetensors",
                                   cwd=tmp_path, ok=False), "--arch 'no_such_net' is not a timm architecture")
    taskvec("export", ft, "--base", base, "--out", "v.safetensors", cwd=tmp_path)
    _assert_one_line_error(taskvec("export", ft, "--base", base, "--out", "v.safetensors", cwd=tmp_path, ok=False),
                           "--force")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".v", "m.", ".m", "b."))) == []
    debug = taskvec("--debug", "export", "model.pt", "--base", base, "--out", "w.safetensors", cwd=tmp_path, ok=False)
    assert "Traceback" in debug.stderr


def test_init_from_local_timm_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    ref = timm.create_model("test_convnext", num_classes=1000)
    save_file(ref.state_dict(), str(tmp_path / "pretrained.safetensors"))
    taskvec("init", "--arch", "test_convnext", "--num-classes", "4", "--weights", "pretrained.safetensors",
            "--out", "base.safetensors", cwd=tmp_path)
    got = load_file(str(tmp_path / "base.safetensors"))
    backbone = [k for k in ref.state_dict() if not k.startswith("head.fc")]
    assert all(torch.equal(got[k], ref.state_dict()[k]) for k in backbone)
    assert got["head.fc.weight"].shape[0] == 4
    assert not got["head.fc.weight"].any() and not got["head.fc.bias"].any()  # a pretrained base's new head: zero


def test_segmentation_base_round_trips(tmp_path: Path) -> None:
    from taskvec.models.spec import load_model

    taskvec("init", "--arch", "test_convnext", "--task", "segmentation", "--num-classes", "2", "--in-chans", "1",
            "--out", "seg.safetensors", cwd=tmp_path)
    model = load_model(tmp_path / "seg.safetensors").eval()
    assert model(torch.randn(1, 1, 64, 48)).shape == (1, 2, 64, 48)


def test_commands_without_models_do_not_import_torch(make_base, tmp_path: Path) -> None:
    base = make_base()
    code = (
        "import sys; from typer.testing import CliRunner; from taskvec.cli.app import app; r = CliRunner(); "
        f"assert r.invoke(app, ['--help']).exit_code == 0; "
        f"assert r.invoke(app, ['inspect', {str(base)!r}]).exit_code == 0; "
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_python_m_taskvec_is_the_console_script(tmp_path: Path) -> None:
    """`python -m taskvec` runs the CLI's entry point: the same help, importing no torch or timm (`-X
    importtime` lists every module imported), and one error line with exit 1 on bad input."""

    def run(module: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "120"})

    main, app = run("taskvec", "--help"), run("taskvec.cli.app", "--help")
    assert main.returncode == 0 and main.stdout.split() == app.stdout.replace("taskvec.cli.app", "taskvec").split()
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in main.stderr.splitlines()
                if line.startswith("import time:")}
    assert "typer" in imported and not imported & {"torch", "timm"}
    bad = run("taskvec", "inspect", "missing.safetensors")
    errors = [line for line in bad.stderr.splitlines() if not line.startswith("import time:")]
    assert bad.returncode == 1 and len(errors) == 1 and errors[0].startswith("error: ") and "missing" in errors[0]


@pytest.mark.parametrize(("args", "field"), [(["--img-size", "12000"], "img-size"), (["--img-size", "0"], "img-size"),
                                             (["--img-size", "-3"], "img-size"), (["--in-chans", "0"], "in-chans")])
def test_init_refuses_a_base_no_other_command_would_take(tmp_path: Path, args: list[str], field: str) -> None:
    p = taskvec("init", "--arch", "test_convnext", "--num-classes", "2", "--out", "base.safetensors", *args,
                cwd=tmp_path, ok=False)
    assert p.returncode != 0 and p.stderr.startswith(f"error: --{field} must be a whole number in 1.."), p.stderr
    assert not (tmp_path / "base.safetensors").exists()
