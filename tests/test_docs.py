"""The documentation cannot rot: every shell block the README and docs/ mark as runnable runs as written, and the
defaults they state are the code's.

A runnable block is a fenced ```bash block on the line after `<!-- runnable -->`. The blocks of one page run in
order, each in its own `bash -euo pipefail`, in one empty folder beside a `shared` link to ../shared (pages that
use it are skipped without it), on the CPU, with HOME (and so the default keyring) inside the temporary folder.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MARKER = "<!-- runnable -->"
RUNNABLE = re.compile(re.escape(MARKER) + r"\n```bash\n(.*?)^```$", re.S | re.M)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def runnable_blocks(page: Path) -> list[str]:
    return RUNNABLE.findall(page.read_text())


def rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def test_every_marker_starts_a_bash_block() -> None:
    for page in PAGES:
        markers = re.findall(r"^" + re.escape(MARKER) + r"$", page.read_text(), re.M)
        assert len(markers) == len(runnable_blocks(page)), f"{rel(page)}: a {MARKER} line not before a bash block"


def test_readme_and_the_tutorial_have_runnable_flows() -> None:
    """The README's per-role flow and the consortium tutorial are the runnable ones, every role included."""
    for name in ("README.md", "docs/tutorials/consortium.md"):
        script = "\n".join(runnable_blocks(ROOT / name))
        for command in ("taskvec init", "taskvec finetune", "taskvec export", "taskvec push", "taskvec merge",
                        "taskvec evaluate"):
            assert command in script, f"{name}: no runnable `{command}`"
    readme = "\n".join(runnable_blocks(ROOT / "README.md"))
    first_init = readme[readme.index("taskvec init"):].split("\n\n")[0]
    assert "--pretrained" not in first_init and "--weights" in first_init  # the README's first init is offline


@pytest.mark.parametrize("page", [p for p in PAGES if runnable_blocks(p)], ids=rel)
def test_runnable_blocks_run_as_written(page: Path, tmp_path: Path) -> None:
    blocks = runnable_blocks(page)
    if any("../shared" in b for b in blocks):
        if not SHARED.is_dir():
            pytest.skip("needs ../shared")
        (tmp_path / "shared").symlink_to(SHARED)
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKVEC_", "HF_"))}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "HOME": str(home),
            "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")}
    for i, block in enumerate(blocks, 1):
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, (f"{rel(page)}, runnable block {i} exited {run.returncode}:\n{block}\n"
                                     f"--- stdout ---\n{run.stdout[-2000:]}\n--- stderr ---\n{run.stderr[-4000:]}")


# (page, text it contains, command, option, the default that text states)
STATED_DEFAULTS = [
    ("docs/concepts/merge-methods.md", "`taskvec merge` defaults to `mean`", "merge", "method", "mean"),
    ("docs/concepts/data-vectors.md", "(`--scale`, default 1)", "merge", "scale", 1.0),
    ("docs/how-to/versions-lineage.md", "(`--staleness a`, default 0.5", "merge", "staleness", 0.5),
    ("docs/how-to/data.md", "`--val-fraction` (default 0.1)", "finetune", "val_fraction", 0.1),
    ("docs/how-to/finetune.md", "`--weight-decay 0.05`", "finetune", "weight_decay", 0.05),
    ("docs/how-to/finetune.md", "`--sample-rate` q (default 0.25", "finetune", "sample_rate", 0.25),
    ("docs/how-to/finetune.md", "(`--augmult 2`:", "finetune", "augmult", 2),
]


@pytest.mark.parametrize(("page", "text", "command", "option", "value"), STATED_DEFAULTS,
                         ids=[f"{c}-{o}" for _, _, c, o, _ in STATED_DEFAULTS])
def test_stated_defaults_are_the_code_defaults(page: str, text: str, command: str, option: str, value: object) -> None:
    import typer

    from taskvec.cli.app import app

    assert text in (ROOT / page).read_text(), f"{page} no longer says {text!r}"
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}  # type: ignore[attr-defined]
    assert params[option].default == value, f"{command} --{option.replace('_', '-')}"


def test_stated_training_mode_default_is_the_code_default() -> None:
    """The README and the finetune guide say a pretrained base trains norm-bias by default, a random one all."""
    from taskvec.training.modes import default_mode

    assert default_mode(pretrained=True) == "norm-bias" and default_mode(pretrained=False) == "all"
    assert "for a pretrained base the default trains every norm\nweight and bias plus the head" in (
        ROOT / "README.md").read_text()
    assert "Default: `norm-bias` for a base that starts from pretrained weights" in (
        ROOT / "docs/how-to/finetune.md").read_text()


def test_ci_runs_the_readme_test_command_and_builds_the_docs_strictly() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("The whole test suite"):]
    command = re.search(r"```bash\n(.*?)\n```", section, re.S).group(1)  # type: ignore[union-attr]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci and command.endswith("pytest -q")
    assert any(line.split()[:3] == ["NO_MKDOCS_2_WARNING=1", "mkdocs", "build"] and "--strict" in line for line in ci)


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    pytest.importorskip("mkdocstrings")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "taskvec merge" in cli and "--max-epsilon" in cli  # the generated command reference


def test_every_merge_method_and_training_mode_is_documented() -> None:
    from taskvec.merging.methods import MERGE_METHODS
    from taskvec.training.modes import registered

    methods = (ROOT / "docs/concepts/data-vectors.md").read_text()
    assert [m for m in MERGE_METHODS if f"| `{m}` |" not in methods] == []
    modes = (ROOT / "docs/how-to/finetune.md").read_text()
    assert [m.name for m in registered() if f"`{m.name}" not in modes] == []


def test_every_generated_table_says_its_command_and_version() -> None:
    sys.path.insert(0, str(ROOT / "docs" / "results"))
    try:
        from capture import HEADER  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    files = sorted((ROOT / "docs" / "results" / "generated").glob("*.md"))
    assert files
    for f in files:
        head = f.read_text().splitlines()
        assert head[0] == HEADER and head[1].startswith("Generated by"), f.name
        assert re.search(r"with taskvec \d+\.\d+\.\d+", f.read_text()), f"{f.name}: no package version"
    included = set(re.findall(r'^--8<-- "([\w-]+\.md)"$', "\n".join(
        p.read_text() for p in (ROOT / "docs" / "results").glob("*.md")), re.M))
    assert included == {f.name for f in files}  # every generated table is shown, and only those


def test_the_api_reference_documents_every_public_name() -> None:
    import taskvec

    page = (ROOT / "docs" / "reference" / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)$", page, re.M))
    missing = []
    for name, (module, attr) in taskvec._API.items():  # registry/ is read from its folder (taskvec.registry)
        defined = getattr(importlib.import_module(module), attr)
        where = getattr(defined, "__module__", module) if callable(defined) else module
        paths = {f"{m}.{attr}" for m in (module, where)}
        paths |= {p.replace("taskvec.registry.", "registry.", 1) for p in paths}
        if not (paths & documented and f"`{name}`" in page):
            missing.append(name)
    assert missing == []
