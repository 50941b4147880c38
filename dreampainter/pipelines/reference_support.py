"""The pipeline's view of the reference adapter inside a UNet: its inputs and its scale.

Whether a UNet carries the adapter is :func:`dreampainter.models.has_reference_adapter`; which way the
reference enters (``reference_mode``: decoupled CLIP tokens, in-context VAE latents, or both) is in its
:class:`~dreampainter.models.AdapterConfig`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import PIL.Image
import torch

from dreampainter.models import (
    get_adapter_config,
    has_reference_adapter,
    prepare_reference,
    reference_features,
    reference_layers,
    set_reference_scale,
)
from dreampainter.models.in_context import in_context_layers, in_context_reference


def uses_decoupled(unet) -> bool:
    """Whether the UNet takes CLIP reference features (reference_mode ``decoupled`` or ``both``)."""
    return has_reference_adapter(unet) and get_adapter_config(unet).decoupled


def uses_in_context(unet) -> bool:
    """Whether the UNet takes the reference's VAE latents in its self-attention (``in_context`` or ``both``)."""
    return has_reference_adapter(unet) and get_adapter_config(unet).in_context


def in_context_side(unet, height: int, width: int, vae_scale_factor: int) -> int:
    """The reference's square side in pixels: the configured ``in_context_size``, else the target's shorter
    side, rounded down to what the UNet's down-sampling needs (at least one multiple)."""
    configured = get_adapter_config(unet).in_context_size
    multiple = vae_scale_factor * 2 ** (len(unet.config.down_block_types) - 1)
    side = configured or min(height, width)
    return max(multiple, side // multiple * multiple)


@torch.no_grad()
def encode_reference_latents(vae, references: list[PIL.Image.Image], side: int, device, dtype) -> torch.Tensor:
    """References -> the VAE's posterior means (scaled), each padded to a ``side`` square without distortion
    (as the training loader's ``pad`` reference mode does), in [-1, 1] before the VAE."""
    pixels = torch.stack([
        prepare_reference(
            torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1),
            side, "pad", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        )
        for image in references
    ])  # fmt: skip
    encoded = vae.encode(pixels.to(device=device, dtype=vae.dtype))
    latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(dtype)


@contextlib.contextmanager
def in_context_for_call(unet, reference_latents: torch.Tensor | None, dtype) -> Iterator[None]:
    """Run the reference pass once for a pipeline call (``None``: nothing to do), then let the loop's UNet
    calls append it (the rows each call attends with are set per step by ``set_rows``)."""
    if reference_latents is None:
        yield
        return
    kwargs = {}
    if uses_decoupled(unet):  # both: the reference pass has no CLIP reference
        kwargs["added_cond_kwargs"] = {
            "image_embeds": zero_features(unet, reference_latents.shape[0], reference_latents.device, dtype)
        }
    with in_context_reference(unet, reference_latents, None, dtype, **kwargs):
        yield


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
    previous_in_context = {name: attn.in_context_scale for name, attn in in_context_layers(unet).items()}
    set_scale(unet, scale)
    try:
        yield
    finally:
        for name, attn in reference_layers(unet).items():
            attn.reference_scale = previous[name]
        for name, attn in in_context_layers(unet).items():
            attn.in_context_scale = previous_in_context[name]
