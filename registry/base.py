"""One registry interface over two stores (a folder, a Hub repo): layout, index, push, fetch, selection.

Layout of a registry, the same in a folder and in a Hub repo::

    registry.json                                   base identity (one registry = one base), trusted keys, versions
    index.json                                      one entry per vector; rebuildable from the files below
    README.md                                       model card listing the contributions
    versions/v<N>.safetensors                       the published versions: v0 the base, vN+1 a merge onto vN
    vectors/<contributor>/<sha256>.safetensors      the vector, named by its content identity
    vectors/<contributor>/<sha256>.sig              its Ed25519 signature (optional)

A vector may be fine-tuned from any published version; `registry.json` records each version's identity,
file sha256, parent and signature, so a site can fetch the newest one verified, and a merger can publish
the next one only on top of the newest.

A `Store` knows how to read a file, list files, give a local copy of a file, and apply one change
atomically (a lock and renames for a folder, a commit with `parent_commit` for the Hub). Everything
else (validation, trust, the index, the card) lives here, once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskvec.registry.trust import TrustError, TrustPolicy, check_contributor

from taskvec.errors import FileFormatError, MismatchError, TaskvecError
from taskvec.io.files import (
    DTYPE_SIZES,
    Header,
    TensorInfo,
    atomic_output,
    file_digest,
    now,
    open_regular,
    read_kind,
)
from taskvec.io.layout import check_against_base
from taskvec.io.lineage import describe_versions as describe_identities
from taskvec.io.lineage import is_sha
from taskvec.io.tensors_np import non_finite
from taskvec.progress import Track, no_track

REGISTRY_FILE = "registry.json"
INDEX_FILE = "index.json"
CARD_FILE = "README.md"
VECTOR_DIR = "vectors"
VERSION_DIR = "versions"
REGISTRY_FORMAT = "taskvec-registry"
REGISTRY_VERSION = 2  # 2: `versions` (format 1 registries hold version 0 only and are read as such)
DEFAULT_SIGNER = "merger"
MAX_TEXT_BYTES = 64 * 1024 * 1024  # registry.json, index.json, signatures
MAX_TENSOR_FILE_BYTES = 32 * 1024**3  # vectors and versions: a 7B-parameter float32 model is 28 GB


class RegistryError(TaskvecError):
    """A registry is missing, unreachable, refuses access, or was asked for something it cannot do."""


class IntegrityError(FileFormatError):
    """A fetched file does not match the sha256 the registry recorded for it."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a (regular) file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_small_text(path: str | os.PathLike[str], what: str) -> str:
    """A registry text file (JSON, signature) of at most `MAX_TEXT_BYTES`, never through a symbolic link."""
    with open_regular(path, follow_symlinks=False) as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise RegistryError(f"{what}: over {MAX_TEXT_BYTES} B; not a registry file", path=what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"{what}: not UTF-8 text; not a registry file", path=what) from None


