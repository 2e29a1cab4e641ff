"""`taskvec init`, `export` and `inspect`: the data-vector core (`merge` is in merge.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from taskvec.cli.console import console, print_json, warn


def init(
    arch: str = typer.Option(..., help="timm architecture, e.g. vit_small_patch16_224, convnext_tiny, test_vit."),
    task: str = typer.Option("classification", help="classification | segmentation"),
    num_classes: int = typer.Option(..., "--num-classes", help="Number of classes (segmentation: incl. background)."),
    out: Path = typer.Option(..., help="Model file to write (.safetensors)."),
    in_chans: int = typer.Option(3, "--in-chans", help="Input channels (1 for grayscale)."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input size in pixels (default: the model's)."),
    labels: str | None = typer.Option(None, help="Comma-separated class names, e.g. malignant,benign."),
    pretrained: bool = typer.Option(False, "--pretrained", help="Load timm's pretrained weights (needs a network)."),
    weights: Path | None = typer.Option(None, help="Load a local timm checkpoint (.safetensors) instead."),
    dp_compatible: bool = typer.Option(
        False, "--dp-compatible", help="Make it ready for finetune --dp (per-example norms, no in-place ops)."
    ),
    dp_norm: str | None = typer.Option(
        None, "--dp-norm", help="--dp-compatible: frozen-batchnorm (default with weights: keeps the pretrained "
                                "statistics) | groupnorm (default without)."
    ),
    decoder: str = typer.Option("unet", help="Segmentation decoder (segmentation-models-pytorch): unet | fpn."),
    random_head: bool = typer.Option(
        False, "--random-head", help="A random new classifier even with pretrained weights (default there: zero); "
                                     "needed for finetune --head frozen."),
    seed: int | None = typer.Option(None, help="Seed of what is initialised at random (head, decoder)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
) -> None:
    """Create the shared base model file every site starts from; prints its identity."""
    from taskvec.io.files import check_output
    from taskvec.models.spec import build_base, save_model

    check_output(out, force)
    names = [s.strip() for s in labels.split(",")] if labels else None
    module, spec = build_base(arch, task, num_classes, in_chans, img_size, names, pretrained, weights, dp_compatible,
                              dp_norm, decoder, seed=seed, zero_head=False if random_head else None)
    if spec.dp_compatible is not None:
        how = ("frozen statistics (per-channel affine)" if spec.dp_compatible["norm"] == "frozen-batchnorm"
               else "GroupNorm (affine weights kept)")
        console.print(f"DP-ready: BatchNorm → {how}, in-place ops made out-of-place")
    source = {"pretrained": pretrained, "weights": str(weights) if weights else None}
    identity = save_model(module, spec, out, extra={"source": source}, force=force)
    n = sum(p.numel() for p in module.parameters())
    console.print(f"wrote {out}: {spec.arch} {spec.task}, {n:,} parameters, labels {spec.labels}")
    console.print(f"base identity {identity}")


def export(
    finetuned: Path = typer.Argument(..., help="Fine-tuned model file, run directory, or any safetensors state_dict."),
    base: Path = typer.Option(..., help="The base model file the site started from."),
    out: Path = typer.Option(..., help="Vector file to write (.safetensors)."),
    clip: float | None = typer.Option(None, help="Clip the whole delta to this L2 norm (the DP sensitivity)."),
    noise_multiplier: float | None = typer.Option(
        None, "--noise-multiplier", help="Add N(0, (Z·clip)²) per coordinate: Gaussian mechanism, unit = site."
    ),
    epsilon: float | None = typer.Option(
        None, help="Solve the noise multiplier so the run's exports compose to this site-level ε (needs --delta)."
    ),
    delta: float | None = typer.Option(None, help="δ of the guarantee, e.g. 1e-5."),
    dtype: str = typer.Option("fp32", help="fp32 | bf16 (half size, ~2e-3 rel. error) | fp16 (underflows < 1e-5)."),
    contributor: str | None = typer.Option(None, help="Contributor id (site name) recorded in the vector."),
    samples: int | None = typer.Option(
        None, help="Declare the training sample count public and record it (used by --method weighted)."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite OUT; allow an un-noised export of a run exported with noise before."
    ),
) -> None:
    """Export a data vector: fine-tuned − base, optionally clipped and noised (export-time DP)."""
    from taskvec.merging.export import export_vector
    from taskvec.privacy.ledger import summarize_ledger

    r = export_vector(
        finetuned, base, out, clip=clip, noise_multiplier=noise_multiplier, epsilon=epsilon, delta=delta,
        dtype=dtype, contributor=contributor, samples=samples, force=force,
    )
    for w in r.warnings:
        warn(w)
    console.print(f"wrote {r.path}: {r.num_params:,} deltas, sha256 {r.sha256[:16]}")
    private = " (not stored in the noised file)" if r.expected_noise_norm else ""
    console.print(f"delta L2 norm {r.pre_clip_norm:.4g} before clipping, {r.post_clip_norm:.4g} after{private}")
    if r.expected_noise_norm:
        ratio = r.expected_noise_norm / max(r.post_clip_norm, 1e-30)
        console.print(f"expected noise norm Z·C·√d = {r.expected_noise_norm:.4g} ({ratio:.3g}× the signal)")
        if ratio > 10:
            warn("the noise is over 10× the delta: this vector will carry little signal")
    console.print(f"privacy: {summarize_ledger(r.privacy)}")


def inspect(
    file: Path = typer.Argument(..., help="A model, vector or plain safetensors file."),
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Show what a file is: kind, metadata, tensor/parameter counts, size, norm, integrity, DP ledger; exits 1
    when its tensors do not match the content hash it stores or hold NaN or Inf (as merge and push refuse it)."""
    from taskvec.errors import FileFormatError
    from taskvec.io.inspection import inspect_file

    info = inspect_file(file)
    if as_json:
        print_json(info.to_dict())
    else:
        _print_summary(info)
    if info.integrity is False:
        raise FileFormatError(f"{file}: its tensors do not match the content hash it stores (corrupted or altered)",
                              path=file)
    if not info.finite:
        raise FileFormatError(f"{file}: holds NaN or Inf values (merge and push refuse it)", path=file)


