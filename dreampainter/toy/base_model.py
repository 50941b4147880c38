"""The CPU demo's tiny base model, built in code and offline: the pipeline folder stage 1 starts from.

A light ``AutoencoderKL`` (few channels, no mid-block attention) is fitted briefly on toy photos and
references (generated in memory), so that decoded images mean something and latents are small
(32 px images, three blocks -> 4x down-sampling -> 8x8 latents). The other components are tiny and
random: a 9-channel inpainting UNet, a CLIP text encoder with the real CLIP BPE vocabulary, a frozen
CLIP vision tower for references, and the scheduler recipe that learns on toy data in minutes
(v-prediction, zero-terminal-SNR betas, trailing timesteps; see docs/architecture.md, "The toy world and the CPU demo").

The folder is written with ``DreamPainterPipeline.save_pretrained`` (no adapter yet: stage 2 adds it)
and loads with ``DreamPainterPipeline.from_pretrained``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from dreampainter.errors import InvalidInputError
from dreampainter.toy.data import MIN_RESOLUTION, make_toy_sample, sample_seed
from dreampainter.toy.text_fit import (
    TEXT_FIT_SPLIT,
    TEXT_HELD_OUT_SPLIT,
    TextFitResult,
    fit_text_encoder,
    toy_prompts,
)

# The fit report written beside the components.
REPORT_NAME = "demo_base.json"
# Toy seeds of the VAE's fitting and held-out images: split names disjoint from the toy
# dataset's train/val/bench splits, so the demo's evaluation never scores images the VAE was fitted on.
VAE_FIT_SPLIT = "vae_fit"
VAE_HELD_OUT_SPLIT = "vae_held_out"


@dataclass
class VaeFitResult:
    """How the VAE fit went: held-out reconstruction MSE in [-1, 1] before and after, and wall time."""

    steps: int
    initial_mse: float
    final_mse: float
    seconds: float
    scaling_factor: float


def demo_scheduler_config() -> dict:
    """The scheduler recipe measured to learn on toy data in CPU minutes (docs/architecture.md): v-prediction,
    zero-terminal-SNR betas (the last training step is pure noise) and trailing DDIM timesteps
    (sampling starts from that pure-noise step)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
    )


def build_demo_vae(
    seed: int, block_out_channels: tuple[int, ...] = (16, 32, 32), latent_channels: int = 4
) -> AutoencoderKL:
    """A light VAE: one ResNet layer per block, no mid-block attention, ``2**(blocks-1)`` down-sampling."""
    from dreampainter.toy.models import build_tiny_vae

    return build_tiny_vae(seed=seed, block_out_channels=block_out_channels, latent_channels=latent_channels)


def build_demo_unet(
    seed: int, sample_size: int, block_out_channels: tuple[int, ...] = (32, 64), cross_attention_dim: int = 32
) -> UNet2DConditionModel:
    """A small 9-channel inpainting UNet with cross-attention at every resolution."""
    from dreampainter.toy.models import build_tiny_unet

    return build_tiny_unet(
        seed=seed,
        cross_attention_dim=cross_attention_dim,
        block_out_channels=block_out_channels,
        sample_size=sample_size,
    )


def toy_images(seed: int, split: str, count: int, resolution: int) -> torch.Tensor:
    """``2 * count`` toy images (each sample's photo and its reference) as a (N, 3, H, W) tensor in [-1, 1]."""
    images = []
    for index in range(count):
        sample = make_toy_sample(sample_seed(seed, split, index), resolution)
        images += [sample.photo, sample.reference]
    array = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def reconstruction_mse(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> float:
    """Mean squared error in [-1, 1] of ``decode(mode(encode(images)))``."""
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        decoded = vae.decode(vae.encode(batch).latent_dist.mode()).sample
        total += float(((decoded - batch) ** 2).sum())
    return total / images.numel()


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """``1 / std`` of the latents of ``images``: diffusion then sees unit-variance latents (as SD's 0.18215)."""
    latents = vae.encode(images).latent_dist.mode()
    return float(1.0 / latents.std().clamp_min(1e-6))


def fit_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    held_out: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-4,
    seed: int = 0,
    progress: bool = True,
) -> VaeFitResult:
    """Fit ``vae`` in place on ``images``: reconstruction MSE + ``kl_weight`` * KL per latent element, AdamW.

    Sets ``vae.config.scaling_factor`` from the fitted latents and leaves the VAE frozen in eval mode.
    """
    if steps < 0 or batch_size < 1:
        raise InvalidInputError(f"VAE fit: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    initial = reconstruction_mse(vae, held_out)
    start = time.perf_counter()
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="fit VAE", disable=not progress, leave=False)
    for _ in bar:
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        decoded = vae.decode(posterior.sample(generator=generator)).sample
        reconstruction = torch.mean((decoded - batch) ** 2)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = reconstruction + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(mse=f"{reconstruction.item():.4f}")
    vae.eval().requires_grad_(False)
    seconds = time.perf_counter() - start
    scaling = latent_scaling_factor(vae, images[: min(len(images), 256)])
    vae.register_to_config(scaling_factor=scaling)
    return VaeFitResult(steps, initial, reconstruction_mse(vae, held_out), seconds, scaling)


