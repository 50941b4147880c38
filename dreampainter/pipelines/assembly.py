"""Assemble DreamPainter's components from public weights, without the trainer.

The parts: a Stable Diffusion (1.x/2.x or SDXL) **inpainting** base (a diffusers folder, or one original-layout
``.safetensors`` / ``.ckpt`` file read through diffusers' ``from_single_file`` with the configs of a
local diffusers folder), a CLIP vision encoder (an open_clip checkpoint file, or a transformers
``CLIPVisionModelWithProjection`` folder), an adapter (a public IP-Adapter file or one of our adapter
folders) and optionally a LoRA (peft / diffusers format), fused into the UNet or attached.

:func:`assemble_components` returns the keyword arguments of ``DreamPainterPipeline``;
``DreamPainterPipeline.from_parts`` builds the pipeline from them. Nothing is fetched: every path is local.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, MissingFileError
from dreampainter.models import (
    AdapterConfig,
    ReferenceEncoder,
    import_ip_adapter,
    load_adapter,
    read_adapter_config,
    set_reference_scale,
)
from dreampainter.models.adapter_io import infer_ip_adapter_config, read_ip_adapter_file
from dreampainter.models.backbones import Backbone, backbone_for_folder, backbone_for_unet


def base_components(backbone: Backbone) -> tuple[str, ...]:
    """The component names of a base model of this backbone (SDXL: a second text encoder and tokenizer)."""
    return ("vae", *backbone.component_names, "unet", "scheduler")

BASE_COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")  # SD 1.x/2.x; SDXL adds its second pair
LIBRARIES = ("diffusers", "transformers")  # what a base folder's model_index.json may name
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
INPAINTING_HINT = (
    "download an inpainting model instead, e.g. the 9-channel UNet of runwayml/stable-diffusion-inpainting "
    "(stable-diffusion-v1-5/stable-diffusion-inpainting), or its sd-v1-5-inpainting.ckpt"
)
BASE_CONFIG_HINT = (
    "a local diffusers folder to take the configs from, e.g. stable-diffusion-v1-5/stable-diffusion-inpainting "
    "(its model_index.json, */config.json, scheduler/ and tokenizer/ are enough)"
)
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
LORA_ADAPTER_NAME = "assembled_lora"
OUR_UNET_LORA_PREFIXES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.")


@dataclass
class LoraSpec:
    """A LoRA to apply: its file or folder, its scale, and whether to fuse it into the weights."""

    path: str | os.PathLike
    scale: float = 1.0
    fuse: bool = True


# ----------------------------------------------------------------------------------------- base
def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _load_base_folder(folder: Path) -> dict[str, Any]:
    """The base components from a diffusers folder, each with the class its ``model_index.json`` names."""
    import importlib

    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise MissingFileError(f"--base: {folder} has no model_index.json; is it a diffusers folder ({BASE_CONFIG_HINT})?")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{index_file}: invalid JSON ({error.msg})") from None
    parts = {}
    wanted = base_components(backbone_for_folder(folder))
    for name in wanted:
        entry = index.get(name)
        if not entry or entry[0] is None:
            raise CheckpointMismatchError(f"{index_file}: no '{name}' component; this inpainting folder needs {wanted}")
        if not (folder / name).is_dir():
            raise MissingFileError(f"--base: {folder / name} is missing (download the whole '{name}/' folder)")
        library, class_name = entry
        component_class = getattr(importlib.import_module(library), class_name, None) if library in LIBRARIES else None
        if component_class is None:
            raise CheckpointMismatchError(f"{index_file}: '{name}' names {library}.{class_name}, not a diffusers / transformers class")
        try:
            parts[name] = component_class.from_pretrained(str(folder), subfolder=name, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise InvalidInputError(f"{folder / name}: cannot load {class_name} ({_first_line(error)})") from None
    return parts


def _conv_in_channels(path: Path) -> int | None:
    """The UNet's input channels read from a single-file ``.safetensors`` header (no tensor loaded)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    key = "model.diffusion_model.input_blocks.0.0.weight"
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            if key in names:
                return handle.get_slice(key).get_shape()[1]
    except Exception as error:  # noqa: BLE001 - a corrupt file is the user's to fix
        raise InvalidInputError(f"--base: cannot read {path} ({_first_line(error)})") from None
    return None


