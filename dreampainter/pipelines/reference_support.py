"""The pipeline's view of the reference adapter inside a UNet: its inputs and its scale.

Whether a UNet carries the adapter is :func:`dreampainter.models.has_reference_adapter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dreampainter.models import (
    get_adapter_config,
    has_reference_adapter,
    reference_features,
    reference_layers,
    set_reference_scale,
)


def features_for_adapter(unet, encoder_output) -> torch.Tensor:
    """What the installed projection consumes: the global embedding (B, D) or the patch tokens (B, T, C)."""
    return reference_features(encoder_output, get_adapter_config(unet))


def zero_features(unet, rows: int, device, dtype, like: torch.Tensor | None = None) -> torch.Tensor:
    """Projection inputs meaning "no reference" (all zeros): the text-only output for those rows."""
    if like is not None:
        return torch.zeros_like(like)
    config = unet.reference_adapter_config
    shape = (
        (rows, config.image_embed_dim)
        if config.feature_type == "global"
        else (rows, 1, config.image_embed_dim)
    )
    return torch.zeros(shape, device=device, dtype=dtype)


def set_scale(unet, scale: float | dict) -> None:
    """The attention-level reference weight, global or per block (like diffusers' ``set_ip_adapter_scale``)."""
    set_reference_scale(unet, scale)


@contextlib.contextmanager
def scale_for_call(unet, scale: float | dict | None) -> Iterator[None]:
    """Use ``scale`` for the duration of one pipeline call, then restore each layer's previous scale."""
    if scale is None or not has_reference_adapter(unet):
        yield
        return
    previous = {name: attn.reference_scale for name, attn in reference_layers(unet).items()}
    set_scale(unet, scale)
    try:
        yield
    finally:
        for name, attn in reference_layers(unet).items():
            attn.reference_scale = previous[name]
