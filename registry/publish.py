"""Publish a merged model as a timm- or smp-loadable Hub repo: `config.json` + `model.safetensors`.

Classification: `timm.create_model('hf-hub:ORG/REPO', pretrained=True)` loads it (timm's own config writer).
Segmentation: `segmentation_models_pytorch.from_pretrained('ORG/REPO')` loads it (smp's config: the model
class and its arguments). A DP-ready base with frozen BatchNorm statistics has the plain model's keys and
function, so it publishes too; a GroupNorm conversion does not. The weights file is the merged
model file itself, so its header keeps the provenance (base identity, merge method, every vector's
sha256). A merge version (from `merge --incremental`) becomes a Hub tag `vN` on the commit.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from taskvec.errors import TaskvecError
from taskvec.io.files import read_kind

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class PublishReport:
    repo_id: str
    commit: str | None
    tag: str | None
    url: str


def smp_config(model_path: str | os.PathLike[str], folder: Path) -> Path:
    """Write smp's `config.json` (model class and arguments) for the segmentation model in `model_path`."""
    from taskvec.io.files import write_json
    from taskvec.models.spec import ModelSpec, create_module

    spec = ModelSpec.from_dict(read_kind(model_path, "model").model.model)
    spec.dp_compatible = None
    net: Any = create_module(spec)
    write_json(folder / CONFIG_FILE, {**net.config, "encoder_weights": None, "_model_class": type(net).__name__})
    return folder / CONFIG_FILE


def timm_config(model_path: str | os.PathLike[str], folder: Path) -> Path:
    """Write timm's `config.json` (architecture, num_classes, model_args...) for the model in `model_path`
    into `folder` with timm's `save_for_hf`; the weights it writes beside it are not uploaded (the merged
    file is, header and all)."""
    from timm.models import save_for_hf

    from taskvec.models.spec import load_model

    spec = read_kind(model_path, "model").model.model
    size = (spec["in_chans"], spec["img_size"], spec["img_size"])
    save_for_hf(load_model(model_path), str(folder), model_config={"label_names": spec["labels"]},
                data_config={"input_size": size}, safe_serialization=True)
    return folder / CONFIG_FILE


def publish_model(
    model: str | os.PathLike[str], repo: str, *, tag: str | None = None, revision: str | None = None,
    endpoint: str | None = None, token: str | None = None, private: bool = True, card: dict[str, Any] | None = None,
) -> PublishReport:
    """Commit config.json, model.safetensors and a model card to `repo`; tag the commit (default `vN`)."""
    from taskvec.registry.card import render_model_card
    from taskvec.registry.stores.hub import open_hub

    store = open_hub(repo, revision=revision, endpoint=endpoint, token=token, private=private)
    repo_id = store.repo_id
    h = read_kind(model, "model")
    m = h.model
    if (m.model.get("dp_compatible") or {}).get("norm", "frozen-batchnorm") != "frozen-batchnorm":
        raise TaskvecError(
            f"{model}: its GroupNorm layers (DP-ready conversion) load with neither timm nor smp; "
            "share this model as a taskvec file instead", path=model
        )
    version = m.merge.extra.get("version") if m.merge else None
    tag = tag if tag is not None else (f"v{version}" if version is not None else None)
    with tempfile.TemporaryDirectory() as tmp:
        config = (timm_config if m.task == "classification" else smp_config)(h.path, Path(tmp))
        files: dict[str, bytes | Path] = {
            CONFIG_FILE: config, WEIGHTS_FILE: h.path,
            "README.md": render_model_card(m, repo_id, card or {}, tag).encode(),
        }
        store.create()
        label = f" {tag}" if tag else ""
        store.update(lambda _r: files, f"taskvec: publish merged model{label} ({m.identity[:12]})")
    if tag is not None:
        with store.errors():
            store.api.create_tag(repo_id, tag=tag, revision=store.last_commit or store.head())
    return PublishReport(repo_id, store.last_commit, tag, f"{store.api.endpoint}/{repo_id}")
