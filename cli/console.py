"""Shared console output: rich for results and progress, one plain line on stderr for errors.

Text is text: values printed here come from files and registries other people wrote, so the console never
interprets rich markup or emoji codes in them (`[/bold]x` prints as it is), and control characters
(terminal escape sequences, carriage returns, bidirectional overrides) are shown escaped, never sent raw.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable
from typing import Any, NoReturn, TypeVar

from rich.console import Console
from rich.text import Text

T = TypeVar("T")
STATE: dict[str, Any] = {"debug": False, "rank": 0}  # rank: of a torchrun launch; only rank 0 reports
USAGE = 2  # exit code of every bad option or option conflict, as click gives for a malformed one
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(text: str) -> str:
    """`text` with every control character (but newline and tab) written as an escape, e.g. `\\x1b`."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


class SafeConsole(Console):
    """A rich console that renders every string literally (no markup, no emoji codes), control characters
    escaped; styles come from `style=` arguments only."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str(clean(text), **{**kwargs, "markup": False, "emoji": False})


console = SafeConsole(highlight=False, soft_wrap=True)  # a line is never broken (a path in it stays whole)


# Parameters whose flag is not `--` + the name with dashes.
FLAGS = {"out_dir": "--out", "num_workers": "--workers", "epsilons": "--target-epsilons"}


def flag(field: str) -> str:
    """The command-line flag for a library parameter name."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def error_message(error: Exception) -> str:
    """A library error in the CLI's words: the parameter a `ConfigError` starts with, and every parameter
    in backticks (`` `delta` ``), become flags (`--delta`)."""
    from taskvec.errors import ConfigError

    message = str(error)
    if isinstance(error, ConfigError) and error.field and message.startswith(error.field):
        message = flag(error.field) + message[len(error.field):]
    return in_flags(message)


def in_flags(message: str) -> str:
    """Every parameter in backticks (`` `delta` ``) as its flag (`--delta`)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag(m.group(1)), message)


def fail(message: str, code: int = 1) -> NoReturn:
    first = " ".join(message.split("\n"))
    rank = f"rank {STATE['rank']}: " if STATE["rank"] else ""  # the launcher may stop rank 0 before it prints
    print(f"error: {rank}{clean(first)}", file=sys.stderr)
    sys.exit(code)


def usage(message: str) -> NoReturn:
    """A bad option or option conflict: one line, the exit code click gives a malformed option."""
    fail(message, USAGE)


def warn(message: str) -> None:
    """One line on stderr (rank 0 only), library parameters in backticks written as flags."""
    if not STATE["rank"]:
        print(f"warning: {clean(' '.join(in_flags(message).split(chr(10))))}", file=sys.stderr)


def device_option() -> Any:
    """The `--device` option of every command that runs a model: one convention, checked before any work."""
    import typer

    from taskvec.training.config import DEFAULT_DEVICE, DEVICE_HELP, check_device

    def check(value: str) -> str:
        from taskvec.errors import ConfigError

        try:
            return check_device(value)
        except ConfigError as e:
            usage(error_message(e))

    return typer.Option(DEFAULT_DEVICE, help=DEVICE_HELP, callback=check)


def print_json(obj: Any) -> None:
    """`obj` as strict JSON: a NaN or infinity (a corrupt file's norm, say) is written as the string "nan",
    "inf" or "-inf", which every JSON parser reads."""
    print(json.dumps(_strict(obj), indent=2, sort_keys=True, default=str, allow_nan=False))


def _strict(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def track(it: Iterable[T], description: str, total: int) -> Iterable[T]:
    """A rich progress bar (transient, stderr) over `it`."""
    from rich.progress import track as rich_track

    return rich_track(it, description=description, total=total, transient=True,
                      console=SafeConsole(stderr=True))
