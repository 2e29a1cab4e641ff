"""The command line as click sees it: every command of the typer app, and a runner that returns stdout/stderr."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from taskvec.cli.app import app


def commands() -> Iterator[tuple[str, Any]]:
    """(`name sub`, click command) of every command, subcommands of groups included (typer's own click)."""

    def walk(prefix: str, cmd: Any) -> Iterator[tuple[str, Any]]:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(f"{prefix} {name}".strip(), sub)
        else:
            yield prefix, cmd

    yield from walk("", typer.main.get_command(app))


def command(name: str) -> Any:
    return dict(commands())[name]


def defaults(name: str) -> dict[str, Any]:
    """Each parameter's default value of command `name`."""
    return {p.name: p.default for p in command(name).params if p.name}


def invoke(*args: object) -> tuple[int, str, str]:
    """Run the app in this process: (exit code, stdout, stderr); an error the console script would print is
    appended to stderr as `error: ...` (`taskvec.cli.app.main` turns it into one line and the exit code)."""
    from taskvec.cli.console import error_message

    r = CliRunner().invoke(app, [str(a) for a in args])
    err = r.stderr
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        err += f"error: {error_message(r.exception)}"
    return r.exit_code, r.stdout, err