def _print_summary(info: Any) -> None:
    """The `FileInfo` of `taskvec inspect` as a table; malformed taskvec metadata is an error naming its field."""
    from rich.table import Table

    from taskvec.io.schema import ModelHeader, VectorSummary, parse_header
    from taskvec.privacy.ledger import summarize_ledger, validate_ledger

    def ledger(entries: list[Any], where: str) -> str:
        return summarize_ledger(validate_ledger(entries, where))

    typed = parse_header(info.metadata, info.kind, info.path) if info.kind in ("model", "vector") else None
    t = Table(show_header=False, box=None)
    t.add_column(no_wrap=True, style="bold")
    t.add_column(overflow="fold")
    rows: list[tuple[str, str]] = [
        ("kind", info.kind),
        ("size", f"{info.size_bytes / 1e6:.2f} MB"),
        ("tensors", str(info.tensors)),
        ("parameters", f"{info.parameters:,}"),
        ("L2 norm", f"{info.l2_norm:.6g}"),
        ("integrity", {True: "ok", False: "MISMATCH", None: "no stored hash"}[info.integrity]),
        ("values", "finite" if info.finite else "NaN or Inf"),
    ]

    def merged(v: VectorSummary) -> tuple[str, str]:
        stale = "" if v.base_version is None else (
            f"from v{v.base_version} (d={v.staleness}, s={_number(v.staleness_weight or 1)}) ")
        where = f"{info.path}: merged vector {v.sha256[:12]}"
        return f"  {v.contributor}", f"{v.sha256[:12]} {stale}{ledger(v.privacy, where)}"

    if isinstance(typed, ModelHeader):
        labels = typed.labels or []
        rows += [("identity", typed.identity),
                 ("model", f"{typed.arch} {typed.task} {typed.model.get('num_classes')} classes"),
                 ("labels", ", ".join(map(str, labels)))]
        if typed.parent is not None:
            rows.append(("parent base", typed.parent))
        rows.append(("version", str(typed.number)))
        rows += [(f"  v{e.version}", f"{e.identity}  " + (f"{len(e.vectors or ())} vectors" if e.version else "root"))
                 for e in typed.lineage or ()]
        if typed.merge is not None:
            mg = typed.merge
            stale = f", staleness a={_number(mg.extra['staleness'])}" if "staleness" in mg.extra else ""
            rows.append(("merge", f"{mg.method} of {len(mg.vectors)} vectors, λ={_number(mg.scale)}{stale}"))
            rows += [merged(v) for v in mg.vectors]
    elif typed is not None:
        b = typed.base
        rows += [("sha256", typed.sha256), ("base", f"{b.identity} ({b.arch}), version {b.number}"),
                 ("contributor", typed.contributor), ("samples", str(typed.samples)), ("dtype", str(typed.dtype))]
        if "pre_clip" in (typed.norm or {}):
            rows.append(("norm before clip", _number(typed.norm["pre_clip"])))  # type: ignore[index]
    if typed is not None:
        rows += [("created", typed.created or "?"), ("privacy", ledger(typed.ledger, info.path))]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


def _number(x: Any) -> str:
    """A header number as inspect prints it; anything else (a field of a newer file) as its text."""
    return f"{x:.6g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)[:40]


def register(app: typer.Typer) -> None:
    for fn in (init, export, inspect):
        app.command()(fn)
