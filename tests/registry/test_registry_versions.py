"""Published versions in a registry (folder and Hub fixture): version 0 is the base, a merge onto the newest
version becomes the next one; vectors against any published version are accepted; versions are fetched
verified; `merge --registry` merges onto the newest version the vectors not yet in it."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_fixtures import address, created, hub, no_backoff, sites  # noqa: F401 (fixtures)
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from taskvec.cli.app import app
from taskvec.errors import FileFormatError, MismatchError
from taskvec.io.files import dump_meta, read_header, read_kind
from taskvec.io.tensors import state_digest
from taskvec.merging.export import export_vector
from taskvec.merging.stream import merge_vectors
from taskvec.registry import IntegrityError, RegistryError, TrustError, TrustPolicy, open_registry
from taskvec.registry.signing import generate_key, load_private_key
from taskvec.registry.verify import sha256_file

torch = pytest.importorskip("torch")
OPEN = TrustPolicy(allow_unsigned=True)


def _id(path: Path) -> str:
    return read_kind(path, "model").meta["identity"]


def _rewrite(path: Path, out: Path, tensors: dict | None = None, drop: tuple[str, ...] = (), **fields) -> Path:
    """`path` with metadata `fields` changed, `drop` removed (and `tensors` replaced, identity recomputed)."""
    meta = {k: v for k, v in {**read_header(path).meta, **fields}.items() if k not in drop}
    if tensors is not None:
        meta["identity"] = state_digest(tensors)
    save_file(tensors if tensors is not None else load_file(str(path)), str(out), metadata=dump_meta(meta))
    return out


def _merge_onto(parent: Path, vectors: list[Path], out: Path) -> Path:
    """A merge onto `parent`: the next version, with its lineage."""
    return merge_vectors(vectors, parent, out, method="mean").path


def _v1(base: Path, vector, tmp_path: Path) -> Path:
    return _merge_onto(base, [vector(0), vector(1)], tmp_path / "m1.safetensors")


def _cli(*args: str | Path, flat: bool = True) -> str:
    """The command's output (`flat`: on one line, as rich wraps long paths)."""
    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, f"{args}: {res.output} {res.exception!r}"
    return " ".join(res.output.split()) if flat else res.output


def test_base_is_version_0_and_pulled_verified(address: str, sites, tmp_path: Path) -> None:
    base, _ = sites
    reg = created(address, base)
    (v0,) = reg.info().versions
    assert (v0.version, v0.identity, v0.parent) == (0, _id(base), None)
    assert v0.sha256 == sha256_file(base) and v0.path == "versions/v0.safetensors" and v0.signature is None
    with pytest.raises(TrustError, match="no key you trust vouches for 'merger'"):
        reg.pull_version(0, tmp_path / "refused.safetensors", TrustPolicy())
    out, got, copied = reg.pull_version(None, tmp_path / "v0.safetensors", OPEN)
    assert copied and got == v0 and out.read_bytes() == base.read_bytes()
    assert reg.pull_version(0, out, OPEN)[2] is False  # the same bytes are kept, not copied again


