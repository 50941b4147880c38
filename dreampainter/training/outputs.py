"""What a finished run leaves behind: a pipeline folder, the adapter (ours + IP-Adapter layout), LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers import SchedulerMixin

from dreampainter.errors import InvalidInputError
from dreampainter.models import export_ip_adapter, has_reference_adapter, save_adapter
from dreampainter.training.components import TrainingComponents
from dreampainter.training.config import TrainConfig

logger = logging.getLogger(__name__)


def _inference_scheduler(folder: Path) -> SchedulerMixin:
    import json

    import diffusers

    config = json.loads((folder / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, config.get("_class_name", "DDIMScheduler"), diffusers.DDIMScheduler)
    return scheduler_class.from_pretrained(str(folder))


def build_pipeline(parts: TrainingComponents, unet):
    """A DreamPainterPipeline over the run's current components (shares their weights; no copies)."""
    from dreampainter.pipelines import DreamPainterPipeline

    encoder = parts.reference_encoder if has_reference_adapter(unet) or parts.reference_encoder else None
    return DreamPainterPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=unet,
        scheduler=_inference_scheduler(parts.scheduler_folder),
        reference_encoder=encoder,
        text_encoder_2=parts.text_encoder_2,
        tokenizer_2=parts.tokenizer_2,
    )


def _merge_lora(unet, output_dir: Path) -> None:
    """Save the LoRA weights on their own, then fuse them so ``unet/`` is a plain diffusers UNet."""
    if not getattr(unet, "peft_config", None):
        return
    unet.save_lora_adapter(str(output_dir / "lora"))
    unet.fuse_lora()
    unet.unload_lora()


def _restore_master_weights(accelerator: Accelerator, trainable) -> None:
    """DeepSpeed fp16/bf16 keeps only a half-precision copy in the module and the fp32 master weights in its
    (ZeRO-partitioned) optimizer: put the gathered masters back before saving. Every rank must call this."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    from deepspeed.utils import safe_get_full_fp32_param

    for param in trainable:
        master = safe_get_full_fp32_param(param)
        if master is not None:
            param.data = master.to(param.device)


def _is_half(module) -> bool:
    return module is not None and any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters())


def _restore_frozen_precision(config: TrainConfig, parts: TrainingComponents, unet) -> TrainingComponents:
    """fp16/bf16 runs cast the frozen weights (VAE, text and image encoders, the frozen UNet) to half precision
    for speed; the saved pipeline must hold the originals, not rounded copies. Reload them from
    ``model.pretrained`` in float32: the encoders whole, and every frozen half-precision UNet parameter by name
    (LoRA's wrapped ``base_layer`` included), before any LoRA is fused."""
    if not any(_is_half(m) for m in (*parts.frozen_encoders(), unet)):
        return parts
    from dataclasses import replace

    from dreampainter.training.components import load_components

    original = load_components(config)
    weights = original.unet.state_dict()
    with torch.no_grad():
        for name, param in unet.named_parameters():
            key = name.replace(".base_layer.", ".")
            if param.requires_grad or param.dtype == torch.float32 or key not in weights:
                continue
            if weights[key].shape == param.shape:
                param.data = weights[key].to(device=param.device, dtype=torch.float32)
    return replace(
        parts, vae=original.vae, text_encoder=original.text_encoder, text_encoder_2=original.text_encoder_2,
        reference_encoder=original.reference_encoder,
    )


def save_outputs(config: TrainConfig, accelerator: Accelerator, parts: TrainingComponents, unet, ema, trainable, output_dir: Path):
    """Final weights (EMA when enabled) -> ``pipeline/``, ``adapter/``, ``ip_adapter.safetensors``, ``lora/``."""
    accelerator.wait_for_everyone()
    _restore_master_weights(accelerator, trainable)
    pipeline_dir = output_dir / "pipeline"
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trainable)
        parts = _restore_frozen_precision(config, parts, unet)
        unet.to(torch.float32)
        _merge_lora(unet, output_dir)
        pipeline = build_pipeline(parts, unet)
        pipeline.to(torch.float32)
        pipeline.save_pretrained(str(pipeline_dir))
        if has_reference_adapter(unet):
            save_adapter(unet, output_dir / "adapter")
            try:
                export_ip_adapter(unet, output_dir / "ip_adapter.safetensors")
            except InvalidInputError as error:
                logger.warning("no IP-Adapter export: %s", error)
        accelerator.print(f"saved pipeline to {pipeline_dir}")
    accelerator.wait_for_everyone()
    return pipeline_dir
