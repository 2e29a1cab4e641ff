"""Release records: every export of a model is recorded, under a file lock, in `privacy_releases.json` beside
the model file, keyed by its run, so that a run's exports compose (and an un-noised export after noised ones is
caught). A record is per folder: a copy of the model file elsewhere keeps its own, and a merge counts copies."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from taskvec.errors import PrivacyError

RELEASES_FILE = "privacy_releases.json"


def releases_path(model_file: str | os.PathLike[str]) -> Path:
    """Where exports of the models in a directory are recorded: `privacy_releases.json` beside them."""
    return Path(model_file).parent / RELEASES_FILE


@contextmanager
def locked_releases(record: Path) -> Iterator[None]:
    """Hold the release record's lock: read, decide and record one export without a concurrent one."""
    from filelock import FileLock

    with FileLock(str(record) + ".lock"):
        yield


def read_releases(record: Path, key: str) -> list[dict[str, Any]]:
    """Earlier exports of the run `key` recorded in `record` (a run's releases compose)."""
    if not record.exists():
        return []
    try:
        runs = json.loads(record.read_text())["runs"]
        found = runs.get(key, [])
        if not isinstance(found, list):
            raise TypeError(f"run {key[:12]} lists no releases")
        for i, release in enumerate(found):
            _check_release(release, i)
        return list(found)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise PrivacyError(f"{record}: unreadable release record ({e}); it is needed to compose exports",
                           path=record) from None


def _check_release(release: Any, i: int) -> None:
    """A TypeError unless `release` is what `record_release` writes: a noise multiplier that is a positive finite
    number with a clip that is one, or null (an export without noise) with a clip that is one or null."""

    def positive(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0

    if not isinstance(release, dict) or not all(k in release for k in ("noise_multiplier", "clip")):
        raise TypeError(f"release {i} is not an object with a noise_multiplier and a clip")
    z, clip = release["noise_multiplier"], release["clip"]
    if not (z is None or positive(z)) or not (clip is None or positive(clip)) or (z is not None and clip is None):
        raise TypeError(f"release {i}: noise_multiplier {z!r} and clip {clip!r} must be numbers > 0 (a null "
                        "noise_multiplier: an export without noise)")


def record_release(record: Path, key: str, release: dict[str, Any]) -> None:
    """Append one export of run `key` to the record (rewritten atomically; call under `locked_releases`)."""
    from taskvec.io.files import write_json

    runs = json.loads(record.read_text())["runs"] if record.exists() else {}
    runs.setdefault(key, []).append(release)
    write_json(record, {"format": "taskvec-releases", "version": 1, "runs": runs})
