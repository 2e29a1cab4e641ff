"""The progress-callback type every long-running library function takes (the CLI passes a rich bar)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
Track = Callable[[Iterable[T], str, int], Iterable[T]]
"""`track(iterable, description, total)` yields the items of `iterable`, reporting progress as they pass."""


def no_track(it: Iterable[T], description: str, total: int) -> Iterable[T]:
    """The silent default: the items, unchanged."""
    return it


