"""Ed25519 signatures of vector files (with `cryptography`).

A contributor signs the sha256 of the whole vector file (tensors and metadata), so a signature
vouches for exactly those bytes: it authenticates who sent a file, not what it says (a privacy ledger is
the site's own description of its mechanism). Private keys are PKCS#8 PEM files (mode 0600); public keys are
one OpenSSH line (`ssh-ed25519 AAAA...`), easy to paste into an allowlist.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from taskvec.errors import TaskvecError
from taskvec.io.files import atomic_output, check_output, make_folder, open_regular

ALGORITHM = "ed25519"
_CONTEXT = b"taskvec-vector-signature-v1:"


def public_line(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def generate_key(out: str | os.PathLike[str], force: bool = False) -> tuple[Path, Path, str]:
    """Write a new private key to `out` (0600) and its public key to `out.pub`; return the paths and the key."""
    priv_path = check_output(out, force)
    pub_path = check_output(Path(f"{out}.pub"), force)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if force and priv_path.exists():
        priv_path.unlink()
    make_folder(priv_path.parent)
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    line = public_line(key.public_key())
    with atomic_output(pub_path, force) as tmp:
        tmp.write_text(line + "\n")
    return priv_path, pub_path, line


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise TaskvecError(f"{path}: no such key file; create one with `taskvec keys generate --out {path}`") from None
    except (ValueError, TypeError) as e:
        raise TaskvecError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise TaskvecError(f"{path}: is not an Ed25519 key; create one with `taskvec keys generate`")
    return key


def parse_public_key(text: str) -> Ed25519PublicKey:
    """An OpenSSH `ssh-ed25519 ...` line, given as the text or as the path of a `.pub` file."""
    if not text.startswith("ssh-") and Path(text).is_file():
        with open_regular(text) as f:
            text = f.read(4096).decode("utf-8", "replace")
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, IndexError):
        raise TaskvecError(f"{text[:40]!r}: not an OpenSSH public key line (ssh-ed25519 AAAA...)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TaskvecError(f"{text[:40]!r}: is not an Ed25519 public key")
    return key


def normalise_key(text: str) -> str:
    """The one-line OpenSSH form of a public key given as text or as a `.pub` file (comments dropped)."""
    return public_line(parse_public_key(text))


def _message(file_sha256: str) -> bytes:
    return _CONTEXT + file_sha256.encode()


def sign(key: Ed25519PrivateKey, file_sha256: str) -> dict[str, str]:
    """The signature record stored beside a vector and in the index."""
    sig = key.sign(_message(file_sha256))
    return {
        "algorithm": ALGORITHM,
        "public_key": public_line(key.public_key()),
        "file_sha256": file_sha256,
        "signature": base64.b64encode(sig).decode(),
    }


def verify(record: dict[str, str], file_sha256: str) -> bool:
    """True when `record` is a valid Ed25519 signature of exactly this file."""
    if record.get("algorithm") != ALGORITHM or record.get("file_sha256") != file_sha256:
        return False
    try:
        key = parse_public_key(record["public_key"])
        key.verify(base64.b64decode(record["signature"], validate=True), _message(file_sha256))
    except (TaskvecError, InvalidSignature, KeyError, ValueError):
        return False
    return True


def load_signature(text: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(text)
        if not (isinstance(record, dict) and all(isinstance(v, str) for v in record.values())):
            raise ValueError("not an object of strings")
    except (ValueError, RecursionError) as e:
        raise TaskvecError(f"{where}: unreadable signature file ({e})") from None
    return record
