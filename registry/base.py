"""One registry interface over two stores (a folder, a Hub repo): layout, index, push, fetch, selection.

Layout of a registry, the same in a folder and in a Hub repo::

    registry.json                                   base identity (one registry = one base), trusted keys
    index.json                                      one entry per vector; rebuildable from the files below
    README.md                                       model card listing the contributions
    vectors/<contributor>/<sha256>.safetensors      the vector, named by its content identity
    vectors/<contributor>/<sha256>.sig              its Ed25519 signature (optional)

A `Store` knows how to read a file, list files, give a local copy of a file, and apply one change
atomically (a lock and renames for a folder, a commit with `parent_commit` for the Hub). Everything
else (validation, trust, the index, the card) lives here, once.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from taskvec.errors import FileFormatError, MismatchError, TaskvecError
from taskvec.io.files import Header, atomic_output, file_digest, now, read_kind
from taskvec.io.layout import check_against_base
from taskvec.progress import Track, no_track

REGISTRY_FILE = "registry.json"
INDEX_FILE = "index.json"
CARD_FILE = "README.md"
VECTOR_DIR = "vectors"
REGISTRY_FORMAT = "taskvec-registry"
REGISTRY_VERSION = 1
_CONTRIBUTOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegistryError(TaskvecError):
    """A registry is missing, unreachable, refuses access, or was asked for something it cannot do."""


class TrustError(TaskvecError):
    """A vector is unsigned, wrongly signed, or signed by a key the registry does not trust."""


class IntegrityError(FileFormatError):
    """A fetched file does not match the sha256 the registry recorded for it."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_time(text: str) -> _dt.datetime:
    """An ISO date or date-time; naive values are UTC."""
    try:
        t = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise TaskvecError(
            f"cannot read time {text!r}; give an ISO date such as 2025-03-01 or 2025-03-01T12:00"
        ) from None
    return t if t.tzinfo else t.replace(tzinfo=_dt.timezone.utc)


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegistryInfo:
    """`registry.json`: the one base this registry holds vectors for, and the contributor keys it trusts."""

    base: dict[str, Any]
    created: str
    trusted_keys: dict[str, list[str]] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d = {"format": REGISTRY_FORMAT, "format_version": REGISTRY_VERSION, **asdict(self)}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> RegistryInfo:
        try:
            d = json.loads(text)
            if d.get("format") != REGISTRY_FORMAT:
                raise ValueError("not a taskvec registry")
            if d.get("format_version", 0) > REGISTRY_VERSION:
                raise RegistryError(f"{where}: registry format {d['format_version']} is newer; upgrade taskvec")
            return cls(d["base"], d["created"], d.get("trusted_keys", {}), d.get("card", {}))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
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
        return [Entry(**e) for e in json.loads(text)["vectors"]]
    except (ValueError, KeyError, TypeError) as e:
        raise RegistryError(
            f"{where}/{INDEX_FILE}: unreadable ({e}); rebuild it with `taskvec registry reindex`"
        ) from None


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
    def local_copy(self, path: str, file_sha256: str | None) -> Path:
        """A local file with the content of `path` (in place for a folder; for the Hub a download, cached
        and checked when `file_sha256` is given)."""

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

    def create(self, base: str | os.PathLike[str], card: dict[str, Any] | None = None) -> tuple[RegistryInfo, bool]:
        """Make this store a registry for `base` (a model file); (info, False) when it already is one."""
        from taskvec.registry.card import render_card

        bh = read_kind(base, "model")
        spec = bh.meta["model"]
        info = RegistryInfo(
            base={"identity": bh.meta["identity"], "arch": spec["arch"], "task": spec["task"],
                  "num_classes": spec["num_classes"], "labels": spec["labels"]},
            created=now(), card=card or {},
        )
        self.store.create()
        existing: list[RegistryInfo] = []

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            text = r.read_text(REGISTRY_FILE)
            if text is not None:
                existing.append(RegistryInfo.from_json(text, self.address))
                return None
            return {REGISTRY_FILE: info.to_json().encode(), INDEX_FILE: dump_index([]).encode(),
                    CARD_FILE: render_card(info, [], self.address).encode()}

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
        """Validate, optionally sign (Ed25519 private key), and add a vector; a second push of it is a no-op."""
        from taskvec.registry.card import render_card
        from taskvec.registry.signing import sign

        h = read_kind(vector, "vector")
        if file_digest(h) != h.meta["sha256"]:
            raise IntegrityError(f"{h.path}: content does not match its sha256; the file is corrupted")
        contributor = check_contributor(h.meta["contributor"])
        file_sha = sha256_file(h.path)
        signature = sign(key, file_sha) if key is not None else None
        info = self.info()
        check_against_base(h, info.base, f"registry {self.address}")
        check_trust(info, contributor, signature, file_sha, str(h.path))
        result: list[PushResult] = []

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            info = self.info(r)
            check_trust(info, contributor, signature, file_sha, str(h.path))
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

    def fetch(self, entry: Entry, info: RegistryInfo | None = None) -> Path:
        """A local copy of a vector, checked against the index (file sha256, content sha256) and the allowlist."""
        info = info or self.info()
        check_trust(info, entry.contributor, entry.signature, entry.file_sha256, f"{self.address}/{entry.path}")
        path = self.store.local_copy(entry.path, entry.file_sha256)
        verify_vector(path, entry, f"{self.address}/{entry.path}")
        return path

    def fetch_all(self, entries: Sequence[Entry], track: Track[Entry] = no_track) -> list[Path]:
        """Local, verified copies of `entries` (every one is checked before any is returned)."""
        if not entries:
            raise RegistryError(f"{self.address}: no vectors to fetch (the registry or the selection is empty)")
        info = self.info()
        return [self.fetch(e, info) for e in track(entries, "fetching", len(entries))]

    def pull(self, entries: Sequence[Entry], out: str | os.PathLike[str], force: bool = False,
             track: Track[Entry] = no_track) -> list[tuple[Path, bool]]:
        """Copy verified vectors to `out/<contributor>-<sha256[:16]>.safetensors`; (path, copied) for each.

        A file already there with the same bytes is kept (pulling again is a no-op)."""
        dest_dir = Path(out)
        if not dest_dir.is_dir():
            raise FileFormatError(f"{dest_dir}: no such directory for --out; create it first")
        info = self.info()
        done = []
        for e in track(entries, "pulling", len(entries)):
            dest = dest_dir / f"{e.contributor}-{e.sha256[:16]}.safetensors"
            if dest.is_file() and sha256_file(dest) == e.file_sha256:
                done.append((dest, False))
                continue
            src = self.fetch(e, info)
            with atomic_output(dest, force) as tmp:
                shutil.copyfile(src, tmp)
            done.append((dest, True))
        return done

    def reindex(self) -> int:
        """Rebuild `index.json` (and the card) from the vector and signature files; return the count."""
        from taskvec.registry.card import render_card
        from taskvec.registry.signing import load_signature

        reader = self.store.reader()
        self.info(reader)
        pushed = {e.sha256: e.pushed for e in load_index(reader.read_text(INDEX_FILE), self.address)}
        entries = []
        files = self.store.list_files(VECTOR_DIR)
        for path in sorted(p for p in files if p.endswith(".safetensors")):
            local = self.store.local_copy(path, None)
            h = read_kind(local, "vector")
            if file_digest(h) != h.meta["sha256"] or path != vector_path(h.meta["contributor"], h.meta["sha256"]):
                raise IntegrityError(f"{self.address}/{path}: content does not match its name; remove or re-push it")
            sig_text = reader.read_text(signature_path(path))
            sig = load_signature(sig_text, path) if sig_text is not None else None
            when = pushed.get(h.meta["sha256"], files[path])
            entries.append(Entry.from_header(h, sha256_file(local), when, sig))
        entries.sort(key=lambda e: (e.pushed, e.sha256))

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            if r.read_text(INDEX_FILE) == dump_index(entries):
                return None
            card = render_card(self.info(r), entries, self.address)
            return {INDEX_FILE: dump_index(entries).encode(), CARD_FILE: card.encode()}

        self.store.update(change, "taskvec: rebuild index")
        return len(entries)


