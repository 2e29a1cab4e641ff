"""The typer application: global options, error reporting and exit codes.

Commands live in small modules beside this one and import torch/timm only inside their bodies, so
`taskvec --help`, `inspect`, `list` and `push` start fast.
"""

from __future__ import annotations

import inspect
from typing import Any

import typer
import typer.core

from taskvec import __version__
from taskvec.cli import core, exchange, merge, plan, privacy, simulate, train
from taskvec.cli.console import STATE, USAGE, error_message, fail

TYPES = {"bool": "", "int": "INTEGER", "float": "FLOAT", "str": "TEXT", "path": "PATH", "Path": "PATH"}


def _plain_types(command: Any) -> None:
    """Help names value types as click does (TEXT, PATH, FLOAT; nothing for a flag), not as typer's annotations
    (`<bool>`, `<list[Path]>`, typer 0.29 on; older versions name them as click does), in `command` and every
    command under it."""
    ctx = typer.Context(command)
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is None or not hasattr(param, "display_type"):
            continue
        shown = param.display_type(ctx).strip("<>")
        label = TYPES.get(shown.removeprefix("list[").removesuffix("]"), shown.upper())
        if isinstance(param, typer.core.TyperArgument):  # its name stays what usage shows
            param.display_type_rich = lambda ctx, label=label: label  # type: ignore[method-assign,misc]
        else:
            param.metavar = label
    for sub in getattr(command, "commands", {}).values():
        _plain_types(sub)


def _one_line_paragraphs(group: Any) -> None:
    """Each command's help, and its summary in a group's command list, as paragraphs of one line each, so that
    rich wraps them to the terminal instead of keeping the docstring's line breaks."""
    for sub in getattr(group, "commands", {}).values():
        if sub.help:
            sub.help = "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(sub.help).split("\n\n"))
            if sub.short_help is None:
                sub.short_help = sub.help.split("\n\n")[0]
        _one_line_paragraphs(sub)


class _Group(typer.core.TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_types(self)
        _one_line_paragraphs(self)


app = typer.Typer(
    cls=_Group,
    name="taskvec",
    help=(
        "Train one medical imaging model across hospitals without sharing images: each site fine-tunes "
        "the same base and exports a data vector (fine-tuned − base weights, optionally with DP); a merger "
        "combines any set of vectors by task arithmetic.\n\n"
        "Typical flow: init → (each site) finetune → export → (merger) merge → evaluate."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"taskvec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    STATE["debug"] = debug


core.register(app)
merge.register(app)
exchange.register(app)
train.register(app)
privacy.register(app)
plan.register(app)
simulate.register(app)


class Terminated(BaseException):
    """SIGTERM (a scheduler stopping the job), raised in the main thread so that the work unwinds as on Ctrl-C
    (partial files and scratch folders removed); not a KeyboardInterrupt, which click ends silently with 130."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> None:
    """Console entry point: one clear line on stderr and a non-zero exit for any error."""
    import signal

    from taskvec.errors import ConfigError, TaskvecError

    before = signal.signal(signal.SIGTERM, _terminate)
    try:
        app()
    except TaskvecError as e:
        if STATE["debug"]:
            raise
        fail(error_message(e), code=USAGE if isinstance(e, ConfigError) else 1)
    except Terminated:
        fail("terminated", code=128 + signal.SIGTERM)
    except KeyboardInterrupt:
        fail("interrupted", code=130)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        if STATE["debug"]:
            raise
        fail(f"{type(e).__name__}: {e} (run `taskvec --debug ...` for the traceback)")
    finally:
        signal.signal(signal.SIGTERM, before)


if __name__ == "__main__":
    main()
