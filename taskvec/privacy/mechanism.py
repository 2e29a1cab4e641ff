"""What a privacy mechanism is to the ledger, and the registry of them.

A mechanism is one module in `taskvec.privacy.mechanisms` holding a `Mechanism` subclass decorated with
`@register`: its name (the `mechanism` field of its ledger entries), the units its entries may name, its
sensitivity per relation (the relations its entries may name), its accountant (ε recomputed from an entry),
how its releases compose across vectors (`Composition`), its checks of an entry and a builder of its entries.
The modules are found on the first lookup, so adding a mechanism is adding one file; everything else finds a
mechanism by the `mechanism` field of an entry (`mechanism_of`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from taskvec.io.schema import RELATIONS as RELATIONS  # the units and relations a ledger entry may name
from taskvec.io.schema import UNITS

Entry = dict[str, Any]  # one ledger entry, as it is stored in a header's `privacy` list (`LedgerEntry` its schema)


@dataclass(frozen=True)
class Contribution:
    """One vector a budget composes: its sha256 (None when unknown: a release of its own), run id, ledger."""

    sha256: str | None
    run: str | None
    ledger: list[Entry]


class Composition:
    """How the releases of one kind compose across a contributor's vectors: which entries are distinct releases
    (`distinct`, given each vector's covering entry of this kind) and their composed (ε, δ, how) (`compose`,
    given at least two). Mechanisms that share one share the accounting: one bound composes them all."""

    description: ClassVar[str]  # how it composes, for a merge's record: "<how> when all are <what>"

    def distinct(self, found: Sequence[tuple[Contribution, Entry]]) -> list[Entry]:
        raise NotImplementedError

    def compose(self, entries: Sequence[Entry]) -> tuple[float, float, str]:
        raise NotImplementedError


class Mechanism:
    """A privacy mechanism as the ledger sees it. Subclasses set the class attributes and override
    `epsilon` and, for checks beyond the common ones, `problem`."""

    name: ClassVar[str]
    units: ClassVar[tuple[str, ...]] = UNITS
    sensitivities: ClassVar[dict[str, float]]  # per relation it bounds: the L2 sensitivity to one unit, × its clip
    scope_reason: ClassVar[str] = "no run records (the ledger was edited)"  # why another unit or relation is refused
    releases_model: ClassVar[bool] = False  # a training: its entries name the model they released (`model`)
    composition: ClassVar[Composition]

    def epsilon(self, entry: Entry) -> float:
        """ε of a valid entry from its parameters alone, by the accountant it names."""
        raise NotImplementedError

    def scope_problem(self, entry: Entry) -> tuple[str, str] | None:
        """(field, what is wrong) when the entry names a unit or relation the mechanism does not bound."""
        if entry["relation"] in self.sensitivities and entry["unit"] in self.units:
            return None
        fld = "relation" if entry["relation"] not in self.sensitivities else "unit"
        bounded = " or ".join(self.sensitivities)
        return fld, (f"a {self.name} entry must be {bounded} per {' or '.join(self.units)}, got {entry['relation']} "
                     f"per {entry['unit']}, which {self.scope_reason}")

    def problem(self, entry: Entry) -> tuple[str, str] | None:
        """(field, what is wrong) of an entry whose common fields are valid, or None."""
        return None


M = TypeVar("M", bound=type[Mechanism])
_REGISTRY: dict[str, Mechanism] = {}


def register(cls: M) -> M:
    """Class decorator: make the mechanism known by its `name`."""
    if cls.name in _REGISTRY:
        raise TypeError(f"privacy mechanism {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


@functools.cache
def _discover() -> None:
    from taskvec.privacy import mechanisms as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def mechanisms() -> dict[str, Mechanism]:
    """Every mechanism by name, in the order of their modules (`taskvec.privacy.mechanisms`, imported on the first
    call)."""
    _discover()
    return dict(sorted(_REGISTRY.items(), key=lambda kv: (type(kv[1]).__module__, kv[0])))


def mechanism_of(entry: Entry) -> Mechanism:
    """The mechanism a validated entry names (`taskvec.privacy.entries.validate_ledger` refuses unknown ones)."""
    return mechanisms()[entry["mechanism"]]


def compositions() -> list[Composition]:
    """The distinct compositions of the mechanisms, in the order of their modules."""
    found: list[Composition] = []
    for m in mechanisms().values():
        if all(c is not m.composition for c in found):
            found.append(m.composition)
    return found
