"""What a merge takes from a registry: which vectors, onto which version (`merge_inputs`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taskvec.io.files import read_kind
from taskvec.progress import Track, no_track
from taskvec.registry.registry import Registry
from taskvec.registry.schema import Entry, Version
from taskvec.registry.trust import TrustPolicy


@dataclass(frozen=True)
class MergeInputs:
    """The files a merge works on: `vectors` (the caller's files, then verified private copies of the selected
    registry vectors) and `base`, the model to merge onto; `version` is the registry version `base` is (None
    when the caller gave the base); `already_merged` the selected entries left out because `base` holds them,
    each with the version it went into; `warnings` what to tell the user."""

    vectors: list[Path]
    base: Path
    version: Version | None
    already_merged: list[tuple[Entry, int]]
    warnings: list[str]

    @property
    def up_to_date(self) -> bool:
        """Merging onto the registry's newest version, which already holds every selected vector."""
        return self.version is not None and not self.vectors


def merge_inputs(
    registry: Registry, *, policy: TrustPolicy, into: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None, vectors: Sequence[str | os.PathLike[str]] = (),
    contributors: Sequence[str] | None = None, since: str | None = None, track: Track[Entry] = no_track,
) -> MergeInputs:
    """The vectors and base a merge of `registry` works on, every registry file verified under the merger's trust
    `policy` and copied into the folder `into` (created 0700 if missing; the merge reads only those copies).

    The registry's vectors are selected by `contributors` and pushed at or after `since` (ISO date or time). With
    `base`, every selected vector is taken; without, the base is the registry's newest version and only the
    selected vectors not yet in it (its own merge or its lineage) are taken. `vectors` are files of the caller's,
    taken as they are. A `RegistryError` for an unknown contributor, a `TrustError` for a vector or version the
    `policy` refuses, an `IntegrityError` for a file that is not what the registry recorded."""
    entries = registry.select(contributors, since)
    Path(into).mkdir(mode=0o700, parents=True, exist_ok=True)
    version, already_merged, warnings = None, [], []
    if base is None:
        version = registry.version()
        base, _, _ = registry.pull_version(version.version, Path(into) / f"v{version.version}.safetensors", policy)
        if version.signature is None and version.version:
            warnings.append(
                f"v{version.version} is unsigned (it names {version.signer!r}): anyone who can write the registry "
                "could have published it; sign versions when publishing them (`key`) and keep the merger's key in "
                "your keyring"
            )
        done = read_kind(base, "model").model.merged_vectors()
        already_merged = [(e, done[e.sha256]) for e in entries if e.sha256 in done]
        entries = [e for e in entries if e.sha256 not in done]
    paths = [Path(v) for v in vectors]
    if entries:
        paths += registry.fetch_all(entries, into, policy, track=track)
    return MergeInputs(paths, Path(base), version, already_merged, warnings)
