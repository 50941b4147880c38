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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


def tiny_sdxl_unet_config(text_widths: tuple[int, int] = (32, 32), pooled_dim: int = 32) -> dict:
    """A tiny SDXL-style inpainting UNet config: two text encoders' widths concatenated for
    cross-attention, ``text_time`` micro-conditioning (6 ids of 8 dims + the pooled embedding)."""
    return {
        **tiny_unet_config(cross_attention_dim=sum(text_widths)),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + pooled_dim,
        "use_linear_projection": True,
    }


def build_tiny_sdxl_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**tiny_sdxl_unet_config(), **overrides})


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


def tiny_clip_text_config(hidden_size: int = 32, num_layers: int = 2, projection_dim: int | None = None) -> CLIPTextConfig:
    """A small CLIP text config with the real vocabulary, context length and special tokens."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection_dim or hidden_size,
    )


def build_tiny_text_encoder(seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(tiny_clip_text_config(hidden_size, num_layers)).eval()


def build_tiny_text_encoder_2(seed: int = 1, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder, tiny: CLIP text model with a projection (the pooled ``text_embeds``)."""
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(tiny_clip_text_config(hidden_size, 2, projection_dim)).eval()


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


# ---------------------------------------------------------------------------- single-file checkpoints
_RESNET_TO_LDM = (
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
)  # fmt: skip
_UNET_TOP_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
}  # fmt: skip
_VAE_ATTENTION_TO_LDM = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET_TO_LDM).get(head, head) + "." + tail


def _unet_key_to_ldm(key: str, config) -> str:
    """A diffusers UNet key -> its name in an original (LDM) Stable Diffusion checkpoint."""
    per_block = config.layers_per_block + 1
    parts = key.split(".")
    for prefix in (parts[0], ".".join(parts[:2])):
        if prefix in _UNET_TOP_TO_LDM:
            return f"{_UNET_TOP_TO_LDM[prefix]}.{key.removeprefix(prefix + '.')}"
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return f"middle_block.{2 * index}.{_rename_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    block, kind, index, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # ``downsamplers.0.conv.weight`` -> ``op.weight``
            return f"input_blocks.{per_block * (block + 1)}.0.op.{rest.removeprefix('conv.')}"
        slot = "0" if kind == "resnets" else "1"
        rest = _rename_resnet(rest) if kind == "resnets" else rest
        return f"input_blocks.{per_block * block + index + 1}.{slot}.{rest}"
    if kind == "upsamplers":
        has_attention = config.up_block_types[block].startswith("CrossAttn")
        return f"output_blocks.{per_block * block + per_block - 1}.{2 if has_attention else 1}.{rest}"
    slot = "0" if kind == "resnets" else "1"
    rest = _rename_resnet(rest) if kind == "resnets" else rest
    return f"output_blocks.{per_block * block + index}.{slot}.{rest}"


def _vae_key_to_ldm(key: str, num_blocks: int) -> tuple[str, bool]:
    """A diffusers VAE key -> ``(LDM name, whether it is a mid-attention linear stored as a 1x1 conv)``."""
    side, _, rest = key.partition(".")
    parts = rest.split(".")
    if parts[0] in ("down_blocks", "up_blocks"):
        block = int(parts[1]) if parts[0] == "down_blocks" else num_blocks - 1 - int(parts[1])
        name = "down" if parts[0] == "down_blocks" else "up"
        if parts[2] == "resnets":
            tail = ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            return f"{side}.{name}.{block}.block.{parts[3]}.{tail}", False
        return f"{side}.{name}.{block}.{'downsample' if name == 'down' else 'upsample'}.{'.'.join(parts[4:])}", False
    if parts[0] == "mid_block" and parts[1] == "resnets":
        tail = ".".join(parts[3:]).replace("conv_shortcut", "nin_shortcut")
        return f"{side}.mid.block_{int(parts[2]) + 1}.{tail}", False
    if parts[0] == "mid_block":
        tail = ".".join(parts[3:])
        for ours, theirs in _VAE_ATTENTION_TO_LDM:
            if tail.startswith(ours):
                tail = theirs + tail.removeprefix(ours)
        return f"{side}.mid.attn_1.{tail}", tail.endswith("weight") and not tail.startswith("norm.")
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}", False
    return key, False


def original_sd_state_dict(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel) -> dict:
    """The three models as one state dict in the original (LDM) Stable Diffusion 1.x layout, the layout of
    ``sd-v1-5-inpainting.ckpt`` / ``.safetensors`` that diffusers' ``from_single_file`` converts back."""
    out = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + _unet_key_to_ldm(key, unet.config)] = value
    for key, value in vae.state_dict().items():
        name, conv = _vae_key_to_ldm(key, len(vae.config.block_out_channels))
        out["first_stage_model." + name] = value[..., None, None] if conv else value
    for key, value in text_encoder.state_dict().items():  # recent transformers drop the ``text_model.`` level
        out["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = value
    return {key: value.detach().cpu().contiguous() for key, value in out.items()}


def write_single_file_checkpoint(
    path: str | os.PathLike, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> Path:
    """Write the models as one original-layout checkpoint: ``.safetensors`` (flat) or ``.ckpt``
    (``{"state_dict": ...}``, as the CompVis / RunwayML checkpoints are saved)."""
    path = Path(path)
    state = original_sd_state_dict(unet, vae, text_encoder)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)
    return path
