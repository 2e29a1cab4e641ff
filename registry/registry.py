"""`Registry`: one registry of data vectors for one base over any `Store`: create, push, list, fetch,
pull, publish and pull versions, reindex. Each change is computed from one consistent state of the store and
applied atomically; every file fetched is verified (`taskvec.registry.verify`) before it is used."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskvec.errors import FileFormatError, MismatchError, TaskvecError
from taskvec.io.files import atomic_output, file_digest, now, read_kind
from taskvec.io.layout import check_against_base
from taskvec.io.schema import check_contributor, is_sha
from taskvec.progress import Track, no_track
from taskvec.registry.schema import (
    CARD_FILE,
    DEFAULT_SIGNER,
    INDEX_FILE,
    REGISTRY_FILE,
    VECTOR_DIR,
    Entry,
    IntegrityError,
    RegistryError,
    RegistryInfo,
    Version,
    describe_versions,
    dump_index,
    load_index,
    parse_time,
    signature_path,
    vector_path,
    version_path,
)
from taskvec.registry.store import Reader, Store
from taskvec.registry.trust import TrustError, TrustPolicy
from taskvec.registry.verify import (
    base_layout,
    check_next_version,
    check_push_policy,
    check_tensors,
    check_vector_meta,
    sha256_file,
    verify_vector,
    verify_version,
    version_of_vector,
)


@dataclass
class PushResult:
    """`added`: the vector is new to the registry; `signed`: it was there unsigned and now carries this push's
    signature."""

    entry: Entry
    added: bool
    signed: bool = False


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
        return self._index(reader)

    def _index(self, reader: Reader) -> list[Entry]:
        """The entries of `index.json`; one unreadable (too large, not UTF-8, not an index) names the repair."""
        try:
            text = reader.read_text(INDEX_FILE)
        except RegistryError as e:
            raise RegistryError(f"{e.message}; rebuild it with `taskvec registry reindex`", path=e.path) from None
        return load_index(text, self.address)

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
        spec = bh.model.model
        file_sha = sha256_file(bh.path)
        created = now()
        v0 = Version(0, bh.model.identity, file_sha, version_path(0), None, created, signer, _sign(key, file_sha))
        info = RegistryInfo(
            base={"identity": bh.model.identity, "arch": spec["arch"], "task": spec["task"],
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
            if clash := [p for p in (INDEX_FILE, CARD_FILE) if r.read_text(p) is not None]:
                raise RegistryError(f"{self.address}: holds {', '.join(clash)} but no {REGISTRY_FILE}: not a "
                                    f"registry (or one that lost its {REGISTRY_FILE}); nothing was written: create "
                                    "the registry in a new folder or repository", path=self.address)
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
            entries = self._index(r)
            card = render_card(info, entries, self.address)
            return {REGISTRY_FILE: info.to_json().encode(), CARD_FILE: card.encode()}

        self.store.update(change, f"taskvec: trust a key of {contributor}")

    def push(self, vector: str | os.PathLike[str], key: Any = None) -> PushResult:
        """Validate, optionally sign (Ed25519 private key), and add a vector; a second push of it is a no-op,
        except that a signed push of a vector stored unsigned adds the signature (`sign_entry`).

        The vector is checked as a merge checks it (structure, content sha256, finite values, base), so one
        bad push cannot block later merges of the registry."""
        from taskvec.registry.card import render_card

        h = read_kind(vector, "vector")
        check_vector_meta(h)
        check_tensors(h)
        contributor = h.vector.contributor
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
            entries = self._index(r)
            for e in entries:
                if e.sha256 == h.vector.sha256:
                    if signature is None or e.signature == signature:
                        result[:] = [PushResult(e, False)]
                        return None
                    sign_entry(e, signature, file_sha, f"{h.path}: already in {self.address}")
                    result[:] = [PushResult(e, False, signed=True)]
                    return {signature_path(e.path): (json.dumps(signature, indent=2) + "\n").encode(),
                            INDEX_FILE: dump_index(entries).encode(),
                            CARD_FILE: render_card(info, entries, self.address).encode()}
            entry = Entry.from_header(h, file_sha, now(), signature)
            result[:] = [PushResult(entry, True)]
            files: dict[str, bytes | Path] = {entry.path: h.path}
            if signature is not None:
                files[signature_path(entry.path)] = (json.dumps(signature, indent=2) + "\n").encode()
            entries.append(entry)
            files[INDEX_FILE] = dump_index(entries).encode()
            files[CARD_FILE] = render_card(info, entries, self.address).encode()
            return files

        self.store.update(change, f"taskvec: add vector {h.vector.sha256[:12]} from {contributor}")
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
        created = dest_dir.absolute()  # the topmost folder this pull creates (None: `out` exists)
        while not created.parent.exists():
            created = created.parent
        new = None if dest_dir.exists() else created
        dest_dir.mkdir(parents=True, exist_ok=True)
        done = []
        try:
            for e in track(entries, "pulling", len(entries)):
                dest = dest_dir / f"{e.contributor}-{e.sha256[:16]}.safetensors"  # both checked by Entry.from_dict
                if dest.is_file() and not dest.is_symlink() and sha256_file(dest) == e.file_sha256:
                    done.append((dest, False))
                    continue
                with atomic_output(dest, force) as tmp:
                    tmp.unlink()
                    self.fetch(e, tmp, policy)
                done.append((dest, True))
        except BaseException:
            if new is not None and not done:  # a pull refused before its first file leaves no empty folder
                shutil.rmtree(new, ignore_errors=True)
            raise
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
            same = info.version_of(h.model.identity)
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
            v = Version(n, h.model.identity, file_sha, path, info.newest.identity, now(), signer, signature)
            info.versions.append(v)
            result[:] = [(v, True)]
            entries = self._index(r)
            return {path: h.path, REGISTRY_FILE: info.to_json().encode(),
                    CARD_FILE: render_card(info, entries, self.address).encode()}

        self.store.update(change, f"taskvec: publish version {h.model.number} ({h.model.identity[:12]})")
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
            pushed = {e.sha256: e.pushed for e in self._index(reader)}
        except RegistryError:
            pushed = {}
        entries, skipped = [], self.store.left_out(VECTOR_DIR)
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
                    if file_digest(h) != h.vector.sha256 or path != vector_path(h.vector.contributor,
                                                                               h.vector.sha256):
                        raise IntegrityError(f"{self.address}/{path}: content does not match its name")
                    sig_text = reader.read_text(signature_path(path))
                    sig = load_signature(sig_text, path) if sig_text is not None else None
                except TaskvecError as e:  # named as the registry's file, not the temporary copy read
                    skipped.append(e.message.replace(str(local), f"{self.address}/{path}"))
                    continue
                finally:
                    local.unlink(missing_ok=True)
                when = pushed.get(h.vector.sha256, files[path])
                entries.append(Entry.from_header(h, file_sha, when, sig))
        entries.sort(key=lambda e: (e.pushed, e.sha256))

        def change(r: Reader) -> dict[str, bytes | Path] | None:
            try:
                if r.read_text(INDEX_FILE) == dump_index(entries):
                    return None
            except RegistryError:  # an index too large or not text: rewritten
                pass
            card = render_card(self.info(r), entries, self.address)
            return {INDEX_FILE: dump_index(entries).encode(), CARD_FILE: card.encode()}

        self.store.update(change, "taskvec: rebuild index")
        return len(entries), skipped


def sign_entry(entry: Entry, signature: dict[str, str], file_sha256: str, what: str) -> None:
    """Attach `signature` (verified against `file_sha256`, the pushed file's sha256) to an entry stored unsigned.

    A signature vouches for a file's exact bytes, so the pushed file must be the stored one. An entry keeps one
    signature: a merger checks that one against its own keyring (`taskvec.registry.trust`), so letting a later
    push replace it would let any site with write access swap a trusted signature for one the merger refuses."""
    if entry.file_sha256 != file_sha256:
        raise IntegrityError(
            f"{what} as another file with the same tensors (file sha256 {entry.file_sha256[:12]}, not "
            f"{file_sha256[:12]}: other metadata, e.g. exported again); a signature vouches for the stored bytes, so "
            f"sign that file: pull it (`taskvec pull --registry REGISTRY --only-contributor {entry.contributor} "
            "--allow-unsigned --out DIR`) and push it signed (`taskvec push FILE --registry REGISTRY --key KEY`)",
            path=what,
        )
    if entry.signature is not None:
        raise TrustError(
            f"{what}, signed by another key ({entry.signature.get('public_key', '?')[:40]}...); a vector keeps the "
            "one signature a merger checks against its keyring, so it is not replaced; nothing changed", path=what,
        )
    entry.signature = signature


def _sign(key: Any, file_sha256: str) -> dict[str, str] | None:
    from taskvec.registry.signing import sign

    return sign(key, file_sha256) if key is not None else None
