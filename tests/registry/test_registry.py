"""Registries behind one interface: every test runs against a folder and against the Hub fixture."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from registry_fixtures import address, created, hub, sites  # noqa: F401 (fixtures)
from safetensors.torch import load_file

from taskvec.errors import MismatchError
from taskvec.io.files import read_kind
from taskvec.merging.stream import merge_vectors
from taskvec.registry import IntegrityError, RegistryError, TrustError, TrustPolicy, open_registry
from taskvec.registry.schema import parse_time
from taskvec.registry.signing import generate_key, load_private_key, public_line
from taskvec.registry.verify import sha256_file

torch = pytest.importorskip("torch")
OPEN = TrustPolicy(allow_unsigned=True)  # a merger that accepts vectors of unverified origin


def _sha(path: Path) -> str:
    return read_kind(path, "vector").meta["sha256"]


def test_push_list_fetch(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    v0, v1 = vector(0, samples=120), vector(1, contributor="hospital-b")
    reg = created(address, base)
    assert reg.entries() == []
    r0, r1 = reg.push(v0), reg.push(v1)
    assert r0.added and r1.added
    entries = reg.entries()
    assert [(e.contributor, e.sha256, e.samples) for e in entries] == [
        ("site0", _sha(v0), 120), ("hospital-b", _sha(v1), 200)
    ]
    assert entries[1].path == f"vectors/hospital-b/{_sha(v1)}.safetensors"
    assert entries[0].file_sha256 == sha256_file(v0) and entries[0].size == v0.stat().st_size
    assert entries[0].base == read_kind(base, "model").meta["identity"]
    fetched = reg.fetch_all(entries, tmp_path, OPEN)
    assert [p.read_bytes() for p in fetched] == [v0.read_bytes(), v1.read_bytes()]
    again = open_registry(address).push(v0)  # a second push (from a fresh client) changes nothing
    assert not again.added and again.entry.sha256 == _sha(v0)
    assert len(open_registry(address).entries()) == 2


def test_refuses_vector_for_another_base(address: str, sites, make_base) -> None:
    base, vector = sites
    other = make_base(arch="test_resnet", name="other.safetensors")
    reg = created(address, base)
    with pytest.raises(MismatchError, match="made from another base"):
        reg.push(vector(0, b=other))
    assert reg.entries() == []


def test_create_is_idempotent_and_one_base(address: str, sites, make_base) -> None:
    base, _ = sites
    reg = created(address, base)
    info, made = reg.create(base)
    assert not made and info.base["identity"] == read_kind(base, "model").meta["identity"]
    with pytest.raises(MismatchError, match="one registry holds one base"):
        reg.create(make_base(arch="test_resnet", name="other.safetensors"))


def test_missing_registry(address: str) -> None:
    with pytest.raises(RegistryError, match="no such registry|repository not found"):
        open_registry(address).entries()


def test_corrupted_file_is_refused(address: str, sites, hub_or_none, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(address, base)
    entry = reg.push(vector(0)).entry
    if hub_or_none is None:  # flip one byte of the stored file
        stored = Path(address) / entry.path
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
    else:  # the server corrupts what it sends
        hub_or_none.state.corrupt.add(entry.path)
    dest = tmp_path / "fetched.safetensors"
    with pytest.raises(IntegrityError, match="corrupted"):
        reg.fetch(entry, dest, OPEN)
    assert not dest.exists()
    if hub_or_none is not None:  # the bad copy was not kept: a clean download then succeeds
        hub_or_none.state.corrupt.clear()
        assert reg.fetch(entry, dest, OPEN).read_bytes() == vector(0).read_bytes()


@pytest.fixture
def hub_or_none(address: str, request: pytest.FixtureRequest):
    return request.getfixturevalue("hub") if address.startswith("hf://") else None


def test_signatures_and_allowlist(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    a_key, _, a_pub = generate_key(tmp_path / "a.key")
    b_key, _, _ = generate_key(tmp_path / "b.key")
    reg = created(address, base)
    early = reg.push(vector(3, contributor="site-a")).entry  # unsigned, before the registry required signatures
    signed = reg.push(vector(0, contributor="site-a"), load_private_key(a_key)).entry
    assert signed.signature is not None and signed.signature["public_key"] == a_pub
    reg.trust("site-a", a_pub)
    with pytest.raises(TrustError, match="unsigned"):
        reg.push(vector(1, contributor="site-a"))
    with pytest.raises(TrustError, match="does not trust"):
        reg.push(vector(1, contributor="site-a"), load_private_key(b_key))
    assert reg.push(vector(1, contributor="site-a"), load_private_key(a_key)).added
    merger = TrustPolicy({"site-a": frozenset([a_pub])})  # the merger's own keyring
    with pytest.raises(TrustError, match="unsigned"):
        reg.fetch_all(reg.entries(), tmp_path, merger)
    dest = tmp_path / "signed.safetensors"
    assert reg.fetch(signed, dest, merger).read_bytes() == vector(0, contributor="site-a").read_bytes()
    assert [e.sha256 for e in reg.entries()][0] == early.sha256


def test_forged_signature_is_refused(tmp_path: Path, sites) -> None:
    base, vector = sites
    key, _, pub = generate_key(tmp_path / "k.key")
    reg = created(str(tmp_path / "reg"), base)
    reg.trust("site0", pub)
    entry = reg.push(vector(0), load_private_key(key)).entry
    index = tmp_path / "reg" / "index.json"
    d = json.loads(index.read_text())
    sig = bytearray(base64.b64decode(d["vectors"][0]["signature"]["signature"]))
    sig[0] ^= 1
    d["vectors"][0]["signature"]["signature"] = base64.b64encode(sig).decode()
    index.write_text(json.dumps(d))
    with pytest.raises(TrustError, match="does not verify"):
        reg.fetch(reg.entries()[0], tmp_path / "v.safetensors", TrustPolicy({"site0": frozenset([pub])}))
    assert entry.signature is not None and public_line(load_private_key(key).public_key()) == pub


def test_select_by_contributor_and_time(address: str, sites) -> None:
    base, vector = sites
    reg = created(address, base)
    for i in range(3):
        reg.push(vector(i))
    assert [e.contributor for e in reg.select(["site2", "site0"])] == ["site0", "site2"]
    assert len(reg.select(since="2000-01-01")) == 3 and reg.select(since="2999-01-01") == []
    with pytest.raises(RegistryError, match="no vectors from nobody"):
        reg.select(["nobody"])


def test_reindex_rebuilds_from_files(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    key, _, _ = generate_key(tmp_path / "k.key")
    reg = created(address, base)
    reg.push(vector(0))
    reg.push(vector(1), load_private_key(key))
    before = {e.sha256: e.to_dict() for e in reg.entries()}
    reg.store.update(lambda r: {"index.json": b'{"vectors": []}'}, "lose the index")
    assert reg.entries() == []
    assert reg.reindex() == (2, [])
    after = {e.sha256: e.to_dict() for e in reg.entries()}
    assert after.keys() == before.keys()
    for sha, e in after.items():  # the push time comes back from the file's write or commit time
        pushed, was = parse_time(e.pop("pushed")), parse_time(before[sha].pop("pushed"))
        assert abs((pushed - was).total_seconds()) <= 5
        assert e == before[sha]


def test_merge_from_registry_equals_merge_of_files(address: str, sites, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from taskvec.cli.app import app

    base, vector = sites
    vecs = [vector(i) for i in range(3)]
    reg = created(address, base)
    for v in vecs:
        reg.push(v)
    out = tmp_path / "merged.safetensors"
    res = CliRunner().invoke(app, ["merge", "--registry", address, "--base", str(base), "--out", str(out),
                                   "--method", "weighted", "--only-contributor", "site0", "--only-contributor", "site2",
                                   "--allow-unsigned"])
    assert res.exit_code == 0, res.output
    ref = tmp_path / "ref.safetensors"
    merge_vectors([vecs[0], vecs[2]], base, ref, method="weighted")
    a, b = load_file(str(out)), load_file(str(ref))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert [v["sha256"] for v in read_kind(out, "model").meta["merge"]["vectors"]] == [_sha(vecs[0]), _sha(vecs[2])]
