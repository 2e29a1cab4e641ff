"""Open a registry from its address, through the store backends registered under `registry/stores/` (the
registry lookup: the only module that picks a backend, and it names none)."""

from __future__ import annotations

import importlib
import os
import pkgutil
import re

from taskvec.errors import ConfigError
from taskvec.registry.registry import Registry
from taskvec.registry.schema import RegistryError
from taskvec.registry.store import STORES, Backend

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def backends() -> dict[str, Backend]:
    """Every registered store scheme (each module under `registry/stores/` imported once)."""
    import taskvec.registry.stores as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
    return STORES


def describe_addresses() -> str:
    """How registry addresses look, one phrase per backend: `a folder (...) or a Hub model repo (...)`."""
    forms = [b.describe for b in backends().values()]
    return " or ".join([", ".join(forms[:-1]), forms[-1]] if len(forms) > 1 else forms)


def backend_for(address: str) -> Backend:
    """The backend serving `address`: its `scheme://`, or the folder backend for a path."""
    found = backends()
    m = _SCHEME.match(address)
    backend = next((b for b in found.values() if b.paths), None) if m is None else found.get(m.group(1))
    if backend is None:
        raise RegistryError(f"{address}: unknown registry scheme; use {describe_addresses()}")
    return backend


def open_registry(
    address: str, *, revision: str | None = None, endpoint: str | None = None, token: str | None = None,
    private: bool = True, cache_dir: str | os.PathLike[str] | None = None,
) -> Registry:
    """A registry from its address (`describe_addresses`: a folder path, or `SCHEME://...` of a backend).

    `revision` (a branch), `endpoint`, `token` and `cache_dir` (downloads) go to the backends that take them (the
    Hub's) and are refused by the others; `private` applies to a repository a backend creates."""
    backend = backend_for(address)
    given = {"revision": revision, "endpoint": endpoint, "token": token, "cache_dir": cache_dir}
    for name, value in given.items():
        if value is not None and name not in backend.options:
            takers = " or ".join(f"{b.scheme}://" for b in STORES.values() if name in b.options)
            raise ConfigError(f"{name} applies to {takers} registries only", field=name, got=value)
    options = {k: v for k, v in {**given, "private": private}.items() if k in backend.options}
    return Registry(backend.open(address, **options))
