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
from taskvec.io.tensors_np import non_finite
from taskvec.progress import Track, no_track

REGISTRY_FILE = "registry.json"
INDEX_FILE = "index.json"
CARD_FILE = "README.md"
VECTOR_DIR = "vectors"
REGISTRY_FORMAT = "taskvec-registry"
REGISTRY_VERSION = 1
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_TEXT_BYTES = 64 * 1024 * 1024  # registry.json, index.json, signatures


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


def _is_sha(x: Any) -> bool:
    return isinstance(x, str) and _SHA256.fullmatch(x) is not None


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
                ("sha256", _is_sha(e.sha256)), ("file_sha256", _is_sha(e.file_sha256)),
                ("path", e.path == vector_path(e.contributor, e.sha256) if _is_sha(e.sha256) else False),
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


@dataclass
class RegistryInfo:
    """`registry.json`: the one base this registry holds vectors for, and the keys it asks pushers to sign
    with (a hint for pushers: a merger trusts its own keyring, see `taskvec.registry.trust`)."""

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
            if not isinstance(d, dict) or d.get("format") != REGISTRY_FORMAT:
                raise ValueError("not a taskvec registry")
            version = d.get("format_version", 0)
            if not _is_count(version):
                raise ValueError(f"format_version {version!r}")
            if version > REGISTRY_VERSION:
                raise RegistryError(f"{where}: registry format {version} is newer; upgrade taskvec")
            info = cls(d["base"], d["created"], d.get("trusted_keys", {}), d.get("card", {}))
            b = info.base
            if not (isinstance(b, dict) and isinstance(b.get("identity"), str) and isinstance(b.get("arch"), str)
                    and isinstance(b.get("task"), str) and isinstance(b.get("labels"), list)
                    and all(isinstance(x, str) for x in b["labels"])):
                raise ValueError("base")
            layout = b.get("tensors", {})
            if not (isinstance(layout, dict) and all(
                    isinstance(v, list) and len(v) == 2 and v[0] in DTYPE_SIZES and isinstance(v[1], list)
                    and all(_is_count(n) for n in v[1]) for v in layout.values())):
                raise ValueError("base tensors")
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


def base_layout(info: RegistryInfo, address: str) -> Header | dict[str, Any]:
    """What a pushed vector is checked against: the base's tensor layout when the registry records it (so
    a vector push accepts is one merge can use), else the base record alone (registries made before)."""
    if "tensors" not in info.base:
        return info.base
    tensors = {k: TensorInfo(d, tuple(shape), 0, 0) for k, (d, shape) in info.base["tensors"].items()}
    return Header(Path(address), tensors, 0, {"identity": info.base["identity"], "model": info.base})


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

    def create(self, base: str | os.PathLike[str], card: dict[str, Any] | None = None) -> tuple[RegistryInfo, bool]:
        """Make this store a registry for `base` (a model file); (info, False) when it already is one."""
        from taskvec.registry.card import render_card

        bh = read_kind(base, "model")
        spec = bh.meta["model"]
        info = RegistryInfo(
            base={"identity": bh.meta["identity"], "arch": spec["arch"], "task": spec["task"],
                  "tensors": {k: [t.dtype, list(t.shape)] for k, t in sorted(bh.tensors.items())},
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
        """Validate, optionally sign (Ed25519 private key), and add a vector; a second push of it is a no-op.

        The vector is checked as a merge checks it (structure, content sha256, finite values, base), so one
        bad push cannot block later merges of the registry."""
        from taskvec.registry.card import render_card
        from taskvec.registry.signing import sign

        h = read_kind(vector, "vector")
        check_vector_meta(h)
        check_tensors(h)
        contributor = h.meta["contributor"]
        file_sha = sha256_file(h.path)
        signature = sign(key, file_sha) if key is not None else None
        info = self.info()
        check_against_base(h, base_layout(info, self.address), f"registry {self.address}")
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
        out = Path(dest)
        actual = self.store.copy_to(entry.path, out, entry.file_sha256)
        try:
            if actual != entry.file_sha256:
                raise IntegrityError(
                    f"{what}: sha256 of the file is {actual[:12]}, the registry recorded {entry.file_sha256[:12]}; "
                    "the file is corrupted or was replaced", path=what,
                )
            verify_vector(out, entry, what)
        except TaskvecError:
            out.unlink(missing_ok=True)
            raise
        return out

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
                    if len(parts) != 3 or not _is_sha(parts[2].removesuffix(".safetensors")):
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


def check_tensors(h: Header) -> None:
    """The content sha256 matches and every value is finite (one bounded read of the file, numpy only)."""
    from taskvec.io.files import scan

    def finite(name: str, t: TensorInfo, piece: bytes) -> None:
        if non_finite(piece, t.dtype):
            raise FileFormatError(f"{h.path}: tensor {name} holds NaN or Inf", path=h.path, field=name)

    if scan(h, finite) != h.meta["sha256"]:
        raise IntegrityError(f"{h.path}: content does not match its sha256; the file is corrupted", path=h.path)


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
