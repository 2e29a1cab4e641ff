"""Hostile registries: a site with write access swaps files between check and read, empties the registry's
key list, signs as someone else, plants names that are paths, symlinks, corrupt indexes and caches."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hostile import assert_refused, cli
from registry_fixtures import created, hub, sites  # noqa: F401 (fixtures)

from taskvec.errors import TaskvecError
from taskvec.io.files import read_kind
from taskvec.registry import IntegrityError, RegistryError, TrustError, TrustPolicy
from taskvec.registry.signing import generate_key, load_private_key
from taskvec.registry.store import MAX_TENSOR_FILE_BYTES

pytest.importorskip("torch")
OPEN = TrustPolicy(allow_unsigned=True)


def _index(reg_dir: Path) -> dict:
    return json.loads((reg_dir / "index.json").read_text())


def _write_index(reg_dir: Path, d: dict) -> None:
    (reg_dir / "index.json").write_text(json.dumps(d))


def test_what_is_verified_is_what_is_merged(sites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A site swaps the stored file right after the merger's check: the merger still uses the verified bytes."""
    import taskvec.registry.registry as base_mod

    base, vector = sites
    key, _, pub = generate_key(tmp_path / "a.key")
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    entry = reg.push(vector(0, contributor="site-a"), load_private_key(key)).entry
    evil = vector(1, contributor="site-a")  # unsigned, other tensors
    stored = reg_dir / entry.path
    real_verify = base_mod.verify_vector

    def verify_then_swap(path: Path, e, what: str) -> None:
        real_verify(path, e, what)
        stored.write_bytes(evil.read_bytes())  # the swap, between the check and any later read

    monkeypatch.setattr(base_mod, "verify_vector", verify_then_swap)
    policy = TrustPolicy({"site-a": frozenset([pub])})
    got = reg.fetch(entry, tmp_path / "fetched.safetensors", policy)
    assert got.read_bytes() == vector(0, contributor="site-a").read_bytes()
    assert reg_dir not in got.parents
    monkeypatch.setattr(base_mod, "verify_vector", real_verify)
    with pytest.raises(IntegrityError, match="replaced"):  # and the swapped file is refused from now on
        reg.fetch(entry, tmp_path / "again.safetensors", policy)
    assert not (tmp_path / "again.safetensors").exists()


def test_trust_anchor_is_the_mergers(sites, tmp_path: Path) -> None:
    base, vector = sites
    key, _, pub = generate_key(tmp_path / "a.key")
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    reg.trust("site-a", pub)
    reg.push(vector(0, contributor="site-a"), load_private_key(key))
    info = json.loads((reg_dir / "registry.json").read_text())
    info["trusted_keys"] = {}  # a site empties the registry's allowlist...
    (reg_dir / "registry.json").write_text(json.dumps(info))
    reg.push(vector(1, contributor="site-a"))  # ...and pushes an unsigned vector in site-a's name
    unsigned = [e for e in reg.entries() if e.signature is None]
    merger = TrustPolicy({"site-a": frozenset([pub])})
    into = tmp_path / "fetched"
    into.mkdir()
    with pytest.raises(TrustError, match="unsigned"):
        reg.fetch_all(reg.entries(), into, merger)
    with pytest.raises(TrustError, match="no key you trust"):  # no keyring, no explicit opt-in: nothing
        reg.fetch_all(unsigned, into, TrustPolicy())
    keyring = tmp_path / "keyring"
    keyring.write_text(f"# the merger's own\nsite-a {pub} laptop\n")
    assert TrustPolicy.load(keyring).keys == {"site-a": frozenset([pub])}
    signed = [e for e in reg.entries() if e.signature is not None]
    assert not list(into.iterdir())  # nothing was fetched before the refusal
    assert len(reg.fetch_all(signed, into, TrustPolicy.load(keyring))) == 1


