"""Model cards (README.md with YAML metadata, via huggingface_hub's ModelCard) for registries and merged models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskvec.io.schema import ModelHeader
from taskvec.privacy.ledger import summarize_ledger

PIPELINE_TAGS = {"classification": "image-classification", "segmentation": "image-segmentation"}


def _card(body: str, task: str, tags: list[str], card: dict[str, Any], library: str | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        license=card.get("license", "other"),
        base_model=card.get("base_model"),
        library_name=library,
        pipeline_tag=PIPELINE_TAGS.get(task),
        tags=["taskvec", *tags],
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def render_card(info: Any, entries: Sequence[Any], address: str) -> str:
    """The card of a registry (`RegistryInfo` and its `Entry` list): base, policy and every contribution."""
    base = info.base
    rows = "\n".join(
        f"| {e.contributor} | `{e.sha256[:16]}` | {e.samples if e.samples is not None else '?'} | "
        f"{summarize_ledger(e.privacy)} | {'yes' if e.signature else 'no'} | {e.pushed} |"
        for e in entries
    )
    policy = (
        f"Only vectors signed by a trusted key are accepted ({sum(map(len, info.trusted_keys.values()))} keys)."
        if info.trusted_keys else "Signatures are optional."
    )
    body = (
        "# taskvec registry\n\n"
        "Data vectors (fine-tuned minus base weights) shared by sites that train one model together "
        "with [taskvec](https://github.com/taskvec/taskvec). Merge them with "
        f"`taskvec merge --registry {address} --out merged.safetensors` (onto the newest version) and publish "
        f"the result as the next version with `taskvec publish-version merged.safetensors --registry {address}`.\n\n"
        f"- base: `{base['identity']}` ({base['arch']}, {base['task']}, labels {', '.join(base['labels'])})\n"
        f"- versions (fine-tune from the newest: `taskvec pull-version latest --registry {address}`): "
        f"{', '.join(f'v{v.version} `{v.identity[:16]}`' for v in info.versions)}\n"
        f"- vectors: {len(entries)}\n- {policy}\n\n"
        "| contributor | sha256 | samples | privacy | signed | pushed |\n|---|---|---|---|---|---|\n"
        f"{rows}\n"
    )
    return _card(body, base["task"], ["data-vector"], info.card)


def render_model_card(m: ModelHeader, repo_id: str, card: dict[str, Any], version: str | None) -> str:
    """The card of a published merged model: how it was made and from which vectors."""
    vectors = m.merge.vectors if m.merge else ()
    rows = "\n".join(
        f"| {v.contributor} | `{v.sha256[:16]}` | {v.samples or '?'} | {summarize_ledger(v.privacy)} |"
        for v in vectors
    )
    method, scale = (m.merge.method, m.merge.scale) if m.merge else ("?", "?")
    library, loader = _loader(m.task, repo_id)
    body = (
        f"# {m.arch} merged with taskvec{f' ({version})' if version else ''}\n\n"
        f"A {m.task} model (labels {', '.join(m.labels or [])}) made by merging data vectors from "
        f"{len(vectors)} sites: `{method}`, λ = {scale}, on base "
        f"`{m.parent or '?'}`. Model identity `{m.identity}`.\n\n"
        f"```python\n{loader}\n```\n\n"
        "| contributor | vector sha256 | samples | privacy of the vector's own release |\n|---|---|---|---|\n"
        f"{rows}\n\n{_composed(m.merge.privacy_budget if m.merge else None)}"
    )
    return _card(body, m.task, ["merged"], card, library)


def _loader(task: str, repo_id: str) -> tuple[str, str]:
    """The library that loads a published model of `task` (as `publish_model` writes its config) and the
    Python lines that load it."""
    if task == "classification":
        return "timm", f"import timm\nmodel = timm.create_model('hf-hub:{repo_id}', pretrained=True)"
    return ("segmentation-models-pytorch",
            f"import segmentation_models_pytorch as smp\nmodel = smp.from_pretrained('{repo_id}')")


def _composed(spent: dict[str, Any] | None) -> str:
    """What the merge recorded of each contributor's releases composed (this version's vectors and those already
    in the base's lineage): the ε a contributor has spent on this model."""
    spent = spent or {}
    per = spent.get("composed_per")
    if not per or not spent.get("contributors"):
        return ("No contributor's releases were composed by this merge (its vectors name no single unit of "
                "privacy, or none): each row above is one release only, and a contributor's releases in earlier "
                "versions of this model add to it.\n")
    rows = "\n".join(
        f"| {who} | {c['epsilon']:.3g} | {c['delta']:.1e} | {c['vectors']} ({c['earlier']} in earlier versions) | "
        f"{c['composition']} |" for who, c in sorted(spent["contributors"].items()))
    return (f"Each contributor's releases composed per {per['unit']} ({per['relation']}), its vectors here and "
            "those already merged into earlier versions (the model is a function of all of them):\n\n"
            "| contributor | ε | δ | vectors | composition |\n|---|---|---|---|---|\n"
            f"{rows}\n")
