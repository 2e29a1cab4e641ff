"""Store backends as a registry: each module under `registry/stores/` registers its address scheme, the lookup
picks one by address and hands it the options it declares, and no other module names a scheme."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import taskvec.registry.store as store_mod
from taskvec.errors import ConfigError
from taskvec.registry import RegistryError, open_registry
from taskvec.registry.address import backends, describe_addresses
from taskvec.registry.store import Store, register_store
from taskvec.registry.stores.folder import FolderStore

ROOT = Path(__file__).resolve().parents[2]


def test_each_scheme_registers_itself() -> None:
    found = backends()
    assert {"file", "hf"} <= set(found)
    assert [s for s, b in found.items() if b.paths] == ["file"]
    assert found["hf"].options == {"revision", "endpoint", "token", "private", "cache_dir"}
    assert found["file"].options == frozenset()
    assert describe_addresses() == "a folder (./registry, file:///mnt/share/x) or a Hub model repo (hf://ORG/REPO)"


def test_a_new_backend_is_one_decorated_opener(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(store_mod, "STORES", dict(backends()))
    monkeypatch.setattr("taskvec.registry.address.STORES", store_mod.STORES)
    opened: list[tuple[str, str | None]] = []

    @register_store("mem", describe="a test store (mem://NAME)")
    def open_mem(address: str, *, token: str | None = None) -> Store:
        opened.append((address, token))
        return FolderStore(tmp_path, address)

    assert open_registry("mem://x", token="t").address == "mem://x" and opened == [("mem://x", "t")]
    assert "or a test store (mem://NAME)" in describe_addresses()
    with pytest.raises(ConfigError, match=r"revision applies to hf:// registries only") as e:
        open_registry("mem://x", revision="dev")
    assert e.value.field == "revision"
    with pytest.raises(ConfigError, match=r"token applies to hf:// or mem:// registries only"):
        open_registry(str(tmp_path), token="t")
    with pytest.raises(ValueError, match="registered twice"):
        register_store("mem", describe="again")(open_mem)


def test_addresses_reach_their_backend(tmp_path: Path) -> None:
    assert isinstance(open_registry(str(tmp_path)).store, FolderStore)
    assert open_registry(f"file://{tmp_path}").store.root == tmp_path  # type: ignore[attr-defined]
    hub = open_registry("hf://org/repo", revision="dev", endpoint="http://127.0.0.1:9", token="x",
                        cache_dir=tmp_path)
    assert (hub.address, hub.store.repo_id, hub.store.revision) == (  # type: ignore[attr-defined]
        "hf://org/repo (revision dev)", "org/repo", "dev")
    with pytest.raises(RegistryError, match="a Hub repo is hf://ORG/REPO"):
        open_registry("hf://just-a-name")
    for bad in ("hf://../..", "hf://org/a repo"):  # names the Hub refuses: one line, not the Hub library's error
        with pytest.raises(RegistryError, match=f"^{re.escape(bad)}: not a Hub repo name"):
            open_registry(bad)
    with pytest.raises(RegistryError, match=re.escape(f"unknown registry scheme; use {describe_addresses()}")):
        open_registry("s3://bucket/reg")


def test_no_module_outside_its_backend_names_a_scheme() -> None:
    """Only the module that registers a `scheme://` names it (the lookup names none)."""
    owners = {s: Path(sys.modules[b.open.__module__].__file__ or "").resolve() for s, b in backends().items()}
    wrong = [f"{path.relative_to(ROOT)} names {scheme}://"
             for path in [*(ROOT / "registry").rglob("*.py"), *(ROOT / "taskvec").rglob("*.py")]
             for scheme, owner in owners.items() if f"{scheme}://" in path.read_text() and path.resolve() != owner]
    assert not wrong, "\n".join(wrong)