def fit_demo_text_encoder(
    text_encoder, tokenizer, seed: int, steps: int, count: int, progress: bool = True
) -> TextFitResult:
    """Fit the demo's text encoder on ``count`` toy samples' prompts (held out: 200 others) and print how it went."""
    if count < 1:
        raise InvalidInputError(f"text_prompts must be >= 1, got {count}")
    prompts, targets = toy_prompts(seed, TEXT_FIT_SPLIT, count)
    held_out, held_out_targets = toy_prompts(seed, TEXT_HELD_OUT_SPLIT, 200)
    fit = fit_text_encoder(
        text_encoder,
        tokenizer,
        prompts,
        targets,
        held_out,
        held_out_targets,
        steps=steps,
        seed=seed,
        progress=progress,
    )
    if progress:
        print(
            f"text encoder fit: {fit.steps} steps in {fit.seconds:.1f} s, held-out R² of the named scene "
            f"read from the token states {fit.initial_r2:.2f} -> {fit.final_r2:.2f}"
        )
    return fit


def build_demo_base_model(
    out_dir: str | os.PathLike,
    *,
    resolution: int = 32,
    seed: int = 0,
    vae_steps: int = 300,
    vae_images: int = 512,
    vae_held_out: int = 32,
    vae_batch_size: int = 32,
    vae_lr: float = 4e-3,
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32),
    unet_block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    text_length: int = 32,
    text_steps: int = 400,
    text_prompts: int = 1500,
    progress: bool = True,
) -> Path:
    """Build the demo's base pipeline folder at ``out_dir`` and return it.

    ``vae_images`` toy samples (photo + reference each) fit the VAE for ``vae_steps`` steps; the
    reconstruction MSE on ``vae_held_out`` other samples and the wall time are printed and saved in
    ``demo_base.json``. Same arguments -> same weights. ``text_length``: the tokenizer's padded length;
    toy prompts are at most 26 tokens, and 32 instead of SD's 77 lets the tiny UNet find the colour
    words among fewer padding tokens (measured: text fidelity ratio 1.20 vs 1.11 after 1200 steps).
    The text encoder is fitted for ``text_steps`` steps on ``text_prompts`` toy samples' prompts
    (English and Chinese; see :mod:`dreampainter.toy.text_fit`); 0 keeps it random.
    """
    from dreampainter.pipelines import DreamPainterPipeline
    from dreampainter.toy.models import (
        build_clip_tokenizer,
        build_tiny_reference_encoder,
        build_tiny_text_encoder,
    )

    if not isinstance(resolution, int) or resolution < MIN_RESOLUTION:
        raise InvalidInputError(f"resolution: must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")
    factor = 2 ** (len(vae_block_out_channels) - 1)
    if resolution % (factor * 2 ** (len(unet_block_out_channels) - 1)):
        raise InvalidInputError(
            f"resolution: {resolution} px must be divisible by the VAE's factor {factor} times the UNet's "
            f"{2 ** (len(unet_block_out_channels) - 1)}"
        )
    if vae_images < 1 or vae_held_out < 1:
        raise InvalidInputError(f"vae_images and vae_held_out must be >= 1, got {vae_images}, {vae_held_out}")
    out_dir = Path(out_dir)
    started = time.perf_counter()

    images = toy_images(seed, VAE_FIT_SPLIT, vae_images, resolution)
    held_out = toy_images(seed, VAE_HELD_OUT_SPLIT, vae_held_out, resolution)
    vae = build_demo_vae(seed, vae_block_out_channels)
    fit = fit_vae(
        vae,
        images,
        held_out,
        steps=vae_steps,
        batch_size=vae_batch_size,
        lr=vae_lr,
        seed=seed,
        progress=progress,
    )
    if progress:
        print(
            f"VAE fit: {fit.steps} steps in {fit.seconds:.1f} s, held-out reconstruction MSE "
            f"{fit.initial_mse:.4f} -> {fit.final_mse:.4f} (in [-1, 1]), latents {resolution // factor}x"
            f"{resolution // factor}"
        )

    with tempfile.TemporaryDirectory() as tokenizer_folder:
        tokenizer = build_clip_tokenizer(tokenizer_folder)
        tokenizer.model_max_length = text_length
        text_encoder = build_tiny_text_encoder(seed=seed, hidden_size=cross_attention_dim)
        text_fit = fit_demo_text_encoder(text_encoder, tokenizer, seed, text_steps, text_prompts, progress)
        pipe = DreamPainterPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=build_demo_unet(seed, resolution // factor, unet_block_out_channels, cross_attention_dim),
            scheduler=DDIMScheduler(**demo_scheduler_config()),
            reference_encoder=build_tiny_reference_encoder(backend="transformers", seed=seed),
        )
        pipe.save_pretrained(out_dir)
    report = {
        "resolution": resolution,
        "latent_size": resolution // factor,
        "seed": seed,
        "vae_images": vae_images,
        "vae_held_out": vae_held_out,
        "vae_fit": asdict(fit),
        "text_prompts": text_prompts,
        "text_fit": asdict(text_fit),
        "seconds": time.perf_counter() - started,
    }
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return out_dir
