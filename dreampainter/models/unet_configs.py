"""Configs of the real UNets the adapter is built for, to build them with random weights.

Used for parameter counts (on the meta device), shape tests and benchmarks without downloading weights.
"""

from __future__ import annotations


def sd15_inpainting_unet_config() -> dict:
    """The real SD1.5-inpainting UNet config (860M parameters), for building it with random weights."""
    return dict(
        sample_size=64,
        in_channels=9,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
    )
