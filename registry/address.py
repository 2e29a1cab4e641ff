"""Open a registry from its address: a folder, a `file://` URL or `hf://ORG/REPO` (the only module that
knows every backend; backends import `taskvec.registry.base`, never the reverse)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from taskvec.registry.base import Registry, RegistryError

from taskvec.errors import ConfigError


def open_registry(
    address: str, *, revision: str | None = None, endpoint: str | None = None, token: str | None = None,
    private: bool = True, cache_dir: str | os.PathLike[str] | None = None,
) -> Registry:
    """A registry from its address: a folder (`./registry`, `file:///mnt/share/x`) or `hf://ORG/REPO`.

    `revision` (a Hub branch), `endpoint`, `token`, `private` (for a repo it creates) and `cache_dir`
    (downloads) apply to Hub registries only."""
    if address.startswith("hf://"):
        from taskvec.registry.hub import HubStore

        repo_id = address.removeprefix("hf://").strip("/")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise RegistryError(f"{address}: a Hub registry is hf://ORG/REPO (a model repo)")
        return Registry(HubStore(repo_id, revision, endpoint, token, private, cache_dir))
    if revision is not None:
        raise ConfigError("revision applies to hf:// registries only", field="revision", got=revision)
    if address.startswith("file://"):
        path = address.removeprefix("file://")
        if not path.startswith("/"):
            raise RegistryError(f"{address}: a file URL needs an absolute path (file:///mnt/share/registry)")
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", address):
        raise RegistryError(f"{address}: unknown registry scheme; use a folder path, file:///path or hf://ORG/REPO")
    else:
        path = address
    from taskvec.registry.local import FolderStore

    return Registry(FolderStore(Path(path).expanduser(), address))
