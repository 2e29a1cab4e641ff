"""Checks on the files a registry takes in and gives out: a pushed vector or a published version against
the registry's records, and a fetched copy against the record that named it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from taskvec.errors import FileFormatError, MismatchError
from taskvec.io.files import Header, TensorInfo, file_digest, open_regular, read_kind
from taskvec.io.layout import check_against_base
from taskvec.io.schema import ModelHeader, check_contributor
from taskvec.io.tensors_np import non_finite
from taskvec.registry.schema import Entry, IntegrityError, RegistryInfo, Version, describe_versions
from taskvec.registry.trust import TrustError


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a (regular) file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_vector_meta(h: Header) -> None:
    """A registry also needs a contributor id that can name a folder, and a ledger a merge accepts (every ε
    recomputed), so that one bad push cannot block every merge of the registry (`read_kind` checked the rest)."""
    from taskvec.privacy.entries import verify_ledger

    check_contributor(h.vector.contributor)
    if h.vector.privacy:
        verify_ledger(h.vector.privacy, str(h.path))



def check_tensors(h: Header) -> None:
    """The content identity (a vector's sha256, a model's identity) matches and every value is finite (one
    bounded read of the file, numpy only)."""
    from taskvec.io.files import scan

    def finite(name: str, t: TensorInfo, piece: bytes) -> None:
        if non_finite(piece, t.dtype):
            raise FileFormatError(f"{h.path}: tensor {name} holds NaN or Inf", path=h.path, field=name)

    field = "sha256" if h.kind == "vector" else "identity"
    if scan(h, finite) != (h.vector.sha256 if h.kind == "vector" else h.model.identity):
        raise IntegrityError(f"{h.path}: content does not match its {field}; the file is corrupted", path=h.path)


def check_push_policy(
    info: RegistryInfo, contributor: str, signature: dict[str, str] | None, file_sha: str, what: str
) -> None:
    """The registry's own signing policy, for pushers; a merger relies on its own keyring instead (`trust`)."""
    from taskvec.registry.signing import verify

    if signature is not None and not verify(signature, file_sha):
        raise TrustError(f"{what}: its signature does not verify; the file or signature was altered")
    if not info.trusted_keys:
        return
    if signature is None:
        raise TrustError(
            f"{what}: is unsigned, and this registry only accepts vectors signed by a trusted key; "
            "push with `key` (a site's private key)", field="key"
        )
    if signature["public_key"] not in info.trusted_keys.get(contributor, []):
        raise TrustError(
            f"{what}: is signed by a key the registry does not trust for {contributor!r}; "
            f"ask its maintainer to run `taskvec registry trust --contributor {contributor} --key KEY.pub`"
        )


def verify_vector(path: Path, entry: Entry, what: str) -> None:
    """A fetched copy must be the vector the index names: its header's content sha256 and contributor agree
    with the entry, and its tensors hash to that sha256."""
    h = read_kind(path, "vector")
    check_vector_meta(h)
    if h.vector.contributor != entry.contributor:
        raise TrustError(
            f"{what}: the file says it is from {h.vector.contributor!r}, the index says {entry.contributor!r}; "
            "the contributor in the file, the index and the signer must agree", path=what,
        )
    if h.vector.sha256 != entry.sha256 or file_digest(h) != entry.sha256:
        raise IntegrityError(f"{what}: content does not match its sha256 {entry.sha256[:12]}; the file is corrupted",
                             path=what)


def verify_version(path: Path, v: Version, what: str) -> None:
    """A fetched copy must be the version the registry names: its identity (in the header and of its tensors),
    its version number and its parent."""
    h = read_kind(path, "model")
    m = h.model
    claims: list[tuple[str, Any, Any]] = [("identity", m.identity, v.identity)]
    if v.version:  # the base (v0) may be any model
        claims += [("version", m.number, v.version), ("parent", m.parent, v.parent)]
    for fld, got, want in claims:
        if got != want or isinstance(got, bool):
            raise IntegrityError(f"{what}: its {fld} is {str(got)[:12]!r}, the registry records {str(want)[:12]!r}",
                                 path=what, field=fld)
    if file_digest(h) != v.identity:
        raise IntegrityError(f"{what}: content does not match its identity {v.identity[:12]}; the file is corrupted",
                             path=what)


