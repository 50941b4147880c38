"""Static GPU memory of a training run, computed from its config and the real model shapes (no weights).

What a run holds on each GPU besides activations: the frozen weights in the compute precision, the
trainable weights in float32 with their gradients and AdamW's two moments (8-bit AdamW: two bytes per
parameter), an EMA copy when enabled (per rank, float32); under DeepSpeed ZeRO-2 the gradients and the
optimizer states (float32 master weights and moments) are split across GPUs. The models are built on the ``meta`` device, so counting the full SDXL UNet costs no memory.

Activations depend on resolution, batch size and gradient checkpointing; they are not estimated here
(``scripts/gpu_bench.py`` measures peak memory on a GPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from dreampainter.models.adapter import adapter_parameters, install_reference_adapter
from dreampainter.models.unet_configs import BIGG_TEXT, CLIP_L_TEXT, CLIP_VOCAB, SD_VAE, VIT_H14_VISION
from dreampainter.training.config import TrainConfig, UnetTraining, unet_training_mode

GIB = 1024**3
BYTES = {"no": 4, "fp16": 2, "bf16": 2}
VIT_H_FEATURES = {"global": 1024, "tokens": 1280}  # image_embeds width; penultimate token width


@dataclass
class MemoryEstimate:
    """Parameter counts and static memory per GPU (GiB), for one config and number of GPUs."""

    unet_parameters: int
    trainable_parameters: int
    frozen_parameters: int  # frozen UNet weights, text encoder(s), VAE, and in stage 2 the reference encoder
    weights_gib: float  # the module weights on the GPU (frozen in the compute precision)
    gradients_gib: float
    optimizer_gib: float  # AdamW moments (and DeepSpeed's float32 master weights)
    ema_gib: float
    total_gib: float
    num_gpus: int
    zero2: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def frozen_encoder_parameters(backbone: str, stage: int) -> int:
    """Parameters of the frozen encoders a run holds: text encoder(s), VAE, and in stage 2 ViT-H/14."""
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    with torch.device("meta"):
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **SD_VAE
        )
        models = [CLIPTextModel(CLIPTextConfig(**CLIP_VOCAB, **CLIP_L_TEXT)), vae]
        if backbone == "sdxl":
            models.append(CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_VOCAB, **BIGG_TEXT)))
        if stage == 2:
            models.append(CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H14_VISION)))
    return sum(_count(model.parameters()) for model in models)


def count_trainable(config: TrainConfig, unet_config: dict) -> tuple[int, int]:
    """``(UNet parameters, trainable parameters)`` of a run: the whole UNet, its LoRA layers, the adapter
    (stage 2), built on the meta device from ``unet_config`` and the config's LoRA and adapter sections."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    total = _count(unet.parameters())
    mode = unet_training_mode(config)
    trainable = total if mode == UnetTraining.full else 0
    if mode == UnetTraining.lora:
        from peft import LoraConfig

        lora = config.model.lora
        unet.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules)))
        trainable += _count(p for name, p in unet.named_parameters() if "lora_" in name)
    if config.run.stage == 2:
        section = config.model.adapter
        width = section.image_embed_dim or VIT_H_FEATURES[section.feature_type]
        with torch.device("meta"):
            install_reference_adapter(unet, section.adapter_config(width))
        trainable += _count(adapter_parameters(unet))
    return total, trainable


def estimate_memory(
    config: TrainConfig, unet_config: dict, backbone: str, num_gpus: int = 1, zero2: bool = False
) -> MemoryEstimate:
    """Static memory per GPU of ``config`` on the UNet ``unet_config`` (``backbone`` ``"sd"`` / ``"sdxl"``).

    Without ZeRO: frozen weights in the compute precision; trainable weights, gradients in float32, AdamW's
    moments (8 bytes, or 2 with 8-bit AdamW), EMA (4). ZeRO-2 in bf16/fp16: every weight in the compute
    precision on each GPU; the float32 master weights, moments and gradients split over ``num_gpus``.
    """
    unet_parameters, trainable = count_trainable(config, unet_config)
    frozen_unet = 0 if unet_training_mode(config) == UnetTraining.full else unet_parameters
    frozen = frozen_unet + frozen_encoder_parameters(backbone, config.run.stage)
    compute = BYTES[str(config.train.mixed_precision)]
    moments = 2 if str(config.optim.use_8bit_adam) == "yes" else 8
    if zero2:
        weights = (frozen + trainable) * compute
        gradients = trainable * 4 / num_gpus
        optimizer = trainable * (moments + (4 if compute < 4 else 0)) / num_gpus
    else:
        weights = frozen * compute + trainable * 4
        gradients = trainable * 4
        optimizer = trainable * moments
    ema = trainable * 4 if config.train.ema.enabled else 0
    total = weights + gradients + optimizer + ema
    return MemoryEstimate(
        unet_parameters=unet_parameters, trainable_parameters=trainable, frozen_parameters=frozen,
        weights_gib=weights / GIB, gradients_gib=gradients / GIB, optimizer_gib=optimizer / GIB,
        ema_gib=ema / GIB, total_gib=total / GIB, num_gpus=num_gpus, zero2=zero2,
    )  # fmt: skip
