"""Setting a run up: the accelerator, what trains, where the models live, optimizer, LR schedule, EMA.

Each piece is one function of the config, called by :func:`~dreampainter.training.trainer.train` in
this order (the order matters for the random initialisation of new weights and for resume):

    accelerator = build_accelerator(config, output_dir)
    trainable = mark_trainable(config, parts)             # after load_components
    unet = place_components(config, parts, device, weight_dtype)
    optimizer = build_optimizer(config, trainable, device)
    lr_scheduler = build_lr_scheduler(config, optimizer, accelerator.num_processes)
    ema = build_ema(config, trainable, device)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

from dreampainter.errors import InvalidInputError
from dreampainter.models import adapter_parameters, cast_frozen_unet
from dreampainter.training.components import TrainingComponents
from dreampainter.training.config import TrainConfig, unet_training_mode
from dreampainter.utils import use_cpu

logger = logging.getLogger(__name__)

SHARDED_PARAMS_UNSUPPORTED = (
    "this trainer needs every rank to hold the full weights (the final save, EMA, validation on the main "
    "process and the cross-rank weight check read them directly): use DeepSpeed ZeRO-2 "
    "(configs/accelerate/deepspeed_zero2.yaml, optimizer state and gradients sharded) or DDP (multi_gpu.yaml)"
)


def build_accelerator(config: TrainConfig, output_dir: Path) -> Accelerator:
    """The run's ``Accelerator``: device and process group, accumulation, precision, trackers, DeepSpeed.

    Refuses FSDP and DeepSpeed ZeRO-3 (they shard the weights, which the loop does not support).
    """
    accelerator = Accelerator(
        **_device_kwargs(),
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=config.train.mixed_precision,
        log_with=_trackers(config),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    _configure_deepspeed(accelerator, config)
    return accelerator


def _launched_with(kind: str) -> bool:
    """Whether ``accelerate launch`` was given a ``DEEPSPEED`` / ``FSDP`` config (it tells the processes by env)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def _device_kwargs() -> dict:
    """``Accelerator`` arguments that pick the device and process group.

    Without an accelerator, ``cpu=True`` runs the processes as gloo DDP. DeepSpeed on the CPU needs
    ``cpu=False`` instead (accelerate drops DeepSpeed when ``cpu=True``) and gloo named explicitly.
    FSDP shards the parameters themselves, which the loop does not support (on the CPU accelerate
    would even run it as plain DDP), so it is refused before anything starts.
    """
    if _launched_with("FSDP"):
        raise InvalidInputError(f"the accelerate config asks for FSDP: {SHARDED_PARAMS_UNSUPPORTED}")
    if not use_cpu():
        return {}
    if _launched_with("DEEPSPEED"):
        return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    return {"cpu": True}


def _configure_deepspeed(accelerator: Accelerator, config: TrainConfig) -> None:
    """The training config, not the DeepSpeed section of the launch config, sets batch, accumulation, clipping.

    The loader is not passed through ``prepare``, so DeepSpeed cannot read the batch size from it.
    """
    plugin = accelerator.state.deepspeed_plugin
    if accelerator.distributed_type != DistributedType.DEEPSPEED or plugin is None:
        return
    if plugin.zero_stage >= 3:
        raise InvalidInputError(f"the DeepSpeed config asks for ZeRO stage {plugin.zero_stage}: {SHARDED_PARAMS_UNSUPPORTED}")
    plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=config.train.batch_size,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        gradient_clipping=max(0.0, float(config.optim.max_grad_norm)),
    )


def _trackers(config: TrainConfig) -> str | None:
    """The tracker ``logging.report_to`` asks for, falling back to tensorboard, then to none, when not installed."""
    report_to = config.logging.report_to
    if report_to == "wandb" and config.logging.wandb_mode == "disabled":
        return None
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            logger.warning("wandb is not installed: logging to tensorboard instead")
            report_to = "tensorboard"
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logger.warning("tensorboard is not installed: metrics are only printed")
            return None
    return None if report_to == "none" else report_to


def mark_trainable(config: TrainConfig, parts: TrainingComponents) -> list[torch.nn.Parameter]:
    """Freeze everything, then enable what this stage trains; returns the trainable parameters.

    Stage 1: the whole UNet (``full``) or LoRA layers added here (``lora``). Stage 2: the reference
    adapter (projection + every ``to_k_ref`` / ``to_v_ref``), plus LoRA layers when asked.
    """
    for module in parts.frozen_encoders():
        module.requires_grad_(False)
    unet = parts.unet
    mode = unet_training_mode(config)
    unet.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig

        lora = config.model.lora
        unet.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                init_lora_weights="gaussian",
                target_modules=list(lora.target_modules),
            )
        )
    if config.run.stage == 2:
        for param in adapter_parameters(unet):
            param.requires_grad_(True)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise InvalidInputError("nothing to train: check run.stage and model.unet_training")
    return trainable


def place_components(
    config: TrainConfig, parts: TrainingComponents, device: torch.device, weight_dtype: torch.dtype
) -> torch.nn.Module:
    """Frozen encoders to ``device`` in ``weight_dtype`` (eval mode); the UNet to ``device`` with its frozen
    weights cast (trainable ones stay fp32) and gradient checkpointing as configured. Returns the UNet."""
    for module in parts.frozen_encoders():
        module.to(device=device, dtype=weight_dtype).eval()
    unet = parts.unet.to(device)
    cast_frozen_unet(unet, weight_dtype)
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """AdamW over ``params`` as ``config.optim`` says; 8-bit (bitsandbytes) when asked or, on ``auto``, on CUDA."""
    optim = config.optim
    kwargs = dict(lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps)
    want_8bit = optim.use_8bit_adam == "yes" or (optim.use_8bit_adam == "auto" and device.type == "cuda")
    if want_8bit:
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, **kwargs)
        except ImportError:
            if optim.use_8bit_adam == "yes":
                raise InvalidInputError("optim.use_8bit_adam=yes needs bitsandbytes (pip install bitsandbytes)") from None
    return torch.optim.AdamW(params, **kwargs)


def build_lr_scheduler(
    config: TrainConfig, optimizer: torch.optim.Optimizer, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``optim.lr_scheduler`` with warm-up, in optimizer steps.

    Counts are multiplied by the number of processes: the prepared scheduler steps that many times
    per optimizer step.
    """
    return get_scheduler(
        config.optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.optim.warmup_steps * num_processes,
        num_training_steps=config.train.max_steps * num_processes,
    )


def build_ema(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> EMAModel | None:
    """An exponential moving average of ``params`` on ``device`` when ``train.ema.enabled``, else ``None``."""
    if not config.train.ema.enabled:
        return None
    ema = EMAModel(params, decay=config.train.ema.decay)
    ema.to(device)
    return ema