def _load_base_single_file(path: Path, base_config: str | os.PathLike | None) -> dict[str, Any]:
    """The base components from one original-layout checkpoint, with the configs of a local diffusers folder."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise InvalidInputError(f"--base: {path} is neither a diffusers folder nor a .safetensors / .ckpt file")
    if base_config is None:
        raise InvalidInputError(f"--base-config: {path} is a single file; name {BASE_CONFIG_HINT}")
    config_folder = Path(base_config)
    if not (config_folder / "model_index.json").exists():
        raise MissingFileError(f"--base-config: {config_folder / 'model_index.json'} not found; give {BASE_CONFIG_HINT}")
    channels = _conv_in_channels(path)
    if channels is not None and channels != 9:
        raise CheckpointMismatchError(
            f"--base: {path} has a {channels}-channel UNet, not an inpainting UNet (9 channels); {INPAINTING_HINT}"
        )
    backbone = backbone_for_folder(config_folder)
    try:
        if backbone.name == "sdxl":
            pipe = StableDiffusionXLInpaintPipeline.from_single_file(
                str(path), config=str(config_folder), local_files_only=True
            )
        else:
            pipe = StableDiffusionInpaintPipeline.from_single_file(
                str(path),
                config=str(config_folder),
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    except Exception as error:  # noqa: BLE001 - diffusers raises many kinds for foreign or corrupt files
        raise CheckpointMismatchError(
            f"--base: cannot load {path} as a Stable Diffusion inpainting checkpoint with the configs of "
            f"{config_folder} ({_first_line(error)})"
        ) from None
    return {name: getattr(pipe, name) for name in base_components(backbone)}


def load_base(base: str | os.PathLike, base_config: str | os.PathLike | None = None) -> dict[str, Any]:
    """``vae``, ``text_encoder``, ``tokenizer``, ``unet``, ``scheduler`` (SDXL: and ``text_encoder_2``,
    ``tokenizer_2``) of a local SD or SDXL inpainting model."""
    path = Path(base)
    if not path.exists():
        raise MissingFileError(
            f"--base: {path} not found (download stable-diffusion-v1-5/stable-diffusion-inpainting, the folder "
            "or sd-v1-5-inpainting.ckpt)"
        )
    parts = _load_base_folder(path) if path.is_dir() else _load_base_single_file(path, base_config)
    channels = parts["unet"].config.in_channels
    if channels != 9:
        raise CheckpointMismatchError(
            f"--base: {path} has a {channels}-channel UNet, not an inpainting UNet (9 channels); {INPAINTING_HINT}"
        )
    return parts


# ------------------------------------------------------------------------------ reference branch
def load_reference_encoder(path: str | os.PathLike, open_clip_model: str | None = None) -> ReferenceEncoder:
    """A transformers ``CLIPVisionModelWithProjection`` folder, or an open_clip file with its model name."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(
            f"--reference-encoder: {path} not found (download the 'models/image_encoder' folder of h94/IP-Adapter, "
            "or open_clip_pytorch_model.bin of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)"
        )
    if path.is_dir():
        if open_clip_model is not None:
            raise InvalidInputError(f"--open-clip-model: {path} is a transformers folder; the name is only for an open_clip file")
        return ReferenceEncoder.from_transformers(path)
    if open_clip_model is None:
        raise InvalidInputError(f"--open-clip-model: {path} is an open_clip file; name its architecture (e.g. ViT-H-14)")
    return ReferenceEncoder.from_open_clip(open_clip_model, path)


def read_adapter_kind(path: str | os.PathLike, cross_attention_dim: int) -> AdapterConfig:
    """What an adapter expects (projection, feature width), read without installing it."""
    path = Path(path)
    if path.is_dir():
        return read_adapter_config(path)[0]
    image_proj, _ = read_ip_adapter_file(path)
    return infer_ip_adapter_config(image_proj, cross_attention_dim, str(path))


FEATURE_NAMES = {"global": "the global image embedding", "tokens": "the penultimate patch tokens"}


def check_encoder_fits(config: AdapterConfig, encoder: ReferenceEncoder, adapter: str, encoder_path: str) -> None:
    """The encoder must give the features the adapter reads, at the adapter's width."""
    width = encoder.feature_dim(config.feature_type)
    if width != config.image_embed_dim:
        raise CheckpointMismatchError(
            f"--adapter {adapter} ({config.projection}) reads {FEATURE_NAMES[config.feature_type]} of width "
            f"{config.image_embed_dim}, but --reference-encoder {encoder_path} gives width {width} (embedding "
            f"{encoder.image_embed_dim}, tokens {encoder.hidden_size}); use the image encoder the adapter was trained with"
        )


def attach_adapter(unet, path: str | os.PathLike, scale: float | None) -> AdapterConfig:
    """Install the adapter of ``path`` (our folder, or an IP-Adapter file) into ``unet``."""
    path = Path(path)
    if path.is_dir():
        config = load_adapter(unet, path)
        if scale is not None:
            set_reference_scale(unet, scale)
            config.scale = scale
        return config
    return import_ip_adapter(unet, path, scale=1.0 if scale is None else scale)


# ------------------------------------------------------------------------------------------ LoRA
def _lora_file(path: Path) -> Path:
    if path.is_dir():
        for name in LORA_WEIGHT_NAMES:
            if (path / name).exists():
                return path / name
        raise MissingFileError(f"--lora: {path} holds none of {LORA_WEIGHT_NAMES}")
    if path.suffix not in (".safetensors", ".bin"):
        raise InvalidInputError(f"--lora: {path} must be a .safetensors or .bin LoRA file (or a folder holding one)")
    return path


