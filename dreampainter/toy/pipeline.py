"""A tiny randomly initialised DreamPainterPipeline, built in code, for tests, notebooks and demos."""

from __future__ import annotations

import os

from dreampainter.pipelines.pipeline_dreampainter import DreamPainterPipeline


def build_tiny_pipeline(
    tokenizer_folder: str | os.PathLike | None,
    *,
    reference: bool = True,
    projection: str = "linear",
    backend: str = "transformers",
    vae_block_out_channels: tuple[int, ...] = (16, 32),
    seed: int = 0,
    tokenizer=None,
    backbone: str = "sd",
) -> DreamPainterPipeline:
    """Tiny UNet/VAE/text encoder (``dreampainter.toy.models``); with ``reference`` also a tiny reference
    encoder and the adapter (``projection`` ``"linear"`` or ``"resampler"``). The tokenizer's files
    (the real CLIP BPE) are written to ``tokenizer_folder`` unless a ``tokenizer`` is given to share.
    ``backbone="sdxl"``: an SDXL-style UNet (``text_time`` micro-conditioning) and a second text encoder
    with a projection, sharing the tokenizer."""
    from dreampainter.models import AdapterConfig, install_reference_adapter
    from dreampainter.toy.models import (
        build_clip_tokenizer,
        build_tiny_reference_encoder,
        build_tiny_scheduler,
        build_tiny_sdxl_unet,
        build_tiny_text_encoder,
        build_tiny_text_encoder_2,
        build_tiny_unet,
        build_tiny_vae,
    )

    if tokenizer is None and tokenizer_folder is None:
        raise ValueError(
            "build_tiny_pipeline needs a tokenizer_folder to write the tokenizer to, or a tokenizer"
        )
    if backbone not in ("sd", "sdxl"):
        raise ValueError(f"backbone: 'sd' or 'sdxl', got {backbone!r}")
    unet = build_tiny_sdxl_unet(seed=seed) if backbone == "sdxl" else build_tiny_unet(seed=seed)
    encoder = None
    if reference:
        encoder = build_tiny_reference_encoder(backend=backend, seed=seed)
        feature_type = "global" if projection == "linear" else "tokens"
        config = AdapterConfig(
            projection=projection,
            image_embed_dim=encoder.feature_dim(feature_type),
            num_tokens=4,
            resampler_depth=1,
            resampler_heads=2,
            resampler_dim_head=16,
            resampler_ff_mult=2,
        )
        install_reference_adapter(unet, config)
    tokenizer = tokenizer if tokenizer is not None else build_clip_tokenizer(tokenizer_folder)
    second = {}
    if backbone == "sdxl":
        second = {"text_encoder_2": build_tiny_text_encoder_2(seed=seed + 1), "tokenizer_2": tokenizer}
    return DreamPainterPipeline(
        vae=build_tiny_vae(seed=seed, block_out_channels=vae_block_out_channels),
        text_encoder=build_tiny_text_encoder(seed=seed),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_tiny_scheduler(),
        reference_encoder=encoder,
        **second,
    )