def test_identity_of_file_index_and_signer_must_agree(sites, tmp_path: Path) -> None:
    base, vector = sites
    k0, _, pub0 = generate_key(tmp_path / "site0.key")
    k1, _, pub1 = generate_key(tmp_path / "site1.key")
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    policy = TrustPolicy({"site0": frozenset([pub0]), "site1": frozenset([pub1])})
    e = reg.push(vector(0, contributor="site0"), load_private_key(k1)).entry  # site1's key, site0's name
    with pytest.raises(TrustError, match="signed by the key of site1"):
        reg.fetch(e, tmp_path / "a.safetensors", policy)
    with pytest.raises(TrustError, match="signed by the key of site1"):  # not even with --allow-unsigned
        reg.fetch(e, tmp_path / "a.safetensors", TrustPolicy(policy.keys, allow_unsigned=True))
    # an index entry that credits another contributor than the file itself does
    good = reg.push(vector(2, contributor="site0"), load_private_key(k0)).entry
    d = _index(reg_dir)
    for v in d["vectors"]:
        if v["sha256"] == good.sha256:
            v["contributor"], v["path"] = "site1", f"vectors/site1/{good.sha256}.safetensors"
            v["signature"] = None
    _write_index(reg_dir, d)
    (reg_dir / "vectors" / "site1").mkdir()
    os.replace(reg_dir / good.path, reg_dir / "vectors" / "site1" / f"{good.sha256}.safetensors")
    moved = next(x for x in reg.entries() if x.sha256 == good.sha256)
    with pytest.raises(TrustError, match="the file says it is from 'site0'"):
        reg.fetch(moved, tmp_path / "b.safetensors", OPEN)
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("contributor", ["../../escaped", "site0\n", "a/b", ".hidden", "", "x" * 65, "s\x1b[31m"])
def test_remote_names_are_data(sites, tmp_path: Path, contributor: str) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    sha = reg.push(vector(0)).entry.sha256
    d = _index(reg_dir)
    d["vectors"][0]["contributor"] = contributor
    d["vectors"][0]["path"] = f"vectors/{contributor}/{sha}.safetensors"
    _write_index(reg_dir, d)
    with pytest.raises(TaskvecError, match="contributor id"):
        reg.entries()


