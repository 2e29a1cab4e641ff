"""`taskvec push`, `list`, `pull`, `publish-version`, `pull-version`, `publish`, `registry init|trust|reindex` and
`keys generate|trust`: vector and version exchange.

`push` and `list` never import torch or timm.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from taskvec.cli.console import console, print_json, track, usage
from taskvec.registry.address import describe_addresses

if TYPE_CHECKING:
    from taskvec.registry import MergeInputs, Registry, TrustPolicy

REGISTRY_HELP = f"Registry: {describe_addresses()}."  # one phrase per backend under registry/stores/
REVISION_HELP = "Hub branch of the registry (default main)."
KEYRING_HELP = ("Your keyring: lines `CONTRIBUTOR ssh-ed25519 AAAA...` (default $TASKVEC_KEYRING or "
                "~/.config/taskvec/keyring); the registry's own list of keys is never trusted.")
TRUST_HELP = "CONTRIBUTOR=KEY.pub: trust this public key for this contributor (repeatable)."
ONLY_HELP = "Only this contributor's vectors (repeatable)."
UNSIGNED_HELP = "Also accept vectors of contributors no key of yours vouches for (their origin is unverified)."
SIGNER_HELP = "The name your keyring entries know the signer by (as `keys trust --contributor NAME`)."


def trust_policy(keyring: Path | None, trust: list[str] | None, allow_unsigned: bool) -> TrustPolicy:
    """The merger's own trust, from its keyring and options (see `taskvec.registry.trust`)."""
    from taskvec.registry.trust import TrustPolicy

    return TrustPolicy.load(keyring, trust or [], allow_unsigned)


def scratch_dir() -> Path:
    """A private folder (0700) for verified copies of registry files, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="taskvec-fetch-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def _open(address: str, revision: str | None, private: bool = True) -> Registry:
    from taskvec.registry import open_registry

    return open_registry(address, revision=revision, private=private)


def push(
    vectors: list[Path] = typer.Argument(..., help="Vector files to publish."),
    registry: str = typer.Option(..., "--registry", "-r", help=REGISTRY_HELP),
    key: Path | None = typer.Option(None, help="Sign with this Ed25519 private key (from `taskvec keys generate`)."),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
) -> None:
    """Publish vectors to a registry (checked against its base; a second push of the same vector is a no-op,
    except that pushing a vector stored unsigned with --key adds its signature)."""
    from taskvec.registry.signing import load_private_key

    reg = _open(registry, revision)
    private_key = load_private_key(key) if key is not None else None
    for v in vectors:
        r = reg.push(v, private_key)
        e = r.entry
        what = "pushed" if r.added else "signed (was unsigned)" if r.signed else "already in the registry:"
        signed = ", signed" if e.signature else ""
        console.print(f"{what} {v} → {reg.address} ({e.contributor}, sha256 {e.sha256[:16]}{signed})")


def list_vectors(
    registry: str = typer.Option(..., "--registry", "-r", help=REGISTRY_HELP),
    only_contributor: list[str] | None = typer.Option(None, "--only-contributor", help=ONLY_HELP),
    since: str | None = typer.Option(None, help="Only vectors pushed at or after this ISO date/time."),
    as_json: bool = typer.Option(False, "--json", help="Print the entries as JSON."),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
) -> None:
    """List a registry's vectors: contributor, samples, DP ledger, sha256, signature, time."""
    from dataclasses import asdict

    from taskvec.privacy.ledger import summarize_ledger

    reg = _open(registry, revision)
    info = reg.info()
    entries = reg.select(only_contributor, since)

    def base_version(identity: str) -> int | None:
        v = info.version_of(identity)
        return None if v is None else v.version

    if as_json:
        base = {k: v for k, v in info.base.items() if k != "tensors"}  # the layout is for push's checks
        print_json({"registry": reg.address, "base": base, "trusted_keys": info.trusted_keys,
                    "versions": [asdict(v) for v in info.versions],
                    "vectors": [e.to_dict() | {"privacy_summary": summarize_ledger(e.privacy),
                                               "base_version": base_version(e.base)} for e in entries]})
        return
    from rich.table import Table

    console.print(f"{reg.address}: base {info.base['identity'][:16]} ({info.base['arch']}, {info.base['task']}), "
                  f"{len(entries)} vectors{', signed only' if info.trusted_keys else ''}")
    signed = {v.version: f"signed by {v.signer}" if v.signature else "unsigned" for v in info.versions}
    console.print("versions: " + ", ".join(f"{v.label} ({signed[v.version]})" for v in info.versions))
    t = Table("contributor", "sha256", "base", "samples", "privacy", "signed", "pushed", "created")
    for c in t.columns[:2]:  # a narrow terminal cuts the other columns, never the contributor or the hash
        c.no_wrap, c.min_width = True, len(str(c.header))
    for e in entries:
        n = base_version(e.base)
        t.add_row(e.contributor, e.sha256[:16], "?" if n is None else f"v{n}",
                  str(e.samples if e.samples is not None else "?"),
                  summarize_ledger(e.privacy), "yes" if e.signature else "no", e.pushed, e.created)
    console.print(t)


