"""Typed headers for tests that check logic on headers alone (no tensors): budgets, layouts, lineage."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from taskvec.io.files import Header, TensorInfo
from taskvec.io.schema import BaseRef, ModelHeader, VectorHeader

BASE_ID = "b" * 64


def vector_header(path: str = "v.safetensors", *, contributor: str = "h", privacy: list[dict[str, Any]] | None = None,
                  run: str | None = None, sha256: str | None = None, base: str = BASE_ID,
                  tensors: dict[str, TensorInfo] | None = None, **fields: Any) -> Header:
    """A vector's `Header` whose typed metadata holds these fields (its sha256 by default one of its name's)."""
    typed = VectorHeader(sha256=sha256 or hashlib.sha256(path.encode()).hexdigest(), base=BaseRef(base),
                         contributor=contributor, privacy=privacy or [], source={"run_id": run}, **fields)
    return Header(Path(path), tensors or {}, 0, typed.to_json(), typed=typed)


def model_header(path: str = "m.safetensors", *, identity: str = BASE_ID, model: dict[str, Any],
                 tensors: dict[str, TensorInfo] | None = None, **fields: Any) -> Header:
    """A model's `Header` whose typed metadata holds these fields."""
    typed = ModelHeader(identity=identity, model=model, **fields)
    return Header(Path(path), tensors or {}, 0, typed.to_json(), typed=typed)
