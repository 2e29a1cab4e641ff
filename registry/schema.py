"""The registry's files and records: layout, `registry.json` (`RegistryInfo`, `Version`), `index.json` (`Entry`).

Layout of a registry, the same in every store (a folder, a Hub repo)::

    registry.json                                   base identity (one registry = one base), trusted keys, versions
    index.json                                      one entry per vector; rebuildable from the files below
    README.md                                       model card listing the contributions
    versions/v<N>.safetensors                       the published versions: v0 the base, vN+1 a merge onto vN
    vectors/<contributor>/<sha256>.safetensors      the vector, named by its content identity
    vectors/<contributor>/<sha256>.sig              its Ed25519 signature (optional)

A vector may be fine-tuned from any published version; `registry.json` records each version's identity,
file sha256, parent and signature, so a site can fetch the newest one verified, and a merger can publish
the next one only on top of the newest. Every record read from a registry is checked field by field here:
names from a registry are data, never paths or markup.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from taskvec.errors import FileFormatError, TaskvecError
from taskvec.io.files import DTYPE_SIZES, Header
from taskvec.io.lineage import describe_versions as describe_identities
from taskvec.io.schema import check_contributor, is_count, is_sha

REGISTRY_FILE = "registry.json"
INDEX_FILE = "index.json"
CARD_FILE = "README.md"
VECTOR_DIR = "vectors"
VERSION_DIR = "versions"
REGISTRY_FORMAT = "taskvec-registry"
REGISTRY_VERSION = 2  # 2: `versions` (format 1 registries hold version 0 only and are read as such)
DEFAULT_SIGNER = "merger"


class RegistryError(TaskvecError):
    """A registry is missing, unreachable, refuses access, or was asked for something it cannot do."""


class IntegrityError(FileFormatError):
    """A fetched file does not match the sha256 the registry recorded for it."""


def parse_time(text: str) -> _dt.datetime:
    """An ISO date or date-time; naive values are UTC."""
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise TaskvecError(
            f"cannot read time {text!r}; give an ISO date such as 2025-03-01 or 2025-03-01T12:00"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


def _is_time(x: Any) -> bool:
    try:
        parse_time(x)
    except (TaskvecError, TypeError):
        return False
    return True


def _is_ledger(x: Any, where: str) -> bool:
    """A ledger `list` and the card can summarise (`validate_ledger`)."""
    from taskvec.privacy.entries import validate_ledger

    try:
        validate_ledger(x, where)
    except TaskvecError:
        return False
    return True


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
        v = h.vector
        entry = cls(
            sha256=v.sha256, contributor=v.contributor, path=vector_path(v.contributor, v.sha256),
            file_sha256=file_sha256, size=h.size, base=v.base.identity, samples=v.samples, dtype=v.dtype or "?",
            privacy=v.privacy, created=v.created or "?", pushed=pushed, signature=signature,
        )
        return cls.from_dict(entry.to_dict(), str(h.path))  # what the index will be read back as

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
                ("size", is_count(e.size)), ("base", isinstance(e.base, str)),
                ("samples", e.samples is None or is_count(e.samples)),
                ("dtype", isinstance(e.dtype, str)), ("privacy", _is_ledger(e.privacy, where)),
                ("created", isinstance(e.created, str)), ("pushed", _is_time(e.pushed)),
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
            if not is_count(version):
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
                    and all(is_count(n) for n in v[1]) for v in layout.values())):
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
            if not isinstance(info.card, dict):
                raise ValueError("card")
            if not isinstance(info.created, str):
                raise ValueError("created")
            return info
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise RegistryError(f"{where}/{REGISTRY_FILE}: unreadable ({e})") from None



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
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise RegistryError(
            f"{where}/{INDEX_FILE}: unreadable ({e}); rebuild it with `taskvec registry reindex`"
        ) from None
    try:
        entries = [Entry.from_dict(e, f"{where}/{INDEX_FILE}") for e in vectors]
        seen: set[str] = set()
        for entry in entries:
            if entry.sha256 in seen:
                raise RegistryError(f"{where}/{INDEX_FILE}: vector {entry.sha256[:12]} of {entry.contributor} is "
                                    "listed twice", path=f"{where}/{INDEX_FILE}")
            seen.add(entry.sha256)
        return entries
    except RegistryError as e:
        raise RegistryError(f"{e.message}; rebuild it with `taskvec registry reindex`", path=e.path,
                            field=e.field) from None
