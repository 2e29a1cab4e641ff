"""Every command's help: each option and argument explained, value types named as click names them."""

from __future__ import annotations

import os
import re

import pytest
from cli_app import commands, invoke

TYPER_TYPE = re.compile(r"<(?:bool|int|float|str|path|Path|list\[[^\]]*\])>")
COMMANDS = [name for name, _ in commands()]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_and_argument_has_help(name: str) -> None:
    command = dict(commands())[name]
    assert command.params
    missing = [p.name for p in command.params if not (p.help or "").strip()]
    assert not missing, f"taskvec {name}: no help for {missing}"


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_help_shows_no_typer_annotations(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "COLUMNS", "200")
    code, out, err = invoke(*name.split(), "--help")
    assert code == 0, err
    assert not TYPER_TYPE.findall(out), out
    if name == "merge":  # the types are still named
        assert re.search(r"--scale +FLOAT", out) and re.search(r"--out +PATH", out), out


@pytest.mark.parametrize("name", COMMANDS)
def test_help_keeps_its_brackets(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich markup would swallow a bracketed word (`pip install 'taskvec[ray]'` shown as 'taskvec'): every one in
    an option's help is escaped so that it is shown."""
    monkeypatch.setitem(os.environ, "COLUMNS", "200")
    words = {w for p in dict(commands())[name].params for w in re.findall(r"\[\w[\w,=-]*\]", p.help or "")}
    code, out, err = invoke(*name.split(), "--help")
    assert code == 0, err
    assert not [w for w in words if w not in out], out


def test_command_list_summaries_are_one_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """`taskvec --help` lists each command by its help's first paragraph, wrapped to the terminal: no line of the
    list ends mid-phrase where the docstring broke its line."""
    monkeypatch.setitem(os.environ, "COLUMNS", "300")
    code, out, err = invoke("--help")
    assert code == 0, err
    listed = [line for line in out.splitlines() if line.startswith("│ ")]
    names = [line.split()[1] for line in listed if not line.startswith("│  ")]
    assert {"plan-dp", "split", "inspect", "registry"} <= set(names) and len(names) == len(listed), out


@pytest.mark.parametrize("name", ["plan-dp", "split", "finetune"])
def test_help_paragraphs_wrap_to_the_terminal(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command's help shows each paragraph of its docstring as one wrapped paragraph: on a terminal wide enough,
    one line each, not broken where the source broke its lines."""
    monkeypatch.setitem(os.environ, "COLUMNS", "2000")
    code, out, err = invoke(*name.split(), "--help")
    assert code == 0, err
    lines = {line.strip() for line in out.splitlines()}
    paragraphs = [" ".join(p.split()) for p in (dict(commands())[name].help or "").split("\n\n")]
    assert len(paragraphs) > 1 and all(p in lines for p in paragraphs), out
