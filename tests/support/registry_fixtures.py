"""Fixtures shared by the registry tests: a Hub-compatible server, registries of both kinds, site vectors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hub_server import HubServer

from taskvec.merging.export import export_vector
from taskvec.registry import Registry, open_registry

TOKEN = "hf_taskvecTestTokenDoNotPrint123"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[HubServer]:
    """The Hub fixture on 127.0.0.1 at a random port; the client reaches it through HF_ENDPOINT and HF_TOKEN."""
    from huggingface_hub import constants

    server = HubServer(tokens={TOKEN}).start()
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the fixture speaks LFS, not Xet
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "taskvec-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield server
    server.stop()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub and the Hub store wait between retries; tests need not."""
    import huggingface_hub.utils._http as http

    import taskvec.registry.stores.hub as hub_mod

    monkeypatch.setattr(http.time, "sleep", lambda s: None)
    monkeypatch.setattr(hub_mod.time, "sleep", lambda s: None)


@pytest.fixture(params=["folder", "hub"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A registry address of each kind (not created yet)."""
    if request.param == "hub":
        request.getfixturevalue("hub")
        return "hf://consortium/chest-xray"
    return str(tmp_path / "registry")


@pytest.fixture
def sites(tmp_path: Path, make_base: Callable[..., Path], make_finetuned: Callable[..., Path]):
    """A base and a function making site vectors: vector(i, contributor=..., samples=...)."""
    base = make_base()

    def vector(i: int, contributor: str | None = None, samples: int = 100, b: Path = base) -> Path:
        name = contributor or f"site{i}"
        out = tmp_path / f"vec-{b.stem}-{i}-{name}-{samples}.safetensors"
        if not out.exists():
            ft = make_finetuned(b, seed=i, name=f"ft-{b.stem}-{i}.safetensors")
            export_vector(ft, b, out, contributor=name, samples=samples * (i + 1))
        return out

    return base, vector


def created(address: str, base: Path) -> Registry:
    reg = open_registry(address)
    reg.create(base)
    return reg
