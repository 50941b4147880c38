"""Training inputs of in-context reference conditioning (``model.adapter.reference_mode`` in_context / both).

The reference enters through the UNet's own self-attention (``models/in_context.py``), so a step needs
the reference's clean VAE latents: the posterior *mean* of the loader's reference pixels (the same
reference the CLIP encoder sees, brought back from its normalisation to the VAE's [-1, 1]), as the
pipeline encodes it. Only rows that keep their reference go through the reference pass; dropped rows
(``drop_reference``) attend to nothing extra, exactly as the text-only branches of the guidance do.

:func:`add_in_context_inputs` adds them to a step's :class:`~dreampainter.training.step.StepInputs`
(from the latent cache's ``reference_latents`` or by running the VAE); :func:`cache_fields` is what the
latent cache stores per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from dreampainter.data.loading.config import LoaderConfig
from dreampainter.training.step import StepInputs, drop_masks, encode_latent_distribution

REFERENCE_LATENTS_NAME = "reference_latents"


def uses_in_context(unet) -> bool:
    """Whether this (unwrapped) UNet's adapter takes the reference in context."""
    config = getattr(unet, "reference_adapter_config", None)
    return config is not None and config.in_context


def reference_vae_pixels(reference_pixel_values: torch.Tensor, loader_config: LoaderConfig) -> torch.Tensor:
    """The loader's CLIP-normalised reference pixels -> [-1, 1] for the VAE (padding becomes the mean colour)."""
    mean = torch.tensor(loader_config.reference_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(loader_config.reference_std, dtype=torch.float32).view(1, 3, 1, 1)
    unit = reference_pixel_values.float() * std.to(reference_pixel_values.device) + mean.to(
        reference_pixel_values.device
    )
    return unit.clamp(0, 1) * 2 - 1


def reference_side(adapter_config, pixel_values: torch.Tensor) -> int:
    """The reference's side in pixels before the VAE: ``in_context_size``, else the photo's shorter side (as the
    pipeline does; ``data.loader.reference_size`` is the CLIP encoder's, e.g. 224, which need not suit the UNet)."""
    return int(adapter_config.in_context_size or min(pixel_values.shape[-2:]))


@torch.no_grad()
def encode_reference_latents(
    vae, reference_pixel_values: torch.Tensor, loader_config: LoaderConfig, side: int | None = None
) -> torch.Tensor:
    """The references' scaled VAE posterior means (B, C, h, w), float32, resized to ``side`` pixels first."""
    pixels = reference_vae_pixels(reference_pixel_values, loader_config)
    if side is not None and tuple(pixels.shape[-2:]) != (side, side):
        pixels = F.interpolate(pixels, size=(side, side), mode="bicubic", antialias=True).clamp(-1, 1)
    mean, _ = encode_latent_distribution(vae, pixels)
    return mean.float()


def cache_fields(
    batch: Mapping[str, Any], parts, adapter_config, loader_config: LoaderConfig, device
) -> dict[str, torch.Tensor]:
    """What the latent cache stores for in-context training: ``{"reference_latents": (B, C, h, w)}``, or
    nothing when the run's adapter (``adapter_config``, None in stage 1) does not take the reference in context."""
    if adapter_config is None or not adapter_config.in_context:
        return {}
    pixels = batch["reference_pixel_values"].to(device)
    side = reference_side(adapter_config, batch["pixel_values"])
    return {REFERENCE_LATENTS_NAME: encode_reference_latents(parts.vae, pixels, loader_config, side)}


def in_context_rows(drop_reference: torch.Tensor) -> torch.Tensor:
    """For every row, its index among the rows that keep their reference, -1 where it is dropped."""
    keep = ~drop_reference.to(torch.bool)
    return torch.where(keep, keep.long().cumsum(0) - 1, torch.full_like(keep, -1, dtype=torch.long))


def add_in_context_inputs(
    inputs: StepInputs, batch: Mapping[str, Any], parts, loader_config: LoaderConfig, stage: int, device
) -> StepInputs:
    """``inputs`` plus the reference latents of the rows that keep their reference and each row's index
    among them (stage 2 with an in-context adapter; otherwise ``inputs`` unchanged)."""
    if stage != 2 or not uses_in_context(parts.unet):
        return inputs
    if REFERENCE_LATENTS_NAME in batch:  # data.cache
        latents = batch[REFERENCE_LATENTS_NAME].to(device).float()
    else:
        side = reference_side(parts.unet.reference_adapter_config, batch["pixel_values"])
        latents = encode_reference_latents(parts.vae, batch["reference_pixel_values"].to(device), loader_config, side)
    _, drop_reference = drop_masks(batch, stage)
    rows = in_context_rows(drop_reference).to(device)
    return dataclasses.replace(inputs, reference_latents=latents[rows.cpu() >= 0], reference_rows=rows)