def check_contributor(name: str) -> str:
    if not isinstance(name, str) or not _CONTRIBUTOR.match(name):
        raise RegistryError(
            f"contributor id {name!r} cannot name a registry folder; re-export with --contributor "
            "using letters, digits, '.', '_' or '-' (at most 64)"
        )
    return name


def check_trust(
    info: RegistryInfo, contributor: str, signature: dict[str, str] | None, file_sha: str, what: str
) -> None:
    """A signature must verify; with an allowlist, it must also be by one of the contributor's trusted keys."""
    from taskvec.registry.signing import verify

    if signature is not None and not verify(signature, file_sha):
        raise TrustError(f"{what}: its signature does not verify; the file or signature was altered")
    if not info.trusted_keys:
        return
    if signature is None:
        raise TrustError(
            f"{what}: is unsigned, and this registry only accepts vectors signed by a trusted key; "
            "push with --key SITE.key"
        )
    if signature["public_key"] not in info.trusted_keys.get(contributor, []):
        raise TrustError(
            f"{what}: is signed by a key the registry does not trust for {contributor!r}; "
            f"ask its maintainer to run `taskvec registry trust --contributor {contributor} --key KEY.pub`"
        )


def verify_vector(path: Path, entry: Entry, what: str) -> None:
    """The file must be the one the index recorded: same bytes, same content identity."""
    actual = sha256_file(path)
    if actual != entry.file_sha256:
        raise IntegrityError(
            f"{what}: sha256 of the file is {actual[:12]}, the registry recorded {entry.file_sha256[:12]}; "
            "the file is corrupted"
        )
    h = read_kind(path, "vector")
    if h.meta["sha256"] != entry.sha256 or file_digest(h) != entry.sha256:
        raise IntegrityError(f"{what}: content does not match its sha256 {entry.sha256[:12]}; the file is corrupted")

