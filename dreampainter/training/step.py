"""The diffusion training objective, shared by the pixel path and the latent-cache path.

Both paths reduce a batch to :class:`StepInputs` (latent *distributions*, the latent-size mask, text
embeddings, reference features) and then draw every random number from one generator in one order,
so a cached step computes exactly the loss the uncached step computes on the same batch.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from dreampainter.models.adapter import drop_references
from dreampainter.models.backbones import TextConditions
from dreampainter.models.in_context import in_context_reference


@dataclass
class StepInputs:
    """One batch reduced to what the UNet step needs (all on the compute device)."""

    latent_mean: torch.Tensor  # (B, C, h, w) VAE posterior of the photo, already scaled
    latent_std: torch.Tensor
    masked_mean: torch.Tensor  # ... of the masked photo
    masked_std: torch.Tensor
    mask: torch.Tensor  # (B, 1, h, w), 1 = repaint
    text_embeds: torch.Tensor  # (B, L, D), the empty prompt's where text is dropped
    reference_features: torch.Tensor | None  # zero rows where the reference is dropped; None in stage 1
    _: KW_ONLY  # the optional parts below are given by name
    pooled_text_embeds: torch.Tensor | None = None  # (B, P) SDXL's pooled text embedding
    time_ids: torch.Tensor | None = None  # (B, 6) SDXL's micro-conditioning
    # In-context reference modes (training/in_context.py): clean reference latents of the rows that keep
    # their reference, and each row's index among them (-1: dropped). None otherwise.
    reference_latents: torch.Tensor | None = None
    reference_rows: torch.Tensor | None = None

    @property
    def text(self) -> TextConditions:
        return TextConditions(self.text_embeds, self.pooled_text_embeds, self.time_ids)


def _randn(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def encode_latent_distribution(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of ``pixels`` in [-1, 1], scaled by the VAE's scaling factor."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (dist.mean - shift) * scale, dist.std * scale


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The inpainting mask at latent resolution (nearest, as diffusers' inpainting pipeline does)."""
    return F.interpolate(mask.float(), size=size)


@torch.no_grad()
def encode_text(parts, prompts: list[str]) -> TextConditions:
    """The prompts' text conditions as the pipeline makes them (the backbone's encoders: SD's CLIP tokens;
    SDXL's two encoders' tokens and pooled embedding), on the text encoder's device."""
    return parts.backbone.encode_text(parts, list(prompts), parts.text_encoder.device)


@torch.no_grad()
def empty_text(parts) -> TextConditions:
    """What a dropped prompt becomes: the empty prompt's conditions, or zeros where the backbone's pipeline
    uses zeros for "no prompt" (SDXL's ``force_zeros_for_empty_prompt``)."""
    empty = encode_text(parts, [""])
    return empty.map(torch.zeros_like) if parts.backbone.zeros_for_empty_prompt else empty


def select_text(
    text: torch.Tensor | TextConditions, empty: torch.Tensor | TextConditions, drop_text: torch.Tensor
) -> TextConditions:
    """Replace rows where ``drop_text`` by the empty prompt's conditions (classifier-free dropout)."""
    text = text if isinstance(text, TextConditions) else TextConditions(text)
    empty = empty if isinstance(empty, TextConditions) else TextConditions(empty)
    return text.where(drop_text, empty)


def batch_time_ids(parts, batch: dict) -> torch.Tensor | None:
    """SDXL's micro-conditioning for a loader batch: each photo's original size and crop (from the loader),
    the training size (the batch's pixel size) as the target; ``None`` for backbones without it."""
    rows, _, height, width = batch["pixel_values"].shape
    target = (int(height), int(width))
    originals = [tuple(map(int, s)) for s in batch["original_size"]] if "original_size" in batch else [target] * rows
    crops = [tuple(map(int, c)) for c in batch["crop_top_left"]] if "crop_top_left" in batch else None
    return parts.backbone.time_ids(parts.unet, originals, target, crops)


def drop_masks(batch: dict, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop text, drop reference) per row from the loader's flags; stage 1 has no reference."""
    drop_text = batch["drop_text"].bool()
    drop_reference = batch["drop_reference"].bool()
    return drop_text, drop_reference if stage == 2 else torch.ones_like(drop_reference)


def condition_reference(features: torch.Tensor | None, drop_reference: torch.Tensor) -> torch.Tensor | None:
    if features is None:
        return None
    return drop_references(features, drop_reference.to(features.device))


def _reference_pass_kwargs(inputs: StepInputs) -> dict:
    """The in-context reference pass's extra UNet arguments: with a decoupled adapter too (``both``), zero
    features ("no CLIP reference") for each of its rows."""
    if inputs.reference_latents is None or inputs.reference_features is None:
        return {}
    rows = inputs.reference_latents.shape[0]
    features = inputs.reference_features
    return {"added_cond_kwargs": {"image_embeds": features.new_zeros((rows, *features.shape[1:]))}}


def diffusion_loss(
    unet,
    noise_scheduler: DDPMScheduler,
    inputs: StepInputs,
    generator: torch.Generator,
    *,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per-batch loss: noise the sampled latents, predict ``epsilon`` or ``v`` (per the scheduler config)."""
    ref = inputs.latent_mean
    latents = inputs.latent_mean + inputs.latent_std * _randn(ref.shape, generator, ref)
    masked = inputs.masked_mean + inputs.masked_std * _randn(ref.shape, generator, ref)
    noise = _randn(ref.shape, generator, ref)
    if noise_offset:
        noise = noise + noise_offset * _randn((ref.shape[0], ref.shape[1], 1, 1), generator, ref)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_train_timesteps, (ref.shape[0],), generator=generator).to(ref.device)

    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")

    model_input = torch.cat([noisy, inputs.mask.to(noisy.dtype), masked], dim=1)
    dtype = dtype or model_input.dtype
    kwargs = {}
    added = {name: value.to(dtype) for name, value in inputs.text.added_cond_kwargs().items()}
    if inputs.reference_features is not None:
        added["image_embeds"] = inputs.reference_features
    if added:
        kwargs["added_cond_kwargs"] = added
    reference_pass = _reference_pass_kwargs(inputs)  # in-context modes: run once, appended in every attn1
    with in_context_reference(unet, inputs.reference_latents, inputs.reference_rows, dtype, **reference_pass):
        prediction = unet(
            model_input.to(dtype), timesteps, encoder_hidden_states=inputs.text_embeds.to(dtype), **kwargs
        ).sample
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma:
        snr = compute_snr(noise_scheduler, timesteps).float()
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        if prediction_type == "v_prediction":
            weights = clipped / (snr + 1)
        else:
            weights = torch.where(snr > 0, clipped / snr.clamp_min(1e-8), torch.ones_like(snr))
        per_sample = per_sample * weights
    return per_sample.mean()