def pull(
    registry: str = typer.Option(..., "--registry", "-r", help=REGISTRY_HELP),
    out: Path = typer.Option(Path("."), help="Directory to copy the vectors into."),
    only_contributor: list[str] | None = typer.Option(None, "--only-contributor", help=ONLY_HELP),
    since: str | None = typer.Option(None, help="Only vectors pushed at or after this ISO date/time."),
    force: bool = typer.Option(False, "--force", help="Overwrite differing files in OUT."),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
    keyring: Path | None = typer.Option(None, help=KEYRING_HELP),
    trust: list[str] | None = typer.Option(None, "--trust", help=TRUST_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help=UNSIGNED_HELP),
) -> None:
    """Copy vectors out of a registry, each checked (sha256, your keys) before it lands in OUT (created if missing)."""
    policy = trust_policy(keyring, trust, allow_unsigned)
    reg = _open(registry, revision)
    done = reg.pull(reg.select(only_contributor, since), out, policy, force=force, track=track)
    for path, copied in done:
        console.print(f"{'pulled' if copied else 'up to date'} {path}")
    console.print(f"{sum(c for _, c in done)} new, {sum(not c for _, c in done)} already there")


def publish_version(
    model: Path = typer.Argument(..., help="A merge onto the newest version (`taskvec merge --registry R`)."),
    registry: str = typer.Option(..., "--registry", "-r", help=REGISTRY_HELP),
    key: Path | None = typer.Option(None, help="Sign with this Ed25519 private key (from `taskvec keys generate`)."),
    signer: str = typer.Option("merger", help=SIGNER_HELP),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
) -> None:
    """Publish a merge onto the registry's newest version N as version N+1, for sites to fine-tune from."""
    from taskvec.registry.signing import load_private_key

    reg = _open(registry, revision)
    v, added = reg.publish_version(model, load_private_key(key) if key is not None else None, signer)
    what = "published" if added else "already published:"
    signed = f", signed by {v.signer}" if v.signature else ", unsigned"
    console.print(f"{what} {model} → {reg.address} as v{v.version} (identity {v.identity[:16]}{signed})")


def _which_version(text: str) -> int | None:
    if text == "latest":
        return None
    if not (text.isascii() and text.isdigit()):
        usage(f"VERSION is a number N (0, 1, ...) or latest, got {text!r}")
    return int(text)


def pull_version(
    version: str = typer.Argument("latest", help="Version number N, or latest."),
    registry: str = typer.Option(..., "--registry", "-r", help=REGISTRY_HELP),
    out: Path = typer.Option(..., help="Model file to write (fine-tune from it: `taskvec finetune --base OUT`)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it differs."),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
    keyring: Path | None = typer.Option(None, help=KEYRING_HELP),
    trust: list[str] | None = typer.Option(None, "--trust", help=TRUST_HELP),
    allow_unsigned: bool = typer.Option(False, "--allow-unsigned", help="Also accept a version no key of yours "
                                                                        "vouches for (its origin is unverified)."),
) -> None:
    """Copy a published version (default the newest) to OUT, checked (sha256, identity, your keys) first."""
    policy = trust_policy(keyring, trust, allow_unsigned)
    reg = _open(registry, revision)
    path, v, copied = reg.pull_version(_which_version(version), out, policy, force=force)
    console.print(f"{'pulled' if copied else 'up to date'} {path}: {reg.address} v{v.version} "
                  f"(identity {v.identity[:16]}, {f'signed by {v.signer}' if v.signature else 'unsigned'})")


