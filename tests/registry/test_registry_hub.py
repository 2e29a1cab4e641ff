"""The Hub backend end to end against the fixture server: two sites, signatures, incremental merge, publish,
timm's `hf-hub:` loader, commit conflicts, network faults, tokens. Plus the optional live-Hub test."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import Blob
from registry_fixtures import TOKEN, created, hub, no_backoff, sites  # noqa: F401 (fixtures)
from safetensors.torch import load_file
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.io.files import read_kind
from taskvec.merging.stream import merge_vectors
from taskvec.registry import Registry, RegistryError, TrustPolicy, open_registry
from taskvec.registry.store import MAX_TENSOR_FILE_BYTES, MAX_TEXT_BYTES
from taskvec.registry.stores.hub import HubStore

torch = pytest.importorskip("torch")
REPO = "hf://consortium/chest-xray"


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, f"{args}: {res.output} {res.exception!r}"
    return res.output


def _head(hub, repo_id: str) -> str:
    return hub.state.repos[repo_id].branches["main"]


def test_two_sites_merge_publish_and_load_with_timm(hub, sites, tmp_path: Path) -> None:
    base, vector = sites
    outputs = [_cli("keys", "generate", "--out", str(tmp_path / f"{s}.key")) for s in ("a", "b")]
    outputs.append(_cli("registry", "init", REPO, "--base", str(base), "--license", "apache-2.0",
                        "--trust", f"site-a={tmp_path / 'a.key.pub'}", "--trust", f"site-b={tmp_path / 'b.key.pub'}"))
    va, vb, va2 = vector(0, "site-a"), vector(1, "site-b"), vector(2, "site-a")
    outputs.append(_cli("push", str(va), "--registry", REPO, "--key", str(tmp_path / "a.key")))
    outputs.append(_cli("push", str(vb), "--registry", REPO, "--key", str(tmp_path / "b.key")))
    listed = json.loads(_cli("list", "--registry", REPO, "--json"))
    assert [(v["contributor"], v["samples"]) for v in listed["vectors"]] == [("site-a", 100), ("site-b", 200)]
    assert all(v["signature"]["algorithm"] == "ed25519" for v in listed["vectors"])
    assert listed["base"]["identity"] == read_kind(base, "model").meta["identity"]

    state = tmp_path / "state"
    keyring = tmp_path / "merger.keyring"  # the merger's own trust, not the registry's list
    for site in ("a", "b"):
        pub = tmp_path / f"{site}.key.pub"
        outputs.append(_cli("keys", "trust", "--contributor", f"site-{site}", "--key", str(pub),
                            "--keyring", str(keyring)))
    outputs.append(_cli("merge", "--registry", REPO, "--base", str(base), "--method", "mean",
                        "--incremental", "--state", str(state), "--keyring", str(keyring)))
    outputs.append(_cli("push", str(va2), "--registry", REPO, "--key", str(tmp_path / "a.key")))  # weeks later
    outputs.append(_cli("merge", "--registry", REPO, "--base", str(base), "--method", "mean",
                        "--incremental", "--state", str(state), "--keyring", str(keyring)))
    v2 = state / "merged-v2.safetensors"
    history = json.loads((state / "history.json").read_text())["versions"]
    assert [h["mode"] for h in history] == ["recomputed", "incremental"] and len(history[1]["added"]) == 1
    full = tmp_path / "full.safetensors"
    merge_vectors([va, vb, va2], base, full, method="mean")
    ref, got = load_file(str(full)), load_file(str(v2))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)

    outputs.append(_cli("publish", str(v2), "--repo", "hf://consortium/chest-xray-model"))
    model_repo = hub.state.repos["consortium/chest-xray-model"]
    assert model_repo.tags == {"v2": model_repo.branches["main"]} and model_repo.private

    loaded = tmp_path / "loaded.safetensors"
    code = ("import sys, timm; from safetensors.torch import save_file; "
            "m = timm.create_model('hf-hub:consortium/chest-xray-model', pretrained=True); "
            "save_file(m.state_dict(), sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, str(loaded)], env=dict(os.environ),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timm_state = load_file(str(loaded))
    assert timm_state.keys() == got.keys() and all(torch.equal(timm_state[k], got[k]) for k in got)

    card = model_repo.commits[model_repo.branches["main"]].files["README.md"].content.decode()
    assert "site-a" in card and read_kind(v2, "model").meta["identity"] in card
    reg_card = hub.state.repos["consortium/chest-xray"]
    text = reg_card.commits[reg_card.branches["main"]].files["README.md"].content.decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert {"taskvec", "data-vector"} <= set(meta["tags"]) and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "image-classification"
    sent = {auth for _, _, auth in hub.state.log if auth}
    assert sent == {f"Bearer {TOKEN}"}  # the token was used...
    assert all(TOKEN not in out for out in outputs) and TOKEN not in proc.stderr + proc.stdout  # ...never shown


def test_conflicting_commit_is_retried_on_the_new_head(hub, sites, no_backoff) -> None:
    base, vector = sites
    reg, other = created(REPO, base), open_registry(REPO)
    real = reg.store.api.create_commit
    calls = []

    def racing_commit(*args, **kwargs):
        calls.append(kwargs["parent_commit"])
        if len(calls) == 1:
            other.push(vector(1))  # another site commits between our read and our commit
        return real(*args, **kwargs)

    reg.store.api.create_commit = racing_commit
    assert reg.push(vector(0)).added
    assert len(calls) == 2 and calls[0] != calls[1]  # refused once (412), then recomputed on the new head
    assert {e.contributor for e in reg.entries()} == {"site0", "site1"}


def test_dropped_upload_is_retried(hub, sites, no_backoff) -> None:
    base, vector = sites
    reg = created(REPO, base)
    hub.state.fail("PUT", "/lfs-objects/", status=None, times=2)
    hub.state.fail("POST", "/commit/", status=None, times=1)  # the commit's answer is lost too
    assert reg.push(vector(0)).added
    assert [e.contributor for e in reg.entries()] == ["site0"]


def test_failed_upload_publishes_nothing(hub, sites, no_backoff) -> None:
    base, vector = sites
    reg = created(REPO, base)
    before = _head(hub, "consortium/chest-xray")
    hub.state.fail("PUT", "/lfs-objects/", status=503, times=100)
    with pytest.raises(RegistryError, match="upload failed.*nothing was published"):
        reg.push(vector(0))
    assert _head(hub, "consortium/chest-xray") == before and reg.entries() == []


def test_missing_repo_and_bad_token(hub, sites, monkeypatch: pytest.MonkeyPatch) -> None:
    base, vector = sites
    created(REPO, base)
    with pytest.raises(RegistryError, match="repository not found"):
        open_registry("hf://consortium/nope").entries()
    bad = "hf_wrongTokenThatMustNotLeak"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(RegistryError) as e:
        open_registry(REPO).push(vector(0))
    assert "token" in str(e.value) and bad not in str(e.value)


def test_unreachable_endpoint(hub, sites) -> None:
    base, vector = sites
    hub.stop()
    with pytest.raises(RegistryError, match=f"cannot reach {hub.endpoint}.*HF_ENDPOINT"):
        open_registry(REPO).push(vector(0))


def test_cli_error_is_one_line_without_token(hub, sites) -> None:
    base, vector = sites
    created(REPO, base)
    env = {**os.environ, "HF_TOKEN": "hf_secretWrongToken"}
    proc = subprocess.run([sys.executable, "-m", "taskvec.cli.app", "push", str(vector(0)), "--registry", REPO],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: hf://consortium/chest-xray: ") and proc.stderr.count("\n") == 1
    assert "hf_secretWrongToken" not in proc.stderr + proc.stdout


def _replace_file(hub, repo_id: str, path: str, blob: Blob) -> None:
    """A hostile writer commits `blob` as `path`."""
    repo = hub.state.repos[repo_id]
    head = repo.commits[repo.branches["main"]]
    repo.branches["main"] = hub.state.new_commit(repo, head.sha, "hostile", {**head.files, path: blob}).sha


def _fresh(cache: Path) -> Registry:
    return Registry(HubStore("consortium/chest-xray", cache_dir=cache))


def _downloads(hub, path: str) -> int:
    return sum(method == "GET" and p.endswith(f"/resolve/{path}") for method, p, _ in hub.state.log)


def test_oversized_files_are_refused_before_download(hub, sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(REPO, base)
    entry = reg.push(vector(0)).entry
    assert _fresh(tmp_path / "ok").info().base == reg.info().base  # a normal registry.json is read
    assert (tmp_path / "ok" / "downloads" / "consortium" / "chest-xray" / "registry.json").is_file()

    _replace_file(hub, "consortium/chest-xray", entry.path, Blob(MAX_TENSOR_FILE_BYTES + 1, content=b"x"))
    before = _downloads(hub, entry.path)
    with pytest.raises(RegistryError) as e:
        _fresh(tmp_path / "c1").fetch(entry, tmp_path / "v.safetensors", TrustPolicy(allow_unsigned=True))
    assert str(e.value) == (f"{REPO}/{entry.path}: {MAX_TENSOR_FILE_BYTES + 1} B on the Hub, over the "
                            f"{MAX_TENSOR_FILE_BYTES} B limit for this file; refused before download")
    assert _downloads(hub, entry.path) == before and not (tmp_path / "v.safetensors").exists()

    _replace_file(hub, "consortium/chest-xray", "registry.json", Blob(MAX_TEXT_BYTES + 1, b" " * (MAX_TEXT_BYTES + 1)))
    before = _downloads(hub, "registry.json")
    with pytest.raises(RegistryError, match=f"registry.json: {MAX_TEXT_BYTES + 1} B on the Hub, over the "
                                            f"{MAX_TEXT_BYTES} B limit"):
        _fresh(tmp_path / "c2").info()
    assert _downloads(hub, "registry.json") == before and not (tmp_path / "c2").exists()


@pytest.mark.parametrize(("lying", "extra", "said"), [
    ("registry.json", 4 << 20, "sent more than the {} B it declared; download stopped and nothing was kept"),
    ("vector", 4 << 20, "sent more than the {} B it declared; download stopped and nothing was kept"),
    ("registry.json", -100, "sent fewer bytes than the {} B it declared; nothing was kept; try again"),
])
def test_server_lying_about_the_size_is_refused(hub, sites, tmp_path: Path, lying: str, extra: int,
                                               said: str) -> None:
    base, vector = sites
    reg = created(REPO, base)
    entry = reg.push(vector(0)).entry
    path = entry.path if lying == "vector" else "registry.json"
    declared = hub.state.repos["consortium/chest-xray"].commits[_head(hub, "consortium/chest-xray")].files[path].size
    hub.state.length_lie[path] = extra
    fresh = _fresh(tmp_path / "cache")
    with pytest.raises(RegistryError) as e:
        if lying == "vector":
            fresh.fetch(entry, tmp_path / "v.safetensors", TrustPolicy(allow_unsigned=True))
        else:
            fresh.info()
    assert str(e.value) == f"{REPO}/{path}: the Hub " + said.format(declared)
    kept = [f.relative_to(tmp_path / "cache") for f in (tmp_path / "cache").rglob("*") if f.is_file()]
    assert kept and all(f.parts[3] == ".cache" and not f.name.endswith(".incomplete") for f in kept), kept


@pytest.mark.skipif(
    not (os.environ.get("TASKVEC_LIVE_HUB_REPO") and os.environ.get("HF_TOKEN")),
    reason="live Hub test: set TASKVEC_LIVE_HUB_REPO=ORG/REPO (a scratch repo) and HF_TOKEN",
)
def test_live_hub(sites, tmp_path: Path) -> None:
    from taskvec.registry import TrustPolicy

    base, vector = sites
    address = f"hf://{os.environ['TASKVEC_LIVE_HUB_REPO']}"
    reg = created(address, base)
    entry = reg.push(vector(0)).entry
    assert entry.sha256 in {e.sha256 for e in reg.entries()}
    dest = tmp_path / "fetched.safetensors"
    assert reg.fetch(entry, dest, TrustPolicy(allow_unsigned=True)).read_bytes() == vector(0).read_bytes()
