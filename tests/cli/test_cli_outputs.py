"""One rule for every output path: missing folders are created (as `finetune` and `pull` do); a path under a
file is refused in one line, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_app import invoke


@pytest.fixture
def files(make_base, make_finetuned, tmp_path: Path) -> dict[str, Path]:
    base = make_base()
    ft = make_finetuned(base, 1)
    code, _, err = invoke("export", ft, "--base", base, "--out", tmp_path / "v.safetensors")
    assert code == 0, err
    return {"base": base, "ft": ft, "vec": tmp_path / "v.safetensors"}


def _commands(f: dict[str, Path], out: Path) -> dict[str, list[object]]:
    return {
        "keys generate": ["keys", "generate", "--out", out],
        "export": ["export", f["ft"], "--base", f["base"], "--out", out],
        "merge": ["merge", f["vec"], "--base", f["base"], "--out", out],
        "init": ["init", "--arch", "test_vit", "--num-classes", "2", "--img-size", "32", "--out", out],
        "registry init": ["registry", "init", out, "--base", f["base"]],
        "merge --incremental": ["merge", f["vec"], "--base", f["base"], "--incremental", "--state", out],
    }


@pytest.mark.parametrize("name", ["keys generate", "export", "merge", "init", "registry init",
                                  "merge --incremental"])
def test_missing_folders_are_created(name: str, files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "new" / "deeper" / "out.x"
    code, _, err = invoke(*_commands(files, out)[name])
    assert code == 0, err
    assert out.exists()
    if name == "keys generate":
        assert Path(f"{out}.pub").is_file() and out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("name", ["keys generate", "export", "merge", "init"])
def test_a_path_under_a_file_is_refused_before_work(name: str, files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub" / "out.x"
    code, _, err = invoke(*_commands(files, out)[name])
    assert code != 0 and f"{tmp_path / 'afile'}: is not a directory" in err, err
    assert (tmp_path / "afile").read_text() == "x"
