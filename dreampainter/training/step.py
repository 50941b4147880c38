"""The diffusion training objective, shared by the pixel path and the latent-cache path.

Both paths reduce a batch to :class:`StepInputs` (latent *distributions*, the latent-size mask, text
embeddings, reference features) and then draw every random number from one generator in one order,
so a cached step computes exactly the loss the uncached step computes on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from dreampainter.models.adapter import drop_references
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
    # In-context reference modes (training/in_context.py): clean reference latents of the rows that keep
    # their reference, and each row's index among them (-1: dropped). None otherwise.
    reference_latents: torch.Tensor | None = None
    reference_rows: torch.Tensor | None = None


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
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """CLIP text tokens (B, 77, D), padded to the tokenizer's max length as SD does."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


def select_text(text_embeds: torch.Tensor, empty_embeds: torch.Tensor, drop_text: torch.Tensor) -> torch.Tensor:
    """Replace rows where ``drop_text`` by the empty prompt's embedding (classifier-free dropout)."""
    drop = drop_text.to(device=text_embeds.device, dtype=torch.bool).view(-1, 1, 1)
    return torch.where(drop, empty_embeds.to(text_embeds.dtype).expand_as(text_embeds), text_embeds)


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
    if inputs.reference_features is not None:
        kwargs["added_cond_kwargs"] = {"image_embeds": inputs.reference_features}
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
