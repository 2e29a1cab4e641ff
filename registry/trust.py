"""What the merger trusts: its own keyring, never the registry's list.

A registry is written by every site, so nothing in it can decide what a merger accepts: anyone who can
write `registry.json` could empty its allowlist. The merger brings its own trust: a keyring file (one
`CONTRIBUTOR ssh-ed25519 AAAA... [comment]` per line, like OpenSSH's allowed_signers), `--trust
CONTRIBUTOR=KEY.pub` options, or an explicit `allow_unsigned`. A vector is accepted when

- its signature, if any, verifies against the file's sha256 recorded in the index (and the merger then
  checks the bytes it reads against that sha256);
- a contributor the keyring knows signed it with one of its keys, and the file, the index and the key
  name the same contributor (a key of site1 cannot vouch for a vector that says site0);
- or, only with `allow_unsigned`, its contributor is not in the keyring (the vector's origin is then
  unverified: it is as trustworthy as every site that can write the registry).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from taskvec.errors import ConfigError, TaskvecError
from taskvec.io.files import open_regular
from taskvec.io.schema import check_contributor

KEYRING_ENV = "TASKVEC_KEYRING"
MAX_KEYRING_BYTES = 1 << 20


class TrustError(TaskvecError):
    """A vector is unsigned, wrongly signed, or signed by a key the merger does not trust for its contributor."""


def default_keyring() -> Path:
    """`$TASKVEC_KEYRING`, else `~/.config/taskvec/keyring`."""
    return Path(os.environ.get(KEYRING_ENV) or Path.home() / ".config" / "taskvec" / "keyring")


@dataclass(frozen=True)
class TrustPolicy:
    """The keys a merger trusts, per contributor, and whether it accepts vectors of unverified origin."""

    keys: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allow_unsigned: bool = False

    @classmethod
    def load(cls, keyring: str | os.PathLike[str] | None = None, trust: Iterable[str] = (),
             allow_unsigned: bool = False) -> TrustPolicy:
        """The keyring file (default: `default_keyring()` when it exists) plus `CONTRIBUTOR=KEY` items."""
        from taskvec.registry.signing import normalise_key

        keys: dict[str, set[str]] = {}
        path = Path(keyring) if keyring is not None else default_keyring()
        if keyring is not None or path.is_file():
            for contributor, key in read_keyring(path):
                keys.setdefault(contributor, set()).add(key)
        for item in trust:
            contributor, sep, key = item.partition("=")
            if not sep:
                raise ConfigError(f"trust takes CONTRIBUTOR=KEY.pub, got {item!r}", field="trust", got=item)
            keys.setdefault(check_contributor(contributor), set()).add(normalise_key(key))
        return cls({c: frozenset(k) for c, k in keys.items()}, allow_unsigned)

    def contributors_of(self, key: str) -> list[str]:
        return sorted(c for c, ks in self.keys.items() if key in ks)

    def check(self, contributor: str, signature: dict[str, str] | None, file_sha256: str, what: str) -> None:
        """Accept or refuse (TrustError) a vector of `contributor` with this signature record."""
        from taskvec.registry.signing import verify

        if signature is not None and not verify(signature, file_sha256):
            raise TrustError(f"{what}: its signature does not verify; the file or signature was altered", path=what)
        signer = self.contributors_of(signature["public_key"]) if signature is not None else []
        if signer and contributor not in signer:
            raise TrustError(
                f"{what}: says it is from {contributor!r} but is signed by the key of {', '.join(signer)}; "
                "the contributor in the file, the index and the signer must agree", path=what,
            )
        if signer:
            return
        if contributor in self.keys:
            state = "unsigned" if signature is None else "signed by a key you do not trust for it"
            raise TrustError(
                f"{what}: is {state}, but your keyring holds keys of {contributor!r}; refused", path=what,
            )
        if not self.allow_unsigned:
            raise TrustError(
                f"{what}: no key you trust vouches for {contributor!r}; add its public key with "
                f"`trust` {contributor}=KEY.pub or to your keyring ({default_keyring()}), or pass "
                "`allow_unsigned` to accept vectors whose origin is not verified", path=what,
            )


def read_keyring(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(contributor, public key line) pairs of a keyring file; `#` starts a comment."""
    from taskvec.registry.signing import normalise_key

    with open_regular(path) as f:
        raw = f.read(MAX_KEYRING_BYTES + 1)
    if len(raw) > MAX_KEYRING_BYTES:
        raise TaskvecError(f"{path}: keyring is over {MAX_KEYRING_BYTES} B", path=path)
    pairs = []
    for n, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        parts = line.split("#", 1)[0].split()
        if not parts:
            continue
        if len(parts) < 3:
            raise TaskvecError(f"{path}:{n}: expected `CONTRIBUTOR ssh-ed25519 AAAA...`", path=path)
        pairs.append((check_contributor(parts[0]), normalise_key(" ".join(parts[1:3]))))
    return pairs


def add_to_keyring(path: str | os.PathLike[str], contributor: str, key: str) -> bool:
    """Append `contributor key` to a keyring file (created with its folder); False when already there."""
    from taskvec.io.files import atomic_output
    from taskvec.registry.signing import normalise_key

    contributor, line = check_contributor(contributor), normalise_key(key)
    p = Path(path)
    old = read_keyring(p) if p.exists() else []
    if (contributor, line) in old:
        return False
    p.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{c} {k}\n" for c, k in [*old, (contributor, line)])
    with atomic_output(p, force=True) as tmp:
        tmp.write_text(text)
    return True