def test_publish_version_accepts_only_the_next_merge(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(address, base)
    m1 = _v1(base, vector, tmp_path)
    v0_id = _id(base)
    assert read_kind(m1, "model").meta["lineage"] == [{"version": 0, "identity": v0_id}]
    forged = [{"version": 0, "identity": "ab" * 32}, {"version": 1, "identity": v0_id, "vectors": []}]
    for bad, error, match in (
        # a file whose own version, lineage and parent disagree is malformed, named by field when read
        (_rewrite(m1, tmp_path / "v2.safetensors", version=2), FileFormatError, "lineage must list the 2 ancestors"),
        (_rewrite(m1, tmp_path / "par.safetensors", parent="ab" * 32), FileFormatError, "parent must be"),
        # a well-formed file that is not the registry's next version
        (_rewrite(m1, tmp_path / "fv2.safetensors", version=2, lineage=forged), MismatchError,
         "version is 2, a merge onto v0 .* is version 1"),
        (_rewrite(m1, tmp_path / "old.safetensors", drop=("version", "lineage")), MismatchError,
         "version is 0"),  # a merge by an older taskvec
        (_merge_onto(m1, [vector(5, b=m1)], tmp_path / "m2.safetensors"), MismatchError,
         f"parent is {_id(m1)[:12]} \\(not a version of the registry\\); .* has v0 {v0_id[:12]}"),
    ):
        with pytest.raises(error, match=match):
            reg.publish_version(bad)
    tensors = load_file(str(m1))
    k = next(k for k, t in sorted(tensors.items()) if t.is_floating_point())
    half = _rewrite(m1, tmp_path / "half.safetensors", {**tensors, k: tensors[k].half()})
    fewer = _rewrite(m1, tmp_path / "fewer.safetensors", {n: t for n, t in tensors.items() if n != k})
    for bad, match in ((half, f"tensor {k} has dtype F16, the base has F32"), (fewer, f"missing keys {k}")):
        with pytest.raises(MismatchError, match=match):
            reg.publish_version(bad)
    assert len(reg.info().versions) == 1  # nothing was published

    v1, added = reg.publish_version(m1)
    assert added and (v1.version, v1.identity, v1.parent) == (1, _id(m1), _id(base))
    assert v1.sha256 == sha256_file(m1) and v1.path == "versions/v1.safetensors"
    assert open_registry(address).info().versions[1] == v1
    assert reg.publish_version(m1) == (v1, False)  # publishing again changes nothing
    other = _merge_onto(base, [vector(2)], tmp_path / "other.safetensors")  # a second merge onto v0
    with pytest.raises(MismatchError, match=f"v0 {_id(base)[:12]}, not the newest.*v1 {_id(m1)[:12]}"):
        reg.publish_version(other)
    m2 = tmp_path / "m2.safetensors"  # onto v1, but claiming another root
    lineage = read_kind(m2, "model").meta["lineage"]
    with pytest.raises(MismatchError, match="lineage does not list"):
        reg.publish_version(_rewrite(m2, tmp_path / "m2-forged.safetensors",
                                     lineage=[{"version": 0, "identity": "ab" * 32}, lineage[1]]))
    out, got, _ = reg.pull_version(1, tmp_path / "pulled-v1.safetensors", OPEN)
    assert got == v1 and out.read_bytes() == m1.read_bytes()


def test_a_merge_that_changes_nothing_is_not_a_new_version(address: str, sites, tmp_path: Path) -> None:
    """A merge at λ = 0, or of a vector that changes nothing, is the next version by its header (version, parent,
    lineage; so its file differs) with its parent's tensors, so its parent's identity: publishing it is refused,
    naming the version it duplicates, and nothing is written."""
    base, vector = sites
    reg = created(address, base)
    m1 = _v1(base, vector, tmp_path)
    reg.publish_version(m1)
    idle = export_vector(base, base, tmp_path / "idle.safetensors", contributor="idle", samples=10).path
    assert all(not t.any() for t in load_file(str(idle)).values())  # fine-tuned == v0: a zero vector
    for parent, n, merged in (
        (m1, 1, merge_vectors([vector(5, b=m1)], m1, tmp_path / "zero-scale.safetensors", scale=0.0).path),
        (m1, 1, _merge_onto(m1, [idle], tmp_path / "zero-vector.safetensors")),
        (base, 0, merge_vectors([vector(5)], base, tmp_path / "zero-onto-v0.safetensors", scale=0.0).path),
    ):
        meta = read_kind(merged, "model").meta
        assert (meta["version"], meta["parent"], meta["identity"]) == (n + 1, _id(parent), _id(parent))
        assert sha256_file(merged) != sha256_file(parent)
        before = reg.store.reader().read_text("registry.json"), reg.store.list_files("versions")
        with pytest.raises(RegistryError, match=rf"identity is that of v{n} {_id(parent)[:12]} .*; nothing new to"):
            reg.publish_version(merged)
        assert (reg.store.reader().read_text("registry.json"), reg.store.list_files("versions")) == before
    assert [v.identity for v in reg.info().versions] == [_id(base), _id(m1)]
    assert reg.publish_version(m1)[1] is False  # the published file itself: still a no-op


def test_signed_versions_and_the_consumers_keyring(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    key, _, pub = generate_key(tmp_path / "merger.key")
    other_key, _, other_pub = generate_key(tmp_path / "other.key")
    reg = open_registry(address)
    reg.create(base, key=load_private_key(key), signer="coordinator")
    reg.trust("coordinator", pub)  # the registry now asks that versions by `coordinator` be signed
    m1 = _v1(base, vector, tmp_path)
    with pytest.raises(TrustError, match="unsigned, and this registry only accepts"):
        reg.publish_version(m1, signer="coordinator")
    with pytest.raises(TrustError, match="does not trust"):
        reg.publish_version(m1, load_private_key(other_key), signer="coordinator")
    v1, _ = reg.publish_version(m1, load_private_key(key), signer="coordinator")
    assert v1.signer == "coordinator" and v1.signature is not None and v1.signature["public_key"] == pub
    keyring = TrustPolicy({"coordinator": frozenset([pub])})
    for n in (0, 1):
        out, _, _ = reg.pull_version(n, tmp_path / f"v{n}.safetensors", keyring)
        assert out.read_bytes() == (base if n == 0 else m1).read_bytes()
    with pytest.raises(TrustError, match="no key you trust vouches for 'coordinator'"):
        reg.pull_version(1, tmp_path / "x.safetensors", TrustPolicy({"someone": frozenset([other_pub])}))
    with pytest.raises(TrustError, match="signed by the key of someone"):  # a key must sign for its own name
        reg.pull_version(1, tmp_path / "x.safetensors", TrustPolicy({"someone": frozenset([pub])}))


def test_push_against_published_versions(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    reg = created(address, base)
    m1 = _v1(base, vector, tmp_path)
    unpublished = vector(5, b=m1)
    with pytest.raises(MismatchError, match=rf"not a version of .* \(it has v0 {_id(base)[:12]}\)"):
        reg.push(unpublished)
    reg.publish_version(m1)
    assert reg.push(vector(0)).added and reg.push(unpublished).added  # against v0 and against v1
    m2 = _merge_onto(m1, [unpublished], tmp_path / "m2.safetensors")
    stranger = vector(6, b=m2)  # fine-tuned from a merge that was never published
    with pytest.raises(MismatchError, match=f"it has v0 {_id(base)[:12]}, v1 {_id(m1)[:12]}"):
        reg.push(stranger)
    claims = read_kind(vector(7, b=m1), "vector").meta["base"]
    assert (claims["version"], claims["lineage"]) == (1, [_id(base)])  # what export records
    liar = _rewrite(vector(7, b=m1), tmp_path / "liar.safetensors", base={**claims, "version": 0, "lineage": []})
    with pytest.raises(MismatchError, match="base.version is 0, but its base is v1"):
        reg.push(liar)
    listed = json.loads(_cli("list", "--registry", address, "--json"))
    assert [v["base_version"] for v in listed["vectors"]] == [0, 1]
    assert [(v["version"], v["identity"]) for v in listed["versions"]] == [(0, _id(base)), (1, _id(m1))]
    table = _cli("list", "--registry", address, flat=False)
    assert f"versions: v0 {_id(base)[:12]} (unsigned), v1 {_id(m1)[:12]} (unsigned)" in " ".join(table.split())
    rows = [row.split("│") for row in table.splitlines() if "site" in row]
    assert [r[3].strip() for r in rows] == ["v0", "v1"]
    pushed = [e.sha256[:16] for e in reg.entries()]  # whole at 80 columns, where the later columns are cut
    assert [(r[1].strip(), r[2].strip()) for r in rows] == [("site0", pushed[0]), ("site5", pushed[1])]


def test_tampered_version_is_refused(address: str, sites, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    base, vector = sites
    reg = created(address, base)
    m1 = _v1(base, vector, tmp_path)
    reg.publish_version(m1)
    out = tmp_path / "v1.safetensors"
    if address.startswith("hf://"):  # the server corrupts what it sends
        request.getfixturevalue("hub").state.corrupt.add("versions/v1.safetensors")
        match = "download was corrupted"
    else:
        stored = Path(address) / "versions" / "v1.safetensors"
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF
        stored.write_bytes(bytes(data))
        match = "corrupted or was replaced"
    with pytest.raises(IntegrityError, match=match):
        reg.pull_version(1, out, OPEN)
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_registry_json_versions_are_checked(sites, tmp_path: Path) -> None:
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    reg.publish_version(_v1(base, vector, tmp_path))
    good = json.loads((reg_dir / "registry.json").read_text())
    for n, fld, value in ((1, "path", "../../etc/passwd"), (1, "parent", "ab" * 32), (1, "version", 2),
                          (1, "version", True), (1, "sha256", "zz"), (1, "signer", "../x"), (0, "identity", "ab" * 32),
                          (1, "signature", {"public_key": 7}), (1, "extra", 1), (1, "sha256", None)):
        d = json.loads(json.dumps(good))
        d["versions"][n][fld] = value
        (reg_dir / "registry.json").write_text(json.dumps(d))
        with pytest.raises(RegistryError, match=rf"unreadable \(versions\[{n}\]"):
            reg.info()
    for versions in ([], "v0", [good["versions"][1]]):
        (reg_dir / "registry.json").write_text(json.dumps({**good, "versions": versions}))
        with pytest.raises(RegistryError, match="unreadable"):
            reg.info()
    for fld, value in (("created", 5), ("card", []), ("base", "x")):  # the error names the field
        (reg_dir / "registry.json").write_text(json.dumps({**good, fld: value}))
        with pytest.raises(RegistryError, match=rf"unreadable \({fld}\)"):
            reg.info()
    (reg_dir / "registry.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RegistryError, match="registry.json: unreadable"):
        reg.info()


def test_registry_json_with_two_versions_of_one_identity_is_refused(address: str, sites, tmp_path: Path) -> None:
    """A registry.json (hostile or hand-edited) whose versions repeat an identity is malformed: the version a vector
    was fine-tuned from would be ambiguous."""
    base, vector = sites
    reg = created(address, base)
    reg.publish_version(_v1(base, vector, tmp_path))
    d = json.loads(reg.store.reader().read_text("registry.json") or "")
    d["versions"][1]["identity"] = d["versions"][0]["identity"]  # every other field of v1 still checks out
    reg.store.update(lambda r: {"registry.json": json.dumps(d).encode()}, "a hostile edit")
    with pytest.raises(RegistryError, match=r"unreadable \(versions\[1\]\.identity is that of v0;"):
        open_registry(address).info()


def test_registry_made_before_versions(sites, tmp_path: Path) -> None:
    """A format 1 registry (no versions) is read as version 0 only; it can publish v1 but not serve v0."""
    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    d = json.loads((reg_dir / "registry.json").read_text())
    del d["versions"]
    (reg_dir / "registry.json").write_text(json.dumps({**d, "format_version": 1}))
    (reg_dir / "versions" / "v0.safetensors").unlink()
    (v0,) = reg.info().versions
    assert (v0.identity, v0.sha256, v0.path) == (_id(base), None, None)
    assert reg.push(vector(0)).added
    with pytest.raises(RegistryError, match="holds no copy of its base"):
        reg.pull_version(0, tmp_path / "v0.safetensors", OPEN)
    v1, _ = reg.publish_version(_v1(base, vector, tmp_path))
    assert [v.version for v in reg.info().versions] == [0, 1] and v1.parent == _id(base)
    assert json.loads((reg_dir / "registry.json").read_text())["format_version"] == 2


def test_merge_registry_onto_the_newest_version(address: str, sites, tmp_path: Path) -> None:
    """The merger's round: merge onto vN what is new, publish vN+1; a site pulls it and contributes against it."""
    base, vector = sites
    key, keyring = tmp_path / "merger.key", tmp_path / "keyring"
    _cli("keys", "generate", "--out", key)
    _cli("keys", "trust", "--contributor", "merger", "--key", f"{key}.pub", "--keyring", keyring)
    _cli("registry", "init", address, "--base", base, "--key", key)
    for i in (0, 1):
        _cli("push", vector(i), "--registry", address)
    out1 = tmp_path / "merged-1.safetensors"
    trust = ("--keyring", keyring, "--allow-unsigned")  # the versions are verified; the sites' vectors unsigned
    text = _cli("merge", "--registry", address, "--out", out1, "--method", "mean", *trust)
    assert "merging onto" in text and " v0 " in text
    ref = merge_vectors([vector(0), vector(1)], base, tmp_path / "ref1.safetensors", method="mean")
    assert _id(out1) == ref.identity and read_kind(out1, "model").meta["parent"] == _id(base)
    assert "as v1 (identity" in _cli("publish-version", out1, "--registry", address, "--key", key)

    start = tmp_path / "start.safetensors"  # a site starts from the newest version, signed by the merger
    assert "v1 (identity" in _cli("pull-version", "latest", "--registry", address, "--out", start, "--keyring", keyring)
    assert start.read_bytes() == out1.read_bytes()
    late, stale = vector(2, b=start), vector(3)  # from v1, and a site that still fine-tunes from v0
    _cli("push", late, stale, "--registry", address)
    out2 = tmp_path / "merged-2.safetensors"
    text = _cli("merge", "--registry", address, "--out", out2, "--method", "mean", *trust)
    assert "merging onto" in text and " v1 " in text and "2 vectors already merged (into v1) are left out" in text
    meta = read_kind(out2, "model").meta
    assert (meta["version"], meta["parent"]) == (2, _id(out1))
    assert meta["lineage"] == [{"version": 0, "identity": _id(base)}, {
        "version": 1, "identity": _id(out1), "vectors": read_kind(out1, "model").meta["merge"]["vectors"]}]
    assert [v["sha256"] for v in meta["merge"]["vectors"]] == [read_kind(p, "vector").meta["sha256"]
                                                               for p in (late, stale)]
    got, v1 = load_file(str(out2)), load_file(str(out1))
    tau_late, tau_stale = load_file(str(late)), load_file(str(stale))
    s = 2 ** -0.5  # the stale vector is one version behind: (1 + 1)^(-0.5)
    for k in tau_late:  # v2 = v1 + mean(1·τ_late, s·τ_stale), computed here from the files
        want = v1[k] + (tau_late[k] + s * tau_stale[k]) / 2
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(got[k], v1[k]) for k in tau_late)

    _cli("publish-version", out2, "--registry", address, "--key", key)
    text = _cli("merge", "--registry", address, "--out", tmp_path / "m3.safetensors", *trust)
    assert "up to date" in text and not (tmp_path / "m3.safetensors").exists()


def test_cli_refusals_are_one_line(sites, tmp_path: Path) -> None:
    from hostile import assert_refused, cli

    base, vector = sites
    reg_dir = tmp_path / "reg"
    reg = created(str(reg_dir), base)
    m1 = _v1(base, vector, tmp_path)
    stranger = vector(3, b=m1)
    assert_refused(cli("push", stranger, "--registry", reg_dir, cwd=tmp_path),
                   f"it has v0 {_id(base)[:12]})", code=1)
    wrong = _rewrite(m1, tmp_path / "wrong.safetensors", drop=("version", "lineage"))
    assert_refused(cli("publish-version", wrong, "--registry", reg_dir, cwd=tmp_path), "version is 0", code=1)
    idle = merge_vectors([vector(0)], base, tmp_path / "idle.safetensors", scale=0.0).path
    assert_refused(cli("publish-version", idle, "--registry", reg_dir, cwd=tmp_path),
                   f"its identity is that of v0 {_id(base)[:12]} of {reg_dir}", "nothing new to publish", code=1)
    assert_refused(cli("pull-version", "one", "--registry", reg_dir, "--out", "x.safetensors", cwd=tmp_path),
                   "VERSION is a number N", code=2)
    assert_refused(cli("pull-version", "7", "--registry", reg_dir, "--out", "x.safetensors", "--allow-unsigned",
                       cwd=tmp_path), "no version 7; it has v0", code=1)
    assert_refused(cli("merge", vector(0), "--out", "m.safetensors", cwd=tmp_path), "give --base BASE", code=2)
    assert_refused(cli("merge", cwd=tmp_path), "give the vectors to merge, e.g. `taskvec merge a.safetensors", code=2)
    none_since = ("--registry", reg_dir, "--base", base, "--since", "2999-01-01", "--allow-unsigned")
    assert_refused(cli("merge", *none_since, "--out", "m.safetensors", cwd=tmp_path),
                   f"no vectors to merge: {reg_dir} holds none", code=2)
    assert not (tmp_path / "x.safetensors").exists() and reg.info().versions[-1].version == 0


def test_racing_mergers_on_the_hub(hub, sites, no_backoff, tmp_path: Path) -> None:
    """Two mergers publish v1 at once: the commit computed on the old head is refused (412), recomputed on the
    new head, and then refused as a merge onto v0, which is no longer the newest; nothing half-published."""
    base, vector = sites
    address = "hf://consortium/race"
    reg, other = created(address, base), open_registry(address)
    mine, theirs = (_merge_onto(base, vs, tmp_path / f"{n}.safetensors")
                    for n, vs in (("mine", [vector(0)]), ("theirs", [vector(1)])))
    real, parents = reg.store.api.create_commit, []

    def racing_commit(*args, **kwargs):
        parents.append(kwargs["parent_commit"])
        if len(parents) == 1:
            other.publish_version(theirs)  # the other merger commits between our read and our commit
        return real(*args, **kwargs)

    reg.store.api.create_commit = racing_commit
    with pytest.raises(MismatchError, match=f"v0 {_id(base)[:12]}, not the newest.*v1 {_id(theirs)[:12]}"):
        reg.publish_version(mine)
    assert len(parents) == 1  # the second attempt stopped before committing
    assert [v.identity for v in open_registry(address).info().versions] == [_id(base), _id(theirs)]
