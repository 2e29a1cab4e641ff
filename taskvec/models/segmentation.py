"""Segmentation models from segmentation-models-pytorch (smp): a U-Net or FPN decoder over a timm encoder
through smp's `tu-` universal encoders.

The model spec records the decoder (`{"library": "smp", "arch": "unet", "kwargs": {...}}`) so `load_model`
rebuilds the same module. State-dict keys are smp's: `encoder.model.*` (timm's `features_only` keys),
`decoder.*`, `segmentation_head.*`. The U-Net decoder normalises with affine InstanceNorm by default: it
treats examples independently, so the same architecture trains with and without DP-SGD, and it has no
running statistics to merge. Files from taskvec's former hand-written FPN decoder are refused with a message
saying how to rebuild them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from taskvec.errors import ConfigError, FileFormatError

DECODERS = ("unet", "fpn")
DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "unet": {"decoder_channels": [128, 64, 32, 16, 16], "decoder_use_norm": {"type": "instancenorm", "affine": True}},
    "fpn": {},
}


def decoder_spec(arch: str) -> dict[str, Any]:
    """What a model spec records of a decoder (`arch` is `unet` or `fpn`)."""
    if arch not in DECODERS:
        raise ConfigError(f"decoder must be one of {', '.join(DECODERS)}, got {arch!r}", field="decoder", got=arch)
    return {"library": "smp", "arch": arch, "kwargs": dict(DEFAULT_KWARGS[arch])}


def build_segmentation(
    encoder: str, decoder: dict[str, Any] | None, num_classes: int, in_chans: int, *, pretrained: bool = False,
    weights: str | None = None, encoder_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """An smp model over the timm encoder `encoder`; `weights` is a local timm checkpoint for the encoder."""
    import segmentation_models_pytorch as smp

    if not decoder or decoder.get("library") != "smp":
        raise FileFormatError(
            "this segmentation model was made with taskvec's former hand-written FPN decoder, which this version "
            "no longer builds, and its decoder weights have no counterpart in smp's: re-create the base with "
            "`taskvec init --task segmentation --decoder unet ...` (the same `weights` keep the pretrained "
            "encoder) and fine-tune from it again"
        )
    kwargs = dict(encoder_kwargs or {})
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    cls = {"unet": smp.Unet, "fpn": smp.FPN}[decoder["arch"]]
    return cls(  # type: ignore[no-any-return]
        encoder_name=f"tu-{encoder}", encoder_weights=True if (pretrained or weights) else None,
        in_channels=in_chans, classes=num_classes, **decoder.get("kwargs", {}), **kwargs,
    )
