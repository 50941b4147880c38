"""Load what a training run needs from local folders, with errors that say what to download.

``model.pretrained`` is either a diffusers inpainting folder (``vae/``, ``unet/``, ``scheduler/`` and the
backbone's text components: ``text_encoder/`` + ``tokenizer/`` for SD 1.x/2.x, and ``text_encoder_2/`` +
``tokenizer_2/`` too for SDXL) or a DreamPainter pipeline folder (the same plus ``reference_encoder/`` and
``reference_adapter/``), e.g. the output of stage 1 or of the demo. The backbone is detected from
``unet/config.json`` (``dreampainter.models.backbones``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dreampainter.errors import InvalidInputError, MissingFileError, require_file
from dreampainter.models import (
    AdapterConfig,
    ReferenceEncoder,
    import_ip_adapter,
    install_reference_adapter,
    load_adapter,
)
from dreampainter.models.backbones import Backbone, backbone_for_folder, backbone_for_unet, backbone_named
from dreampainter.training.config import EncoderBackend, TrainConfig

SD_HINT = (
    "download a Stable-Diffusion-1.5 inpainting model in diffusers format (e.g. "
    "stable-diffusion-v1-5/stable-diffusion-inpainting) and set model.pretrained to its folder"
)
ADAPTER_SUBFOLDER = "reference_adapter"
ENCODER_SUBFOLDER = "reference_encoder"


@dataclass
class TrainingComponents:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    scheduler_folder: Path  # the inference scheduler saved with the output pipeline
    reference_encoder: ReferenceEncoder | None
    text_encoder_2: CLIPTextModelWithProjection | None = None  # SDXL's second text encoder
    tokenizer_2: CLIPTokenizer | None = None
    backbone_name: str | None = None  # set by load_components (the UNet may be dropped, e.g. when caching)

    @property
    def backbone(self) -> Backbone:
        if self.unet is not None:
            return backbone_for_unet(self.unet)
        return backbone_named(self.backbone_name or "sd")

    def frozen_encoders(self) -> list[torch.nn.Module]:
        """The frozen modules that encode the inputs: VAE, text encoder(s), reference encoder (those present)."""
        modules = (self.vae, self.text_encoder, self.text_encoder_2, self.reference_encoder)
        return [module for module in modules if module is not None]


def _require_component(folder: Path, name: str, filename: str) -> Path:
    require_file(folder / name / filename, f"model.pretrained component '{name}' ({filename})", SD_HINT)
    return folder / name


def load_reference_encoder(config: TrainConfig, folder: Path) -> ReferenceEncoder:
    """The pipeline folder's own encoder if it has one, else the one ``model.reference_encoder`` names."""
    if (folder / ENCODER_SUBFOLDER / "config.json").exists():
        return ReferenceEncoder.from_pretrained(str(folder / ENCODER_SUBFOLDER))
    section = config.model.reference_encoder
    if not section.path:
        raise MissingFileError(
            "model.reference_encoder.path is not set: download open_clip ViT-H-14 weights "
            "(laion/CLIP-ViT-H-14-laion2B-s32B-b79K, open_clip_pytorch_model.bin) or a CLIPVisionModelWithProjection "
            "folder (h94/IP-Adapter models/image_encoder) and point the config at it"
        )
    resize_mode = str(section.resize_mode)
    if section.backend == EncoderBackend.open_clip:
        return ReferenceEncoder.from_open_clip(section.model_name, section.path, resize_mode=resize_mode)
    return ReferenceEncoder.from_transformers(section.path, resize_mode=resize_mode)


def adapter_config_from(config: TrainConfig, encoder: ReferenceEncoder) -> AdapterConfig:
    """``model.adapter`` as the model's :class:`AdapterConfig`, sized for ``encoder``'s features."""
    section = config.model.adapter
    return section.adapter_config(image_embed_dim=encoder.feature_dim(section.feature_type))


def attach_adapter(config: TrainConfig, unet: UNet2DConditionModel, encoder: ReferenceEncoder, folder: Path) -> None:
    """Stage 2: continue the folder's adapter, or initialise from ``adapter.init_from``, or start fresh."""
    init_from = config.model.adapter.init_from
    if (folder / ADAPTER_SUBFOLDER).exists() and not init_from:
        load_adapter(unet, folder / ADAPTER_SUBFOLDER)
        return
    if not init_from:
        install_reference_adapter(unet, adapter_config_from(config, encoder))
        return
    source = Path(init_from)
    if source.is_dir():
        load_adapter(unet, source)
    elif source.suffix in (".bin", ".safetensors"):
        import_ip_adapter(unet, source, scale=config.model.adapter.scale)
    else:
        raise InvalidInputError(f"model.adapter.init_from: {source} is neither an adapter folder nor a .bin/.safetensors file")


def _load_text_components(folder: Path, backbone: Backbone) -> dict:
    """The backbone's tokenizers and text encoders from their subfolders, named as in the pipeline."""
    loaded = {}
    hint = f"{backbone.download_hint} and set model.pretrained to its folder"
    for tokenizer_name, encoder_name, encoder_class in backbone.text_components:
        encoder_folder = folder / encoder_name
        require_file(encoder_folder / "config.json", f"model.pretrained component '{encoder_name}' (config.json)", hint)
        loaded[encoder_name] = getattr(transformers, encoder_class).from_pretrained(str(encoder_folder))
        tokenizer_folder = folder / tokenizer_name
        if not tokenizer_folder.is_dir():
            raise MissingFileError(
                f"model.pretrained component '{tokenizer_name}' not found: {tokenizer_folder} ({hint})"
            )
        loaded[tokenizer_name] = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
    return loaded


def load_components(config: TrainConfig) -> TrainingComponents:
    if not config.model.pretrained:
        raise InvalidInputError(f"config model.pretrained is not set ({SD_HINT})")
    folder = Path(config.model.pretrained)
    if not folder.is_dir():
        raise MissingFileError(f"model.pretrained folder not found: {folder} ({SD_HINT})")
    vae = AutoencoderKL.from_pretrained(str(_require_component(folder, "vae", "config.json")))
    backbone = backbone_for_folder(_require_component(folder, "unet", "config.json").parent)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    if unet.config.in_channels != 9:
        raise InvalidInputError(
            f"{folder / 'unet'}: an inpainting UNet has 9 input channels, this one has {unet.config.in_channels}"
        )
    text = _load_text_components(folder, backbone)
    scheduler_folder = _require_component(folder, "scheduler", "scheduler_config.json")
    noise_scheduler = DDPMScheduler.from_pretrained(str(scheduler_folder))
    encoder = None
    if config.run.stage == 2 or (folder / ENCODER_SUBFOLDER).exists():
        encoder = load_reference_encoder(config, folder)
    if config.run.stage == 2:
        attach_adapter(config, unet, encoder, folder)
    return TrainingComponents(
        vae, text["text_encoder"], text["tokenizer"], unet, noise_scheduler, scheduler_folder, encoder,
        text_encoder_2=text.get("text_encoder_2"), tokenizer_2=text.get("tokenizer_2"), backbone_name=backbone.name,
    )  # fmt: skip
