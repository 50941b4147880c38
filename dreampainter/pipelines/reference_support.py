"""The pipeline's view of the reference adapter inside a UNet: installed or not, its inputs, its scale."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def adapter_installed(unet) -> bool:
    """True when ``unet`` carries the reference adapter (it then needs ``added_cond_kwargs["image_embeds"]``)."""
    return getattr(unet, "reference_adapter_config", None) is not None


def features_for_adapter(unet, encoder_output) -> torch.Tensor:
    """What the installed projection consumes: the global embedding (B, D) or the patch tokens (B, T, C)."""
    from dreampainter.models import get_adapter_config, reference_features

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
    from dreampainter.models import set_reference_scale

    set_reference_scale(unet, scale)


@contextlib.contextmanager
def scale_for_call(unet, scale: float | dict | None) -> Iterator[None]:
    """Use ``scale`` for the duration of one pipeline call, then restore each layer's previous scale."""
    if scale is None or not adapter_installed(unet):
        yield
        return
    from dreampainter.models import reference_processors

    previous = {name: processor.scale for name, processor in reference_processors(unet).items()}
    set_scale(unet, scale)
    try:
        yield
    finally:
        for name, processor in reference_processors(unet).items():
            processor.scale = previous[name]