def parse_time(text: str) -> _dt.datetime:
    """An ISO date or date-time; naive values are UTC."""
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise TaskvecError(
            f"cannot read time {text!r}; give an ISO date such as 2025-03-01 or 2025-03-01T12:00"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass
class Entry:
    """One vector in a registry, as the index records it."""

    sha256: str
    contributor: str
    path: str
    file_sha256: str
    size: int
    base: str
    samples: int | None
    dtype: str
    privacy: list[dict[str, Any]]
    created: str
    pushed: str
    signature: dict[str, str] | None = None

    @classmethod
    def from_header(
        cls, h: Header, file_sha256: str, pushed: str, signature: dict[str, str] | None = None
    ) -> Entry:
        m = h.meta
        return cls(
            sha256=m["sha256"], contributor=m["contributor"], path=vector_path(m["contributor"], m["sha256"]),
            file_sha256=file_sha256, size=h.size, base=m["base"]["identity"], samples=m.get("samples"),
            dtype=m.get("dtype", "?"), privacy=m.get("privacy", []), created=m.get("created", "?"),
            pushed=pushed, signature=signature,
        )

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Entry:
        """An index entry, every field checked: names from a registry are data, never paths or markup."""
        try:
            e = cls(**d)
        except TypeError:
            raise RegistryError(f"{where}: an entry has missing or unknown fields", path=where) from None
        check_contributor(e.contributor)
        problems = [
            name for name, ok in (
                ("sha256", is_sha(e.sha256)), ("file_sha256", is_sha(e.file_sha256)),
                ("path", e.path == vector_path(e.contributor, e.sha256) if is_sha(e.sha256) else False),
                ("size", _is_count(e.size)), ("base", isinstance(e.base, str)),
                ("samples", e.samples is None or _is_count(e.samples)),
                ("dtype", isinstance(e.dtype, str)), ("privacy", isinstance(e.privacy, list)),
                ("created", isinstance(e.created, str)), ("pushed", isinstance(e.pushed, str)),
                ("signature", e.signature is None or (isinstance(e.signature, dict)
                                                      and all(isinstance(v, str) for v in e.signature.values()))),
            ) if not ok
        ]
        if problems:
            raise RegistryError(f"{where}: an entry of {e.contributor} has an invalid {problems[0]}",
                                path=where, field=problems[0])
        return e

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_path(n: int) -> str:
    return f"{VERSION_DIR}/v{n}.safetensors"


@dataclass
class Version:
    """A model the registry published for sites to fine-tune from: version 0 is its base, version N+1 a merge
    onto version N. `sha256` (of the file) and `path` are None only for the base of a registry made before
    versions were stored (format 1), which holds no copy of it. `signer` is the name consumers' keyrings know
    the publisher by; `signature` its Ed25519 signature of the file's sha256, or None."""

    version: int
    identity: str
    sha256: str | None
    path: str | None
    parent: str | None
    created: str
    signer: str = DEFAULT_SIGNER
    signature: dict[str, str] | None = None

    @property
    def label(self) -> str:
        return f"v{self.version} {self.identity[:12]}"

    @classmethod
    def from_dict(cls, d: Any, earlier: Sequence[Version], base: str) -> Version:
        """The version after `earlier` of a registry for `base`, every field checked; its identity is none of
        theirs (one identity is one version, so a vector's base is never ambiguous)."""
        previous = earlier[-1] if earlier else None
        n = len(earlier)
        try:
            v = cls(**d)
        except TypeError:
            raise ValueError(f"versions[{n}] has missing or unknown fields") from None
        unstored = n == 0 and v.sha256 is None and v.path is None  # a format 1 registry's base
        problems = [
            name for name, ok in (
                ("version", type(v.version) is int and v.version == n),
                ("identity", v.identity == base if previous is None else is_sha(v.identity)),
                ("sha256", unstored or is_sha(v.sha256)), ("path", unstored or v.path == version_path(n)),
                ("parent", v.parent == (None if previous is None else previous.identity)),
                ("created", isinstance(v.created, str)), ("signer", _is_name(v.signer)),
                ("signature", v.signature is None or (isinstance(v.signature, dict) and all(
                    isinstance(x, str) for x in v.signature.values()))),
            ) if not ok
        ]
        if problems:
            raise ValueError(f"versions[{n}].{problems[0]}")
        same = next((e for e in earlier if e.identity == v.identity), None)
        if same is not None:
            raise ValueError(f"versions[{n}].identity is that of v{same.version}; two versions cannot share one")
        return v


def _is_name(x: Any) -> bool:
    try:
        check_contributor(x)
    except TaskvecError:
        return False
    return True


def describe_versions(versions: Sequence[Version]) -> str:
    """`v0 <id12>, v1 <id12>, ...`: how errors name the versions a registry has."""
    return describe_identities([v.identity for v in versions])


@dataclass
class RegistryInfo:
    """`registry.json`: the one base this registry holds vectors for, the versions published on it, and the
    keys it asks pushers to sign with (a hint for pushers: a merger trusts its own keyring, see
    `taskvec.registry.trust`)."""

    base: dict[str, Any]
    created: str
    trusted_keys: dict[str, list[str]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
    versions: list[Version] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.versions:  # a format 1 registry: its base is version 0, of which it holds no copy
            self.versions = [Version(0, self.base["identity"], None, None, None, self.created)]

    @property
    def newest(self) -> Version:
        return self.versions[-1]

    def version_of(self, identity: str) -> Version | None:
        """The version with `identity`, if any (unique: `from_json` and `publish_version` refuse a repeat)."""
        return next((v for v in self.versions if v.identity == identity), None)

    def to_json(self) -> str:
        d = {"format": REGISTRY_FORMAT, "format_version": REGISTRY_VERSION, **asdict(self)}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> RegistryInfo:
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != REGISTRY_FORMAT:
                raise ValueError("not a taskvec registry")
            version = d.get("format_version", 0)
            if not _is_count(version):
                raise ValueError(f"format_version {version!r}")
            if version > REGISTRY_VERSION:
                raise RegistryError(f"{where}: registry format {version} is newer; upgrade taskvec")
            b = d["base"]
            if not (isinstance(b, dict) and is_sha(b.get("identity")) and isinstance(b.get("arch"), str)
                    and isinstance(b.get("task"), str) and isinstance(b.get("labels"), list)
                    and all(isinstance(x, str) for x in b["labels"])):
                raise ValueError("base")
            layout = b.get("tensors", {})
            if not (isinstance(layout, dict) and all(
                    isinstance(v, list) and len(v) == 2 and v[0] in DTYPE_SIZES and isinstance(v[1], list)
                    and all(_is_count(n) for n in v[1]) for v in layout.values())):
                raise ValueError("base tensors")
            raw = d.get("versions", [])
            if not isinstance(raw, list) or (version < 2 and raw) or (version >= 2 and not raw):
                raise ValueError("versions")
            versions: list[Version] = []
            for item in raw:
                versions.append(Version.from_dict(item, versions, b["identity"]))
            info = cls(b, d["created"], d.get("trusted_keys", {}), d.get("card", {}), versions)
            keys = info.trusted_keys
            if not (isinstance(keys, dict) and all(isinstance(v, list) and all(isinstance(k, str) for k in v)
                                                   for v in keys.values())):
                raise ValueError("trusted_keys")
            for c in keys:
                check_contributor(c)
            if not isinstance(info.card, dict) or not isinstance(info.created, str):
                raise ValueError("card")
            return info
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RegistryError(f"{where}/{REGISTRY_FILE}: unreadable ({e})") from None


def base_layout(info: RegistryInfo, address: str, version: Version) -> Header | dict[str, Any]:
    """What a file made from `version` is checked against: the base's tensor layout (every version has it)
    when the registry records it, so a vector push accepts is one merge can use, else the base record alone
    (registries made before); with `version`'s identity."""
    if "tensors" not in info.base:
        return {**info.base, "identity": version.identity}
    tensors = {k: TensorInfo(d, tuple(shape), 0, 0) for k, (d, shape) in info.base["tensors"].items()}
    return Header(Path(address), tensors, 0, {"identity": version.identity, "model": info.base})


def version_of_vector(h: Header, info: RegistryInfo, address: str) -> Version:
    """The published version a vector was fine-tuned from (its `base.identity`); a `MismatchError` naming the
    versions the registry has otherwise, or when the vector's own `base.version`/`base.lineage` disagree."""
    base = h.meta["base"]
    v = info.version_of(base["identity"])
    if v is None:
        raise MismatchError(
            f"{h.path}: base.identity is {base['identity'][:12]}, not a version of {address} "
            f"(it has {describe_versions(info.versions)}); it was made from another base or an unpublished "
            "merge: fine-tune from a published version (`taskvec pull-version`)",
            path=h.path, field="base.identity", got=base["identity"],
        )
    lineage = [x.identity for x in info.versions[: v.version]]
    for fld, actual in (("version", v.version), ("lineage", lineage)):
        claimed = base.get(fld, actual)  # vectors exported before versions existed claim neither
        if claimed != actual or isinstance(claimed, bool):
            raise MismatchError(
                f"{h.path}: base.{fld} is {claimed!r}, but its base is {v.label} of {address}, whose "
                f"{fld} is {actual!r}", path=h.path, field=f"base.{fld}", expected=actual, got=claimed,
            )
    return v


def check_next_version(h: Header, info: RegistryInfo, address: str) -> None:
    """A model may become version N+1 only as a merge onto the newest version N: its `parent` is vN, its
    `version` N+1, its `lineage` the registry's versions v0..vN, and its keys, shapes and dtypes the base's."""
    newest, meta = info.newest, h.meta
    parent = meta.get("parent")
    if parent != newest.identity:
        known = info.version_of(parent) if isinstance(parent, str) else None
        what = f"{known.label}, not the newest" if known else "not a version of the registry"
        raise MismatchError(
            f"{h.path}: parent is {str(parent)[:12]} ({what}); {address} has {describe_versions(info.versions)}: "
            f"merge onto v{newest.version} (`taskvec merge --registry {address}`) and publish that",
            path=h.path, field="parent", expected=newest.identity, got=parent,
        )
    version = meta.get("version", 0)
    if type(version) is not int or version != newest.version + 1:
        raise MismatchError(
            f"{h.path}: version is {version!r}, a merge onto v{newest.version} of {address} is "
            f"version {newest.version + 1}", path=h.path, field="version", expected=newest.version + 1, got=version,
        )
    if [e["identity"] for e in meta.get("lineage", [])] != [v.identity for v in info.versions]:  # read_kind checked it
        raise MismatchError(
            f"{h.path}: lineage does not list {address}'s versions ({describe_versions(info.versions)})",
            path=h.path, field="lineage",
        )
    check_against_base(h, base_layout(info, address, newest), f"registry {address}")
    for k, (dtype, _) in info.base.get("tensors", {}).items():
        if h.tensors[k].dtype != dtype:
            raise MismatchError(f"{h.path}: tensor {k} has dtype {h.tensors[k].dtype}, the base has {dtype}",
                                path=h.path, field=k, expected=dtype, got=h.tensors[k].dtype)


def vector_path(contributor: str, sha: str) -> str:
    return f"{VECTOR_DIR}/{contributor}/{sha}.safetensors"


def signature_path(vector: str) -> str:
    return vector.removesuffix(".safetensors") + ".sig"


def dump_index(entries: Iterable[Entry]) -> str:
    d = {"format": f"{REGISTRY_FORMAT}-index", "format_version": REGISTRY_VERSION,
         "vectors": [e.to_dict() for e in entries]}
    return json.dumps(d, indent=2, sort_keys=True) + "\n"


def load_index(text: str | None, where: str) -> list[Entry]:
    if text is None:
        return []
    try:
        vectors = json.loads(text)["vectors"]
        if not isinstance(vectors, list):
            raise TypeError("vectors is not a list")
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(
            f"{where}/{INDEX_FILE}: unreadable ({e}); rebuild it with `taskvec registry reindex`"
        ) from None
    try:
        return [Entry.from_dict(e, f"{where}/{INDEX_FILE}") for e in vectors]
    except RegistryError as e:
        raise RegistryError(f"{e.message}; rebuild it with `taskvec registry reindex`", path=e.path,
                            field=e.field) from None


class Reader(ABC):
    """Read access to one consistent state of a store (a folder under its lock, or one Hub commit)."""

    @abstractmethod
    def read_text(self, path: str) -> str | None:
        """The file's text, or None when it does not exist."""


Change = Callable[[Reader], "dict[str, bytes | Path] | None"]


class Store(ABC):
    """Where a registry's files live. Paths are POSIX, relative to the registry root."""

    address: str

    @abstractmethod
    def reader(self) -> Reader:
        """The current state, for reading."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether the folder or repo exists (it may still hold no registry)."""

    @abstractmethod
    def create(self) -> None:
        """Create the empty folder or repo; no-op when it exists."""

    @abstractmethod
    def list_files(self, prefix: str) -> dict[str, str]:
        """Every file under `prefix`, with the ISO time it was last written (folder) or committed (Hub)."""

    @abstractmethod
    def copy_to(self, path: str, dest: Path, expected_sha256: str | None) -> str:
        """Copy the file at `path` to the new private file `dest`; return the sha256 of the bytes copied.

        Callers check that sha256 and then read only `dest`, so what was verified is what is used
        (`taskvec.io.files.private_copy`). A Hub store serves a cached download when its bytes still hash
        to `expected_sha256`, and downloads again otherwise."""

    @abstractmethod
    def update(self, change: Change, message: str) -> bool:
        """Atomically apply `change(reader)` (files to write; None for nothing); retried on conflict."""


@dataclass
class PushResult:
    entry: Entry
    added: bool


class Registry:
    """A registry of data vectors for one base, over any `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def address(self) -> str:
        return self.store.address

    def _missing(self) -> RegistryError:
        if not self.store.exists():
            return RegistryError(
                f"{self.address}: no such registry; create it with `taskvec registry init {self.address} --base BASE`"
            )
        return RegistryError(
            f"{self.address}: not a taskvec registry (no {REGISTRY_FILE}); "
            f"create one with `taskvec registry init {self.address} --base BASE`"
        )

    def info(self, reader: Reader | None = None) -> RegistryInfo:
        text = (reader or self.store.reader()).read_text(REGISTRY_FILE)
        if text is None:
            raise self._missing()
        return RegistryInfo.from_json(text, self.address)

    def entries(self) -> list[Entry]:
        reader = self.store.reader()
        self.info(reader)
        return load_index(reader.read_text(INDEX_FILE), self.address)

    def select(self, contributors: Sequence[str] | None = None, since: str | None = None) -> list[Entry]:
        """Entries by contributor and/or pushed at or after `since` (ISO date or time)."""
        entries = self.entries()
        if contributors:
            unknown = sorted(set(contributors) - {e.contributor for e in entries})
            if unknown:
                raise RegistryError(f"{self.address}: no vectors from {', '.join(unknown)}")
            entries = [e for e in entries if e.contributor in contributors]
        if since is not None:
            t = parse_time(since)
            entries = [e for e in entries if parse_time(e.pushed) >= t]
        return entries

    def create(self, base: str | os.PathLike[str], card: dict[str, Any] | None = None, key: Any = None,
               signer: str = DEFAULT_SIGNER) -> tuple[RegistryInfo, bool]:
        """Make this store a registry for `base` (a model file), stored as version 0 (signed with `key`, an
        Ed25519 private key, as `signer`); (info, False) when it already is one."""
        from taskvec.registry.card import render_card

        bh = read_kind(base, "model")
        check_contributor(signer)
        check_tensors(bh)
        spec = bh.meta["model"]
        file_sha = sha256_file(bh.path)
        created = now()
        v0 = Version(0, bh.meta["identity"], file_sha, version_path(0), None, created, signer, _sign(key, file_sha))
        info = RegistryInfo(
            base={"identity": bh.meta["identity"], "arch": spec["arch"], "task": spec["task"],
                  "tensors": {k: [t.dtype, list(t.shape)] for k, t in sorted(bh.tensors.items())},
                  "num_classes": spec["num_classes"], "labels": spec["labels"]},
            created=created, card=card or {}, versions=[v0],
        )
        self.store.create()
        existing: list[RegistryInfo] = []

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            text = r.read_text(REGISTRY_FILE)
            if text is not None:
                existing.append(RegistryInfo.from_json(text, self.address))
                return None
            return {version_path(0): bh.path, REGISTRY_FILE: info.to_json().encode(),
                    INDEX_FILE: dump_index([]).encode(), CARD_FILE: render_card(info, [], self.address).encode()}

        self.store.update(change, "taskvec: create registry")
        if existing:
            if existing[0].base["identity"] != info.base["identity"]:
                raise MismatchError(
                    f"{self.address}: is already a registry for base {existing[0].base['identity'][:12]}, "
                    f"not {info.base['identity'][:12]} ({base}); one registry holds one base"
                )
            return existing[0], False
        return info, True

    def trust(self, contributor: str, public_key: str) -> None:
        """Add a contributor's public key (OpenSSH line) to the allowlist; pushes must then be signed."""
        from taskvec.registry.card import render_card
        from taskvec.registry.signing import parse_public_key

        check_contributor(contributor)
        parse_public_key(public_key)

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            info = self.info(r)
            keys = info.trusted_keys.setdefault(contributor, [])
            if public_key in keys:
                return None
            keys.append(public_key)
            entries = load_index(r.read_text(INDEX_FILE), self.address)
            card = render_card(info, entries, self.address)
            return {REGISTRY_FILE: info.to_json().encode(), CARD_FILE: card.encode()}

        self.store.update(change, f"taskvec: trust a key of {contributor}")

    def push(self, vector: str | os.PathLike[str], key: Any = None) -> PushResult:
        """Validate, optionally sign (Ed25519 private key), and add a vector; a second push of it is a no-op.

        The vector is checked as a merge checks it (structure, content sha256, finite values, base), so one
        bad push cannot block later merges of the registry."""
        from taskvec.registry.card import render_card

        h = read_kind(vector, "vector")
        check_vector_meta(h)
        check_tensors(h)
        contributor = h.meta["contributor"]
        file_sha = sha256_file(h.path)
        signature = _sign(key, file_sha)
        info = self.info()
        version = version_of_vector(h, info, self.address)
        check_against_base(h, base_layout(info, self.address, version), f"registry {self.address}")
        check_push_policy(info, contributor, signature, file_sha, str(h.path))
        result: list[PushResult] = []

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            info = self.info(r)
            check_push_policy(info, contributor, signature, file_sha, str(h.path))
            entries = load_index(r.read_text(INDEX_FILE), self.address)
            for e in entries:
                if e.sha256 == h.meta["sha256"]:
                    result[:] = [PushResult(e, False)]
                    return None
            entry = Entry.from_header(h, file_sha, now(), signature)
            result[:] = [PushResult(entry, True)]
            files: dict[str, bytes | Path] = {entry.path: h.path}
            if signature is not None:
                files[signature_path(entry.path)] = (json.dumps(signature, indent=2) + "\n").encode()
            entries.append(entry)
            files[INDEX_FILE] = dump_index(entries).encode()
            files[CARD_FILE] = render_card(info, entries, self.address).encode()
            return files

        self.store.update(change, f"taskvec: add vector {h.meta['sha256'][:12]} from {contributor}")
        return result[0]

    def fetch(self, entry: Entry, dest: str | os.PathLike[str], policy: TrustPolicy) -> Path:
        """Copy a vector to `dest` (a new file) and verify that copy: the merger's trust `policy`, the file
        sha256 the index records, the content sha256 and contributor in its header. Read only `dest`."""
        what = f"{self.address}/{entry.path}"
        policy.check(entry.contributor, entry.signature, entry.file_sha256, what)
        return self._copy_verified(entry.path, entry.file_sha256, Path(dest), lambda p: verify_vector(p, entry, what))

    def _copy_verified(self, path: str, file_sha256: str, dest: Path, verify: Callable[[Path], None]) -> Path:
        """Copy `path` to the new file `dest`, check the copy's sha256 and `verify(dest)`; nothing is left on error."""
        actual = self.store.copy_to(path, dest, file_sha256)
        try:
            if actual != file_sha256:
                raise IntegrityError(
                    f"{self.address}/{path}: sha256 of the file is {actual[:12]}, the registry recorded "
                    f"{file_sha256[:12]}; the file is corrupted or was replaced", path=f"{self.address}/{path}",
                )
            verify(dest)
        except TaskvecError:
            dest.unlink(missing_ok=True)
            raise
        return dest

    def fetch_all(self, entries: Sequence[Entry], into: str | os.PathLike[str], policy: TrustPolicy,
                  track: Track[Entry] = no_track) -> list[Path]:
        """Verified private copies of `entries` in the folder `into` (every one is checked before any is used)."""
        if not entries:
            raise RegistryError(f"{self.address}: no vectors to fetch (the registry or the selection is empty)")
        for e in entries:  # every trust decision before any download
            policy.check(e.contributor, e.signature, e.file_sha256, f"{self.address}/{e.path}")
        return [self.fetch(e, Path(into) / f"{e.contributor}-{e.sha256}.safetensors", policy)
                for e in track(entries, "fetching", len(entries))]

    def pull(self, entries: Sequence[Entry], out: str | os.PathLike[str], policy: TrustPolicy, force: bool = False,
             track: Track[Entry] = no_track) -> list[tuple[Path, bool]]:
        """Copy verified vectors to `out/<contributor>-<sha256[:16]>.safetensors`; (path, copied) for each.

        `out` is created when missing. A file already there with the same bytes is kept (pulling again is a
        no-op); a differing one is replaced only with `force`."""
        dest_dir = Path(out)
        if dest_dir.exists() and not dest_dir.is_dir():
            raise FileFormatError(f"{dest_dir}: is not a directory", path=dest_dir, field="out")
        dest_dir.mkdir(parents=True, exist_ok=True)
        done = []
        for e in track(entries, "pulling", len(entries)):
            dest = dest_dir / f"{e.contributor}-{e.sha256[:16]}.safetensors"  # both checked by Entry.from_dict
            if dest.is_file() and not dest.is_symlink() and sha256_file(dest) == e.file_sha256:
                done.append((dest, False))
                continue
            with atomic_output(dest, force) as tmp:
                tmp.unlink()
                self.fetch(e, tmp, policy)
            done.append((dest, True))
        return done

    def publish_version(self, model: str | os.PathLike[str], key: Any = None,
                        signer: str = DEFAULT_SIGNER) -> tuple[Version, bool]:
        """Publish a merged model as the next version, optionally signed (Ed25519 private key) as `signer`;
        (version, added). Only a merge onto the newest version is accepted (`check_next_version`), with
        finite values that match its identity, and signed when the registry lists keys for `signer`. The
        file and the record land in one atomic change; publishing a published file again is a no-op, another
        file with a published version's identity is refused (a version's identity is unique)."""
        from taskvec.registry.card import render_card

        h = read_kind(model, "model")
        check_contributor(signer)
        check_tensors(h)
        file_sha = sha256_file(h.path)
        signature = _sign(key, file_sha)
        result: list[tuple[Version, bool]] = []

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            info = self.info(r)
            same = info.version_of(h.meta["identity"])
            if same is not None and same.sha256 == file_sha:
                result[:] = [(same, False)]
                return None
            if same is not None:
                raise RegistryError(
                    f"{h.path}: its identity is that of {same.label} of {self.address}, whose tensors it holds (a "
                    "merge at λ = 0, or of vectors that change nothing); nothing new to publish",
                    path=h.path, field="identity",
                )
            check_next_version(h, info, self.address)
            check_push_policy(info, signer, signature, file_sha, str(h.path))
            n = info.newest.version + 1
            path = version_path(n)
            v = Version(n, h.meta["identity"], file_sha, path, info.newest.identity, now(), signer, signature)
            info.versions.append(v)
            result[:] = [(v, True)]
            entries = load_index(r.read_text(INDEX_FILE), self.address)
            return {path: h.path, REGISTRY_FILE: info.to_json().encode(),
                    CARD_FILE: render_card(info, entries, self.address).encode()}

        self.store.update(change, f"taskvec: publish version {h.meta.get('version')} ({h.meta['identity'][:12]})")
        return result[0]

    def version(self, which: int | None = None, info: RegistryInfo | None = None) -> Version:
        """Published version `which` (None: the newest)."""
        info = info or self.info()
        if which is None:
            return info.newest
        if not 0 <= which < len(info.versions):
            raise RegistryError(f"{self.address}: no version {which}; it has {describe_versions(info.versions)}",
                                field="version")
        return info.versions[which]

    def pull_version(self, which: int | None, out: str | os.PathLike[str], policy: TrustPolicy,
                     force: bool = False) -> tuple[Path, Version, bool]:
        """Copy published version `which` (None: the newest) to the file `out`, verified: your trust `policy`
        for its signer, the file sha256 the registry recorded, and its header (identity, content, version,
        parent); (path, version, copied). A file already at `out` with the same bytes is kept."""
        info = self.info()
        v = self.version(which, info)
        if v.sha256 is None or v.path is None:
            raise RegistryError(
                f"{self.address}: this registry was made before it stored versions and holds no copy of its base "
                f"(v0 {v.identity[:12]}); get the base from the registry's maintainer", field="version",
            )
        what = f"{self.address}/{v.path}"
        policy.check(v.signer, v.signature, v.sha256, what)
        dest = Path(out)
        if dest.is_file() and not dest.is_symlink() and sha256_file(dest) == v.sha256:
            return dest, v, False
        with atomic_output(dest, force) as tmp:
            tmp.unlink()
            self._copy_verified(v.path, v.sha256, tmp, lambda p: verify_version(p, v, what))
        return dest, v, True

    def reindex(self) -> tuple[int, list[str]]:
        """Rebuild `index.json` (and the card) from the vector and signature files, whatever the index
        holds; return the number of vectors listed and the files left out (with why)."""
        import tempfile

        from taskvec.registry.card import render_card
        from taskvec.registry.signing import load_signature

        reader = self.store.reader()
        self.info(reader)
        try:  # only to keep push times; a corrupt index is what reindex repairs
            pushed = {e.sha256: e.pushed for e in load_index(reader.read_text(INDEX_FILE), self.address)}
        except RegistryError:
            pushed = {}
        entries, skipped = [], []
        files = self.store.list_files(VECTOR_DIR)
        with tempfile.TemporaryDirectory(prefix="taskvec-reindex-") as tmp:
            for path in sorted(p for p in files if p.endswith(".safetensors")):
                local = Path(tmp) / "vector.safetensors"
                try:
                    parts = path.split("/")
                    if len(parts) != 3 or not is_sha(parts[2].removesuffix(".safetensors")):
                        raise RegistryError(f"{self.address}/{path}: not a vectors/CONTRIBUTOR/SHA256.safetensors name")
                    check_contributor(parts[1])
                    file_sha = self.store.copy_to(path, local, None)
                    h = read_kind(local, "vector")
                    check_vector_meta(h)
                    if file_digest(h) != h.meta["sha256"] or path != vector_path(h.meta["contributor"],
                                                                               h.meta["sha256"]):
                        raise IntegrityError(f"{self.address}/{path}: content does not match its name")
                    sig_text = reader.read_text(signature_path(path))
                    sig = load_signature(sig_text, path) if sig_text is not None else None
                except TaskvecError as e:
                    skipped.append(e.message)
                    continue
                finally:
                    local.unlink(missing_ok=True)
                when = pushed.get(h.meta["sha256"], files[path])
                entries.append(Entry.from_header(h, file_sha, when, sig))
        entries.sort(key=lambda e: (e.pushed, e.sha256))

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            if r.read_text(INDEX_FILE) == dump_index(entries):
                return None
            card = render_card(self.info(r), entries, self.address)
            return {INDEX_FILE: dump_index(entries).encode(), CARD_FILE: card.encode()}

        self.store.update(change, "taskvec: rebuild index")
        return len(entries), skipped


def check_vector_meta(h: Header) -> None:
    """A registry also needs a contributor id that can name a folder (`read_kind` checked the other fields)."""
    check_contributor(h.meta["contributor"])


def _sign(key: Any, file_sha256: str) -> dict[str, str] | None:
    from taskvec.registry.signing import sign

    return sign(key, file_sha256) if key is not None else None


def check_tensors(h: Header) -> None:
    """The content identity (a vector's sha256, a model's identity) matches and every value is finite (one
    bounded read of the file, numpy only)."""
    from taskvec.io.files import scan

    def finite(name: str, t: TensorInfo, piece: bytes) -> None:
        if non_finite(piece, t.dtype):
            raise FileFormatError(f"{h.path}: tensor {name} holds NaN or Inf", path=h.path, field=name)

    field = "sha256" if h.kind == "vector" else "identity"
    if scan(h, finite) != h.meta[field]:
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
    if h.meta["contributor"] != entry.contributor:
        raise TrustError(
            f"{what}: the file says it is from {h.meta['contributor']!r}, the index says {entry.contributor!r}; "
            "the contributor in the file, the index and the signer must agree", path=what,
        )
    if h.meta["sha256"] != entry.sha256 or file_digest(h) != entry.sha256:
        raise IntegrityError(f"{what}: content does not match its sha256 {entry.sha256[:12]}; the file is corrupted",
                             path=what)


def verify_version(path: Path, v: Version, what: str) -> None:
    """A fetched copy must be the version the registry names: its identity (in the header and of its tensors),
    its version number and its parent."""
    h = read_kind(path, "model")
    meta = h.meta
    claims: list[tuple[str, Any, Any]] = [("identity", meta["identity"], v.identity)]
    if v.version:  # the base (v0) may be any model
        claims += [("version", meta.get("version", 0), v.version), ("parent", meta.get("parent"), v.parent)]
    for fld, got, want in claims:
        if got != want or isinstance(got, bool):
            raise IntegrityError(f"{what}: its {fld} is {str(got)[:12]!r}, the registry records {str(want)[:12]!r}",
                                 path=what, field=fld)
    if file_digest(h) != v.identity:
        raise IntegrityError(f"{what}: content does not match its identity {v.identity[:12]}; the file is corrupted",
                             path=what)