def publish(
    model: Path = typer.Argument(..., help="A merged (or any classification) taskvec model file."),
    repo: str = typer.Option(..., help="Hub model repo to publish to, hf://ORG/REPO (created if missing)."),
    tag: str | None = typer.Option(None, help="Tag the commit (default vN for a version from merge --incremental)."),
    public: bool = typer.Option(False, "--public", help="Create the repo public (default private)."),
    license: str = typer.Option("other", help="License in the model card, e.g. apache-2.0, cc-by-nc-4.0, other."),
    base_model: str | None = typer.Option(None, "--base-model", help="Hub id of the base, for the card."),
    revision: str | None = typer.Option(None, help="Hub branch (default main)."),
) -> None:
    """Publish a model as a timm-loadable Hub repo: timm.create_model('hf-hub:ORG/REPO', pretrained=True)."""
    from taskvec.registry.publish import publish_model

    r = publish_model(model, repo, tag=tag, revision=revision, private=not public,
                      card={"license": license, "base_model": base_model})
    console.print(f"published {model} → {r.url} (commit {(r.commit or '?')[:12]}{f', tag {r.tag}' if r.tag else ''})")
    console.print(f"load it with timm.create_model('hf-hub:{r.repo_id}', pretrained=True)")


registry_app = typer.Typer(help="Create and administer a registry (one base, optional signed-only policy).",
                           no_args_is_help=True)


@registry_app.command("init")
def registry_init(
    address: str = typer.Argument(..., help=REGISTRY_HELP),
    base: Path = typer.Option(..., help="The base model file every vector in this registry is exported against."),
    trust: list[str] | None = typer.Option(
        None, help="CONTRIBUTOR=KEY.pub: accept only vectors signed by these keys (repeatable)."
    ),
    license: str = typer.Option("other", help="License in the Hub card, e.g. apache-2.0, other."),
    base_model: str | None = typer.Option(None, "--base-model", help="Hub id of the base model, for the card."),
    public: bool = typer.Option(False, "--public", help="Create a Hub repo public (default private)."),
    key: Path | None = typer.Option(None, help="Sign the base (version 0) with this Ed25519 private key."),
    signer: str = typer.Option("merger", help=SIGNER_HELP),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
) -> None:
    """Make a folder or Hub repo a registry for one base (stored as version 0, for sites to fine-tune from)."""
    from taskvec.registry.signing import load_private_key, normalise_key

    reg = _open(address, revision, private=not public)
    pairs = []
    for item in trust or []:
        contributor, sep, public_key = item.partition("=")
        if not sep:
            usage(f"--trust takes CONTRIBUTOR=KEY.pub, got {item!r}")
        pairs.append((contributor, normalise_key(public_key)))
    info, created = reg.create(base, card={"license": license, "base_model": base_model},
                               key=load_private_key(key) if key is not None else None, signer=signer)
    for contributor, public_key in pairs:
        reg.trust(contributor, public_key)
    state = "created" if created else "already a registry for this base:"
    console.print(f"{state} {reg.address} (base {info.base['identity'][:16]}, {info.base['arch']})")
    if pairs:
        console.print(f"keys listed for {', '.join(c for c, _ in pairs)}: pushes must be signed by them "
                      "(mergers trust their own keyring: `taskvec keys trust`)")


@registry_app.command("trust")
def registry_trust(
    address: str = typer.Argument(..., help=REGISTRY_HELP),
    contributor: str = typer.Option(..., help="Contributor id the key signs for."),
    key: str = typer.Option(..., help="Public key: a .pub file or an 'ssh-ed25519 AAAA...' line."),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
) -> None:
    """Ask pushers to sign: the registry refuses pushes not signed by a listed key (mergers trust their own keyring)."""
    from taskvec.registry.signing import normalise_key

    reg = _open(address, revision)
    reg.trust(contributor, normalise_key(key))
    console.print(f"{reg.address}: lists this key for {contributor}; pushes must now be signed "
                  "(mergers trust their own keyring: `taskvec keys trust`)")


@registry_app.command("reindex")
def registry_reindex(
    address: str = typer.Argument(..., help=REGISTRY_HELP),
    revision: str | None = typer.Option(None, help=REVISION_HELP),
) -> None:
    """Rebuild the index (and card) from the vector and signature files."""
    from taskvec.cli.console import warn

    reg = _open(address, revision)
    count, skipped = reg.reindex()
    for reason in skipped:
        warn(f"left out {reason}")
    console.print(f"{reg.address}: index lists {count} vectors")


