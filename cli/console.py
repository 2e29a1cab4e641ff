"""Shared console output: rich for results and progress, one plain line on stderr for errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from typing import Any, NoReturn, TypeVar

from rich.console import Console

T = TypeVar("T")
STATE = {"debug": False}
console = Console(highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    first = " ".join(message.split("\n"))
    print(f"error: {first}", file=sys.stderr)
    sys.exit(code)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def track(it: Iterable[T], description: str, total: int) -> Iterable[T]:
    """A rich progress bar (transient, stderr) over `it`."""
    from rich.progress import track as rich_track

    return rich_track(it, description=description, total=total, transient=True, console=Console(stderr=True))