def test_index_paths_and_fields_are_checked(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    reg.push(vector(0))
    good = _index(reg_dir)
    for field, value in (("path", "../../../etc/passwd"), ("sha256", "../x"), ("file_sha256", "zz"),
                         ("size", -1), ("size", 2**60), ("samples", True), ("signature", {"public_key": 7}),
                         ("created", 5), ("pushed", "garbage"), ("privacy", [1]),
                         ("privacy", [{"mechanism": "gaussian-output"}])):
        d = json.loads(json.dumps(good))
        d["vectors"][0][field] = value
        _write_index(reg_dir, d)
        with pytest.raises(RegistryError, match=f"invalid {field}"):
            reg.entries()


def test_an_index_listing_a_vector_twice_or_nested_too_deep_is_refused(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    reg.push(vector(0))
    d = _index(reg_dir)
    _write_index(reg_dir, {**d, "vectors": d["vectors"] * 2})
    with pytest.raises(RegistryError, match="listed twice; rebuild it with `taskvec registry reindex`"):
        reg.entries()
    (reg_dir / "index.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RegistryError, match="index.json: unreadable"):
        reg.entries()
    assert reg.reindex() == (1, [])


def _forged(src: Path, dest: Path) -> Path:
    """A copy of the noised vector `src` whose ledger claims ten times less ε than its noise gives."""
    from safetensors.torch import load_file, save_file

    meta = read_kind(src, "vector").meta
    meta["privacy"] = [{**e, "epsilon": e["epsilon"] / 10} for e in meta["privacy"]]
    save_file(load_file(str(src)), str(dest), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    return dest


def test_a_ledger_a_merge_would_refuse_never_enters_the_registry(make_base, make_finetuned, tmp_path: Path) -> None:
    """One push must not block every later merge of the registry: the ledger is verified (ε recomputed) on push
    and on reindex, as a merge verifies it."""
    from taskvec.merging.export import export_vector

    base = make_base()
    noised = tmp_path / "noised.safetensors"
    export_vector(make_finetuned(base, 0), base, noised, contributor="site0", clip=1.0, noise_multiplier=2.0,
                  delta=1e-5)
    forged = _forged(noised, tmp_path / "forged.safetensors")
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    with pytest.raises(TaskvecError, match="forged.safetensors: privacy entry 0"):
        reg.push(forged)
    assert reg.entries() == [] and not (reg_dir / "vectors" / "site0").exists()
    sha = read_kind(forged, "vector").meta["sha256"]
    (reg_dir / "vectors" / "site0").mkdir(parents=True)
    (reg_dir / "vectors" / "site0" / f"{sha}.safetensors").write_bytes(forged.read_bytes())  # planted
    count, skipped = reg.reindex()
    assert count == 0 and len(skipped) == 1 and "privacy entry 0" in skipped[0]
    assert reg.push(noised).entry.sha256 == sha  # the honest file with the same tensors is taken


def test_reindex_leaves_out_a_signature_file_that_is_not_one(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    e = reg.push(vector(0)).entry
    (reg_dir / e.path.removesuffix(".safetensors")).with_suffix(".sig").write_text('{"public_key": 7}')
    count, skipped = reg.reindex()
    assert count == 0 and "unreadable signature file" in skipped[0]
    assert reg.entries() == []


def test_pull_stays_in_out_and_creates_it(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    reg.push(vector(0))
    out = tmp_path / "new" / "folder"
    with pytest.raises(TrustError):  # unsigned, and this policy wants signatures: refused before any file
        reg.pull(reg.entries(), out, TrustPolicy())
    assert not (tmp_path / "new").exists()  # the folders it made are gone
    (path, copied), = reg.pull(reg.entries(), out, OPEN)
    assert copied and path.parent == out and path.read_bytes() == vector(0).read_bytes()
    path.unlink()
    with pytest.raises(TrustError):
        reg.pull(reg.entries(), out, TrustPolicy())
    assert out.is_dir()  # a folder that was there stays
    (path, copied), = reg.pull(reg.entries(), out, OPEN)
    d = _index(reg_dir)
    d["vectors"][0]["contributor"] = "../../escaped"
    _write_index(reg_dir, d)
    r = cli("pull", "--registry", reg_dir, "--out", "pulled", "--allow-unsigned", cwd=tmp_path)
    assert_refused(r, "contributor id")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "pulled").exists()


def test_reindex_follows_no_symlink_and_survives_any_index(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    e = reg.push(vector(0)).entry
    outside = tmp_path / "outside"
    outside.mkdir()
    sha1 = read_kind(vector(1), "vector").meta["sha256"]
    (outside / f"{sha1}.safetensors").write_bytes(vector(1).read_bytes())
    (reg_dir / "vectors" / "site1").symlink_to(outside)  # a planted folder link
    sha2 = read_kind(vector(2), "vector").meta["sha256"]
    (reg_dir / "vectors" / "site2").mkdir()
    (reg_dir / "vectors" / "site2" / f"{sha2}.safetensors").symlink_to(vector(2))  # a planted file link
    (reg_dir / "vectors" / "site0" / "junk.safetensors").write_bytes(b"not a vector")
    (reg_dir / "index.json").write_text("{ not json")
    with pytest.raises(RegistryError, match="reindex"):
        reg.entries()
    old = os.umask(0o022)
    try:
        count, skipped = reg.reindex()
    finally:
        os.umask(old)
    assert count == 1 and [x.sha256 for x in reg.entries()] == [e.sha256]
    links = "a symbolic link or special file, never followed; left out"  # named, not dropped silently
    assert skipped[:2] == [f"{reg_dir}/vectors/site1: {links}", f"{reg_dir}/vectors/site2/{sha2}.safetensors: {links}"]
    assert len(skipped) == 3 and "junk" in skipped[2]
    assert stat.S_IMODE((reg_dir / "index.json").stat().st_mode) == 0o644  # colleagues can read it


@pytest.mark.parametrize("too_large", [False, True])
def test_reindex_repairs_an_index_that_is_not_text_or_too_large(sites, tmp_path: Path, too_large: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    e = reg.push(vector(0)).entry
    limit = 2 * max((reg_dir / name).stat().st_size for name in ("registry.json", "index.json"))
    monkeypatch.setattr("taskvec.registry.store.MAX_TEXT_BYTES", limit)
    (reg_dir / "index.json").write_bytes(b" " * (limit + 1) if too_large else b"\xff\xfe{}")
    with pytest.raises(RegistryError, match="index.json: .*; rebuild it with `taskvec registry reindex`"):
        reg.entries()
    assert reg.reindex() == (1, [])
    assert [x.sha256 for x in reg.entries()] == [e.sha256]


def test_reindex_names_the_registry_file_it_leaves_out(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    sha = read_kind(vector(0), "vector").meta["sha256"]
    planted = reg_dir / "vectors" / "site0" / f"{sha}.safetensors"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(vector(0).read_bytes()[:100])  # truncated
    count, (skipped,) = reg.reindex()
    assert count == 0 and skipped.startswith(f"{reg_dir}/vectors/site0/{sha}.safetensors: ")


def test_pushed_vectors_are_usable_by_merge(sites, tmp_path: Path) -> None:
    """push checks tensors as merge does: a NaN or a content mismatch never enters the registry."""
    from safetensors.torch import load_file, save_file

    base, vector = sites
    reg = created(str(tmp_path / "reg"), base)
    src = vector(0)
    meta = read_kind(src, "vector").meta
    tensors = load_file(str(src))
    k = sorted(tensors)[0]
    tensors[k] = tensors[k].clone()
    tensors[k].view(-1)[0] = float("nan")
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    with pytest.raises(TaskvecError, match="NaN|sha256"):
        reg.push(nan)
    assert reg.entries() == []


def test_hub_cache_is_verified_and_refetched(hub, sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created("hf://consortium/cache-test", base)
    e = reg.push(vector(0)).entry
    assert reg.fetch(e, tmp_path / "a.safetensors", OPEN).read_bytes() == vector(0).read_bytes()
    cached = Path(os.environ["TASKVEC_CACHE"]) / "vectors" / f"{e.file_sha256}.safetensors"
    assert cached.is_file()
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))  # a damaged cache no longer blocks every later merge
    assert reg.fetch(e, tmp_path / "b.safetensors", OPEN).read_bytes() == vector(0).read_bytes()
    assert cached.read_bytes() == vector(0).read_bytes()


def test_folder_vector_over_the_cap_is_refused_before_copying(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(str(tmp_path / "reg"), base)
    entry = reg.push(vector(0)).entry
    os.truncate(tmp_path / "reg" / entry.path, MAX_TENSOR_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(TaskvecError, match=f"over the {MAX_TENSOR_FILE_BYTES} B limit; refused"):
        reg.fetch(entry, tmp_path / "v.safetensors", OPEN)
    assert not (tmp_path / "v.safetensors").exists()


def test_push_checks_the_base_layout(sites, tmp_path: Path) -> None:
    """A vector with the base's identity but other keys or shapes would block every merge: push refuses it."""
    from safetensors.torch import load_file, save_file

    from taskvec.errors import MismatchError

    base, vector = sites
    reg = created(str(tmp_path / "reg"), base)
    src = vector(0)
    tensors = load_file(str(src))
    k = sorted(tensors)[0]
    tensors[k] = tensors[k].reshape(-1)[:1].clone()  # a shape the base does not have
    from taskvec.io.tensors import state_digest

    meta = {**read_kind(src, "vector").meta, "sha256": state_digest(tensors)}
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={"format": "pt", "taskvec": json.dumps(meta)})
    with pytest.raises(MismatchError, match=f"shape of {k}") as e:
        reg.push(bad)
    assert f"the base of registry {reg.address}" in e.value.message  # the address as given (hf://org/x stays whole)
    assert reg.entries() == []


def test_an_index_of_tiny_entries_is_refused_within_bounded_memory(sites, tmp_path: Path) -> None:
    """An index.json at the size limit holding millions of empty entries (the most JSON objects per byte) is
    refused with one line, and parsing it stays within the memory bound of hostile input."""
    from taskvec.registry.store import MAX_TEXT_BYTES

    base, _ = sites
    reg_dir = tmp_path / "reg"
    created(str(reg_dir), base)
    head = b'{"format": "taskvec-registry-index", "format_version": 2, "vectors": ['
    count = (MAX_TEXT_BYTES - len(head) - 2) // 3
    (reg_dir / "index.json").write_bytes(head + b"{}," * (count - 1) + b"{}]}")
    assert (reg_dir / "index.json").stat().st_size <= MAX_TEXT_BYTES
    r = cli("list", "--registry", reg_dir, cwd=tmp_path)
    assert_refused(r, "index.json: an entry")  # within the memory bound of hostile input