keys_app = typer.Typer(help="Ed25519 keys for signing vectors.", no_args_is_help=True)


@keys_app.command("generate")
def keys_generate(
    out: Path = typer.Option(..., help="Private key file to write (mode 0600); the public key goes to OUT.pub."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing key files."),
) -> None:
    """Create a signing key pair; give OUT.pub to the registry maintainer, keep OUT private."""
    from taskvec.registry.signing import generate_key

    priv, pub, line = generate_key(out, force)
    console.print(f"wrote {priv} (private, keep it safe) and {pub}:")
    console.print(line, soft_wrap=True)


@keys_app.command("trust")
def keys_trust(
    contributor: str = typer.Option(..., help="Contributor id the key signs for."),
    key: str = typer.Option(..., help="Public key: a .pub file or an 'ssh-ed25519 AAAA...' line."),
    keyring: Path | None = typer.Option(None, help="Keyring file (default $TASKVEC_KEYRING or "
                                                   "~/.config/taskvec/keyring)."),
) -> None:
    """Trust a contributor's public key in YOUR keyring: merge and pull accept its signed vectors."""
    from taskvec.registry.trust import add_to_keyring, default_keyring

    path = keyring or default_keyring()
    added = add_to_keyring(path, contributor, key)
    console.print(f"{path}: {'now trusts' if added else 'already trusts'} this key for {contributor}")


def register(app: typer.Typer) -> None:
    app.command()(push)
    app.command("list")(list_vectors)
    app.command()(pull)
    app.command("publish-version")(publish_version)
    app.command("pull-version")(pull_version)
    app.command()(publish)
    app.add_typer(registry_app, name="registry")
    app.add_typer(keys_app, name="keys")


def merge_inputs(
    vectors: list[Path] | None, registry: str | None, base: Path | None, only_contributor: list[str] | None,
    since: str | None, incremental: bool, state: Path | None, out: Path | None, policy: TrustPolicy,
) -> tuple[list[Path], Path]:
    """The vector files and base `taskvec merge` works on (`taskvec.registry.merge_inputs` decides what a
    registry gives: `policy` is the merger's `TrustPolicy`); exits when the registry's newest version is up to date."""
    if not vectors and registry is None:
        usage("give the vectors to merge, e.g. `taskvec merge a.safetensors b.safetensors --base base.safetensors "
              "--out merged.safetensors` (or --registry R for a registry's)")
    if incremental != (state is not None):
        usage("--incremental and --state DIR go together (the state keeps the running merge)")
    if out is None and not incremental:
        usage("give --out FILE for the merged model")
    if registry is None and (only_contributor or since):
        usage("--only-contributor and --since select vectors of a --registry")
    if registry is None and base is None:
        usage("give --base BASE (or --registry R to merge onto its newest version)")
    paths = list(vectors or [])
    if registry is not None:
        from taskvec.registry import merge_inputs as registry_inputs

        reg = _open(registry, None)
        got = registry_inputs(reg, policy=policy, into=scratch_dir(), base=base, vectors=paths,
                              contributors=only_contributor, since=since, track=track)
        _report_inputs(reg.address, got)
        paths, base = got.vectors, got.base
    if not paths:
        usage(f"no vectors to merge: {registry} holds none that the selection takes")
    assert base is not None
    return paths, base


def _report_inputs(address: str, got: MergeInputs) -> None:
    """What `merge_inputs` took from the registry at `address`: the version merged onto, what it left out."""
    from taskvec.cli.console import warn

    v = got.version
    if v is not None:
        console.print(f"merging onto {address} v{v.version} ({v.identity[:16]}, "
                      f"{f'signed by {v.signer}' if v.signature else 'unsigned'})")
    for w in got.warnings:
        warn(w)
    if got.already_merged:
        versions = ", ".join(sorted({f"v{n}" for _, n in got.already_merged}))
        console.print(f"{len(got.already_merged)} vectors already merged (into {versions}) are left out")
    if got.up_to_date:
        console.print(f"up to date: every selected vector of {address} is already in {got.base.name}")
        raise typer.Exit(0)
