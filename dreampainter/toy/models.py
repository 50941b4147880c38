"""Tiny randomly initialised components, built in code, for tests and the CPU demo (no downloads).

They have the same classes and wiring as the real Stable-Diffusion-inpainting components, only
smaller: a 9-channel ``UNet2DConditionModel``, an ``AutoencoderKL``, a ``CLIPTextModel`` with the
real CLIP BPE vocabulary (shipped inside open_clip), and a DDIM scheduler.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77


def tiny_unet_config(cross_attention_dim: int = 32, block_out_channels=(32, 64)) -> dict:
    """A 9-input-channel inpainting UNet config, two resolutions, cross-attention in both."""
    n = len(block_out_channels)
    return dict(
        sample_size=8,
        in_channels=9,
        out_channels=4,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_tiny_unet(
    seed: int = 0, cross_attention_dim: int = 32, block_out_channels=(32, 64), **overrides
) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**tiny_unet_config(cross_attention_dim, block_out_channels), **overrides})


def build_tiny_vae(seed: int = 0, block_out_channels=(16, 32), latent_channels: int = 4) -> AutoencoderKL:
    """A light VAE (no mid-block attention): 2x down-sampling per extra block."""
    torch.manual_seed(seed)
    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def build_tiny_text_encoder(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=hidden_size,
    )
    return CLIPTextModel(config).eval()


def build_tiny_scheduler(**overrides) -> DDIMScheduler:
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMScheduler(**{**config, **overrides})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes)))


def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of the real CLIP BPE (from open_clip's bundled file).

    Gives the same token ids as OpenAI's CLIP tokenizer, offline.
    """
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(_bytes_to_unicode().values())
    vocab = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    vocab += ["".join(merge) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [" ".join(merge) for merge in merges]
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return folder


def build_clip_tokenizer(folder: str | os.PathLike) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with the real CLIP vocabulary; its files are written to ``folder``."""
    folder = write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=CLIP_CONTEXT_LENGTH)


# ---------------------------------------------------------------------------- reference encoders
TINY_OPEN_CLIP_NAME = "dreampainter-tiny-vit"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip_vision_config(image_size: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
        projection_dim=24,
    )


def build_tiny_reference_encoder(backend: str = "transformers", seed: int = 0, resize_mode: str = "pad"):
    """A tiny random CLIP vision tower (image 32 px, 17 tokens of width 32, embedding 24) as a ReferenceEncoder."""
    from dreampainter.models.reference_encoder import ReferenceEncoder

    torch.manual_seed(seed)
    if backend == "transformers":
        config = tiny_clip_vision_config().to_dict()
        model_config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version")}
        return ReferenceEncoder(backend=backend, model_config=model_config, image_size=32, resize_mode=resize_mode)
    model_config = {"embed_dim": 24, "vision_cfg": dict(TINY_OPEN_CLIP_CONFIG["vision_cfg"]), "quick_gelu": False}
    return ReferenceEncoder(backend=backend, model_config=model_config, image_size=32, resize_mode=resize_mode)


def register_tiny_open_clip_config(folder: str | os.PathLike) -> str:
    """Register the tiny open_clip architecture under ``TINY_OPEN_CLIP_NAME`` (writes its JSON to ``folder``)."""
    import open_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_OPEN_CLIP_NAME}.json").write_text(json.dumps(TINY_OPEN_CLIP_CONFIG))
    if open_clip.get_model_config(TINY_OPEN_CLIP_NAME) is None:
        open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP_NAME


def write_tiny_open_clip_checkpoint(folder: str | os.PathLike, seed: int = 0, safetensors: bool = False) -> tuple[str, Path]:
    """A whole tiny open_clip CLIP (text tower too) saved like a real open_clip checkpoint file.

    Returns ``(model_name, path)`` for ``ReferenceEncoder.from_open_clip`` / ``open_clip.create_model``.
    """
    import open_clip

    name = register_tiny_open_clip_config(Path(folder) / "open_clip_configs")
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    if safetensors:
        from safetensors.torch import save_file

        path = Path(folder) / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        path = Path(folder) / "open_clip_pytorch_model.bin"
        torch.save(model.state_dict(), path)
    return name, path


def write_tiny_clip_vision_folder(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny ``CLIPVisionModelWithProjection`` saved with ``save_pretrained`` (config.json + safetensors)."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(tiny_clip_vision_config())
    model.save_pretrained(str(folder))
    return Path(folder)