def apply_lora(parts: dict[str, Any], lora: LoraSpec) -> None:
    """Load a LoRA into the UNet (and text encoder, if it has weights for it); fuse it, or leave it attached.

    Accepts what ``StableDiffusionPipeline.save_lora_weights`` writes (``unet.`` / ``text_encoder.`` keys),
    what ``UNet2DConditionModel.save_lora_adapter`` writes (our trainer's ``lora/`` folder: UNet keys
    without a prefix), and the other layouts diffusers' ``lora_state_dict`` converts (e.g. kohya).
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(lora.path)
    if not path.exists():
        raise MissingFileError(f"--lora: {path} not found")
    weights = _lora_file(path)
    try:
        state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(
            str(weights.parent), weight_name=weights.name, return_lora_metadata=True
        )
    except Exception as error:  # noqa: BLE001 - unreadable or foreign files are the user's to fix
        raise InvalidInputError(f"--lora: cannot read {weights} ({_first_line(error)})") from None
    if not state or not all("lora" in key for key in state):
        raise CheckpointMismatchError(f"--lora: {weights} holds no LoRA weights (keys without 'lora_A' / 'lora_B')")
    if all(key.startswith(OUR_UNET_LORA_PREFIXES) for key in state):
        state = {f"unet.{key}": value for key, value in state.items()}
        metadata = {f"unet.{key}": value for key, value in metadata.items()} if metadata else metadata
    if parts.get("text_encoder_2") is not None:  # SDXL: diffusers' SDXL LoRA loader (text_encoder_2. keys too)
        helper = StableDiffusionXLPipeline(**{name: parts[name] for name in base_components(backbone_for_unet(parts["unet"]))})
    else:
        helper = StableDiffusionPipeline(
            **{name: parts[name] for name in BASE_COMPONENTS},
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    targets = [name for name in ("unet", "text_encoder", "text_encoder_2") if parts.get(name) is not None]
    try:
        for name in targets:
            if not any(key.startswith(f"{name}.") for key in state):
                continue
            if name == "unet":
                helper.load_lora_into_unet(state, alphas, parts[name], adapter_name=LORA_ADAPTER_NAME, metadata=metadata)
            else:
                helper.load_lora_into_text_encoder(
                    state, alphas, parts[name], prefix=name, adapter_name=LORA_ADAPTER_NAME, metadata=metadata
                )
    except Exception as error:  # noqa: BLE001 - shape mismatches and foreign layouts
        raise CheckpointMismatchError(f"--lora: {weights} does not fit this UNet / text encoder ({_first_line(error)})") from None
    loaded = [name for name in targets if LORA_ADAPTER_NAME in (getattr(parts[name], "peft_config", None) or {})]
    if not loaded:
        raise CheckpointMismatchError(f"--lora: {weights} has no weights for this UNet or text encoder")
    if lora.fuse:
        helper.fuse_lora(components=loaded, lora_scale=lora.scale, adapter_names=[LORA_ADAPTER_NAME])
        helper.unload_lora_weights()
    else:
        helper.set_adapters([LORA_ADAPTER_NAME], [lora.scale])


# ---------------------------------------------------------------------------------------- all
def assemble_components(
    base: str | os.PathLike,
    *,
    base_config: str | os.PathLike | None = None,
    reference_encoder: str | os.PathLike | None = None,
    open_clip_model: str | None = None,
    adapter: str | os.PathLike | None = None,
    adapter_scale: float | None = None,
    lora: str | os.PathLike | None = None,
    lora_scale: float = 1.0,
    fuse_lora: bool = True,
) -> dict[str, Any]:
    """The keyword arguments of ``DreamPainterPipeline`` built from local public weights.

    ``base``: a diffusers SD or SDXL inpainting folder, or a single ``.safetensors`` / ``.ckpt`` file with
    ``base_config`` (a local diffusers folder for the configs). ``reference_encoder`` and ``adapter``
    go together (neither gives a text-only pipeline): a transformers folder or an open_clip file (with
    ``open_clip_model``), and an IP-Adapter file or our adapter folder; the encoder must give the
    features the adapter reads. ``lora``: a LoRA file or folder, fused (``fuse_lora``) or attached.
    """
    if (reference_encoder is None) != (adapter is None):
        missing = "--reference-encoder (the CLIP image encoder)" if reference_encoder is None else "--adapter (the IP-Adapter weights)"
        given = f"--adapter {adapter}" if reference_encoder is None else f"--reference-encoder {reference_encoder}"
        raise InvalidInputError(f"{given} needs {missing}: the reference branch takes both")
    if adapter is not None and not Path(adapter).exists():
        raise MissingFileError(
            f"--adapter: {adapter} not found (download ip-adapter_sd15.safetensors or ip-adapter-plus_sd15.safetensors "
            "from h94/IP-Adapter, models/)"
        )
    parts = load_base(base, base_config)
    if lora is not None:
        apply_lora(parts, LoraSpec(lora, lora_scale, fuse_lora))
    encoder = None
    if adapter is not None:
        encoder = load_reference_encoder(reference_encoder, open_clip_model)
        config = read_adapter_kind(adapter, parts["unet"].config.cross_attention_dim)
        check_encoder_fits(config, encoder, str(adapter), str(reference_encoder))
        attach_adapter(parts["unet"], adapter, adapter_scale)
    parts["unet"].eval()
    return {**parts, "reference_encoder": encoder}