def base_layout(info: RegistryInfo, address: str, version: Version) -> Header | dict[str, Any]:
    """What a file made from `version` is checked against: the base's tensor layout (every version has it)
    when the registry records it, so a vector push accepts is one merge can use, else the base record alone
    (registries made before); with `version`'s identity."""
    if "tensors" not in info.base:
        return {**info.base, "identity": version.identity}
    tensors = {k: TensorInfo(d, tuple(shape), 0, 0) for k, (d, shape) in info.base["tensors"].items()}
    typed = ModelHeader(identity=version.identity, model=info.base)
    return Header(Path(address), tensors, 0, typed.to_json(), typed=typed)


def version_of_vector(h: Header, info: RegistryInfo, address: str) -> Version:
    """The published version a vector was fine-tuned from (its `base.identity`); a `MismatchError` naming the
    versions the registry has otherwise, or when the vector's own `base.version`/`base.lineage` disagree."""
    base = h.vector.base
    v = info.version_of(base.identity)
    if v is None:
        raise MismatchError(
            f"{h.path}: base.identity is {base.identity[:12]}, not a version of {address} "
            f"(it has {describe_versions(info.versions)}); it was made from another base or an unpublished "
            "merge: fine-tune from a published version (`taskvec pull-version`)",
            path=h.path, field="base.identity", got=base.identity,
        )
    lineage = [x.identity for x in info.versions[: v.version]]
    for fld, actual, recorded in (("version", v.version, base.version), ("lineage", lineage, base.lineage)):
        claimed = actual if recorded is None else recorded  # vectors exported before versions existed claim neither
        if claimed != actual:
            raise MismatchError(
                f"{h.path}: base.{fld} is {claimed!r}, but its base is {v.label} of {address}, whose "
                f"{fld} is {actual!r}", path=h.path, field=f"base.{fld}", expected=actual, got=claimed,
            )
    return v


def check_next_version(h: Header, info: RegistryInfo, address: str) -> None:
    """A model may become version N+1 only as a merge onto the newest version N: its `parent` is vN, its
    `version` N+1, its `lineage` the registry's versions v0..vN, and its keys, shapes and dtypes the base's."""
    newest, m = info.newest, h.model
    parent = m.parent
    if parent != newest.identity:
        known = info.version_of(parent) if isinstance(parent, str) else None
        what = f"{known.label}, not the newest" if known else "not a version of the registry"
        raise MismatchError(
            f"{h.path}: parent is {str(parent)[:12]} ({what}); {address} has {describe_versions(info.versions)}: "
            f"merge onto v{newest.version} (`taskvec merge --registry {address}`) and publish that",
            path=h.path, field="parent", expected=newest.identity, got=parent,
        )
    version = m.number
    if version != newest.version + 1:
        raise MismatchError(
            f"{h.path}: version is {version!r}, a merge onto v{newest.version} of {address} is "
            f"version {newest.version + 1}", path=h.path, field="version", expected=newest.version + 1, got=version,
        )
    if m.versions()[:-1] != [v.identity for v in info.versions]:
        raise MismatchError(
            f"{h.path}: lineage does not list {address}'s versions ({describe_versions(info.versions)})",
            path=h.path, field="lineage",
        )
    check_against_base(h, base_layout(info, address, newest), f"registry {address}")
    for k, (dtype, _) in info.base.get("tensors", {}).items():
        if h.tensors[k].dtype != dtype:
            raise MismatchError(f"{h.path}: tensor {k} has dtype {h.tensors[k].dtype}, the base has {dtype}",
                                path=h.path, field=k, expected=dtype, got=h.tensors[k].dtype)
