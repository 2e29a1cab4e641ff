"""`taskvec push --key` of a vector already pushed unsigned signs it, so a merger that trusts the key accepts it;
another key or another file with the same tensors is refused and changes nothing. Folder and Hub registries."""
# ruff: noqa: F811 (pytest fixtures imported from registry_fixtures)

from __future__ import annotations

from pathlib import Path

from cli_app import invoke
from registry_fixtures import address, hub, sites  # noqa: F401 (fixtures)

from taskvec.io.files import read_kind
from taskvec.merging.export import export_vector
from taskvec.registry import open_registry
from taskvec.registry.signing import verify
from taskvec.registry.verify import sha256_file


def _ok(*args: object) -> str:
    code, out, err = invoke(*args)
    assert code == 0, f"{args}: {out} {err}"
    return out


def test_push_with_key_signs_a_vector_pushed_unsigned(address: str, sites, tmp_path: Path) -> None:
    base, vector = sites
    v = vector(0)
    keyring = tmp_path / "merger.keyring"
    _ok("registry", "init", address, "--base", base)
    _ok("keys", "generate", "--out", tmp_path / "site0.key")
    _ok("keys", "generate", "--out", tmp_path / "other.key")
    assert "pushed" in _ok("push", v, "--registry", address)
    _ok("keys", "trust", "--contributor", "site0", "--key", tmp_path / "site0.key.pub", "--keyring", keyring)
    merge = ("merge", "--registry", address, "--base", base, "--out", tmp_path / "merged.safetensors",
             "--keyring", keyring)
    code, _, err = invoke(*merge)
    assert code != 0 and "unsigned" in err  # what the merger sees before the signature is added

    out = _ok("push", v, "--registry", address, "--key", tmp_path / "site0.key")
    assert out.startswith("signed") and "already in the registry" not in out
    [entry] = open_registry(address).entries()
    assert entry.signature is not None and verify(entry.signature, sha256_file(v))
    assert entry.signature["public_key"] == (tmp_path / "site0.key.pub").read_text().strip()
    assert "already in the registry" in _ok("push", v, "--registry", address, "--key", tmp_path / "site0.key")

    code, _, err = invoke("push", v, "--registry", address, "--key", tmp_path / "other.key")
    assert code != 0 and "signed by another key" in err and "not replaced" in err
    again = tmp_path / "again.safetensors"  # the same tensors exported again: other metadata, other bytes
    export_vector(tmp_path / "ft-base-0.safetensors", base, again, contributor="site0", samples=101)
    code, _, err = invoke("push", again, "--registry", address, "--key", tmp_path / "site0.key")
    assert code != 0 and "another file with the same tensors" in err
    assert open_registry(address).entries() == [entry]

    _ok(*merge)
    merge_record = read_kind(tmp_path / "merged.safetensors", "model").model.merge
    assert merge_record is not None and [s.sha256 for s in merge_record.vectors] == [entry.sha256]
