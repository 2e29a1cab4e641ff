"""Errors whose message tells the user what went wrong and what to do.

The library speaks in parameters (`clip must be > 0`), never in command-line flags: a Python caller who
passed `clip=-1` reads the name they used. A `ConfigError`'s message starts with its `field`; any other
parameter a message names is written in backticks (`` `delta` ``). Errors carry fields (`path`, `field`,
`expected`, `got`) so a caller can act on them; the CLI prints `error: <message>` on one line, turns the
leading field and every backticked parameter into its flag (`--clip`, `--delta`), and exits 2 for a
`ConfigError`, 1 for any other error.
"""

from __future__ import annotations

import os
from typing import Any


class TaskvecError(Exception):
    """Base class for every error taskvec raises on bad input.

    `path`: the file or folder at fault; `field`: the parameter or header field at fault; `expected` and
    `got`: what was wanted and what was found. The message is the whole explanation; the fields repeat
    its parts for programs."""

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, field: str | None = None,
                 expected: Any = None, got: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = None if path is None else os.fspath(path)
        self.field = field
        self.expected = expected
        self.got = got


class ConfigError(TaskvecError, ValueError):
    """A parameter value is out of range or conflicts with another: `field` names the parameter, and the
    message starts with it (`clip must be > 0, got -1.0`)."""


class FileFormatError(TaskvecError):
    """A file is not a readable taskvec/safetensors file (corrupt, truncated, pickle, wrong kind)."""


class MismatchError(TaskvecError):
    """Files that must agree (base identity, keys, shapes, labels, task) do not."""


class OutputExistsError(TaskvecError):
    """The output path exists and `force` was not given."""


class PrivacyError(TaskvecError):
    """A privacy requirement is not met (budget exceeded, no guarantee where one is required)."""


class PrivacyConfigError(PrivacyError, ConfigError):
    """A privacy parameter is invalid (clip, noise multiplier, ε, δ)."""


def check_range(field: str, value: float, *, low: float | None = None, high: float | None = None,
                low_open: bool = True, high_open: bool = True, error: type[ConfigError] = ConfigError) -> float:
    """`value` if it is a finite number in the interval, else a `ConfigError` naming `field`.

    Open ends by default: `check_range("clip", c, low=0)` requires 0 < c < ∞. NaN and ±inf always fail."""
    import math

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "∞)" if high is None else f"{high:g}{')' if high_open else ']'}"
        interval = f"{lo or '(-∞'}, {hi}"
        raise error(f"{field} must be a finite number in {interval}, got {value!r}", field=field,
                    expected=interval, got=value)
    return float(value)


def check_seed(seed: object, field: str = "seed") -> int:
    """`seed` if it is a whole number >= 0 (what numpy's and torch's generators take), else a `ConfigError`."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{field} must be a non-negative integer, got {seed!r}", field=field, got=seed)
    return seed


def first_line(err: BaseException) -> str:
    """An exception's message, first line only (or its type's name when it has none), to quote in one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
