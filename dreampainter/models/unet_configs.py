"""Configs of the real models (the UNets the adapter is built for, and the frozen encoders around them), to
build them with random weights.

Used for parameter counts (on the meta device), shape tests, memory estimates and benchmarks without
downloading weights.
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


def sdxl_inpainting_unet_config() -> dict:
    """The real SDXL-inpainting UNet config (diffusers/stable-diffusion-xl-1.0-inpainting-0.1, 2.57B
    parameters): three resolutions, 1/2/10 transformer layers, cross-attention width 2048 (the two text
    encoders' 768 + 1280), ``text_time`` micro-conditioning (6 ids x 256 + the 1280-d pooled embedding)."""
    return dict(
        sample_size=128,
        in_channels=9,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


# The frozen encoders: CLIP ViT-L/14 text (SD, and SDXL's first), OpenCLIP ViT-bigG/14 text with projection
# (SDXL's second), ViT-H/14 vision with projection (h94/IP-Adapter's image encoder), the SD / SDXL VAE layout.
CLIP_VOCAB = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_L_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
BIGG_TEXT = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                 hidden_act="gelu", projection_dim=1280)  # fmt: skip
VIT_H14_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512)
