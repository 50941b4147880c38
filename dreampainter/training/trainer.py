"""One accelerate training loop for both stages.

Stage 1 fine-tunes the inpainting UNet (fully or with LoRA) on product masks, text only. Stage 2
trains the reference adapter (projection + every ``to_k_ref`` / ``to_v_ref``) with the UNet frozen
(or LoRA), dropping text, reference or both as the loader's flags say. The loop reads top to bottom:
set up -> (resume) -> for each batch: loss, backward, step, EMA, log, checkpoint, validate -> save.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dreampainter.data.loading.loader import build_dataloader
from dreampainter.errors import DreamPainterError, InvalidInputError
from dreampainter.models import adapter_parameters, cast_frozen_unet, reference_features
from dreampainter.training import checkpointing
from dreampainter.training.cache import cached_step_inputs, is_cached_batch, open_latent_cache
from dreampainter.training.components import TrainingComponents, load_components
from dreampainter.training.config import TrainConfig, save_config, unet_training_mode
from dreampainter.training.outputs import save_outputs
from dreampainter.training.step import (
    StepInputs,
    condition_reference,
    diffusion_loss,
    drop_masks,
    encode_latent_distribution,
    encode_prompts,
    latent_mask,
    select_text,
)
from dreampainter.utils import atomic_write_json, mixed_precision_dtype, use_cpu
from dreampainter.utils.config import config_to_dict

logger = logging.getLogger(__name__)


class TrainingStoppedError(DreamPainterError):
    """The run cannot go on (e.g. the loss stayed NaN/inf)."""


@dataclass
class TrainState:
    """Where the run is, saved in every checkpoint so resume is exact (the same on every rank)."""

    global_step: int = 0
    epoch: int = 0
    epoch_batches: int = 0  # batches each rank consumed in the current epoch
    skipped_steps: int = 0
    consecutive_bad_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_dict():
            setattr(self, key, int(state[key]))


@dataclass
class TrainResult:
    output_dir: Path
    pipeline_dir: Path | None
    global_step: int
    losses: list[float]
    skipped_steps: int
    skipped_samples: dict[str, int]
    seconds: float
    rank_checksums: list[float] = field(default_factory=list)  # of the trainable weights, one per rank


def _rank_checksums(accelerator: Accelerator, params: list[torch.nn.Parameter]) -> list[float]:
    """A float64 checksum of the trainable weights from every rank (they must all agree)."""
    checksum = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    for index, param in enumerate(params):
        checksum += param.detach().double().sum() * (1 + index % 7)
    return [float(value) for value in accelerator.gather(checksum).cpu()]


def _launched_with(kind: str) -> bool:
    """Whether ``accelerate launch`` was given a ``DEEPSPEED`` / ``FSDP`` config (it tells the processes by env)."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


SHARDED_PARAMS_UNSUPPORTED = (
    "this trainer needs every rank to hold the full weights (the final save, EMA, validation on the main "
    "process and the cross-rank weight check read them directly): use DeepSpeed ZeRO-2 "
    "(configs/accelerate/deepspeed_zero2.yaml, optimizer state and gradients sharded) or DDP (multi_gpu.yaml)"
)


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


def _mark_trainable(config: TrainConfig, parts: TrainingComponents) -> list[torch.nn.Parameter]:
    """Freeze everything, then enable what this stage trains; returns the trainable parameters."""
    for module in (parts.vae, parts.text_encoder, parts.reference_encoder):
        if module is not None:
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


def _optimizer(config: TrainConfig, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
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


def _prepare_inputs(batch: dict, parts: TrainingComponents, empty_embeds: torch.Tensor, stage: int, device) -> StepInputs:
    """Pixels -> latent distributions, latent-size mask, text embeddings, reference features."""
    if is_cached_batch(batch):  # data.cache: everything but the UNet was computed by cache-latents
        return cached_step_inputs(batch, stage, device)
    latent_mean, latent_std = encode_latent_distribution(parts.vae, batch["pixel_values"].to(device))
    masked_mean, masked_std = encode_latent_distribution(parts.vae, batch["masked_pixel_values"].to(device))
    drop_text, drop_reference = drop_masks(batch, stage)
    text = select_text(encode_prompts(parts.tokenizer, parts.text_encoder, list(batch["prompt"])), empty_embeds, drop_text)
    features = None
    if stage == 2:
        with torch.no_grad():
            encoded = parts.reference_encoder(batch["reference_pixel_values"].to(device))
        features = condition_reference(
            reference_features(encoded, parts.unet.reference_adapter_config).float(), drop_reference
        )
    return StepInputs(
        latent_mean.float(),
        latent_std.float(),
        masked_mean.float(),
        masked_std.float(),
        latent_mask(batch["mask"].to(device), tuple(latent_mean.shape[-2:])),
        text,
        features,
    )


def _flat_hparams(config: TrainConfig) -> dict:
    """``{"optim.lr": 1e-4, ...}`` with scalar values only (what tensorboard's hparams accept)."""
    flat = {}

    def visit(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                visit(value, f"{name}.")
            else:
                flat[name] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit(config_to_dict(config), "")
    return flat


def _all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.gather(finite).min() > 0)


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage as ``config`` describes (see ``configs/`` and ``docs/training.md``)."""
    started = time.perf_counter()
    output_dir = Path(config.run.output_dir)
    accelerator = Accelerator(
        **_device_kwargs(),
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        mixed_precision=config.train.mixed_precision,
        log_with=_trackers(config),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    _configure_deepspeed(accelerator, config)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(output_dir)
        save_config(config, output_dir / "config.yaml")
    set_seed(config.run.seed)  # identical initialisation of new weights on every rank
    if config.train.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    parts = load_components(config)
    stage, device = config.run.stage, accelerator.device
    weight_dtype = mixed_precision_dtype(config.train.mixed_precision)
    # DeepSpeed runs fp16/bf16 by casting the whole UNet (fp32 master weights live in its optimizer) and
    # accelerate's autocast is off, so the UNet's inputs must be cast; elsewhere autocast does it.
    input_dtype = weight_dtype if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    trainable = _mark_trainable(config, parts)
    for module in (parts.vae, parts.text_encoder, parts.reference_encoder):
        if module is not None:
            module.to(device=device, dtype=weight_dtype).eval()
    unet = parts.unet.to(device)
    cast_frozen_unet(unet, weight_dtype)
    if config.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    empty_embeds = encode_prompts(parts.tokenizer, parts.text_encoder, [""])

    optimizer = _optimizer(config, trainable, device)
    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.optim.warmup_steps * accelerator.num_processes,
        num_training_steps=config.train.max_steps * accelerator.num_processes,
    )
    ema = None
    if config.train.ema.enabled:
        ema = EMAModel(trainable, decay=config.train.ema.decay)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    # This rank's noise / timestep / latent-sampling draws; checkpointed per rank.
    generator = torch.Generator().manual_seed(config.run.seed * 1000 + accelerator.process_index)

    resume = checkpointing.resolve_resume(output_dir, config.checkpoint.resume_from_checkpoint)
    if resume is not None:
        accelerator.load_state(str(resume))
        generator.set_state(checkpointing.load_rank_state(resume, accelerator.process_index)["generator"])
        accelerator.print(f"resumed from {resume} at step {state.global_step} (epoch {state.epoch})")
    if accelerator.is_main_process and accelerator.trackers is not None:
        init_kwargs = {"wandb": {"mode": config.logging.wandb_mode, "dir": str(output_dir)}}
        accelerator.init_trackers(config.logging.project, _flat_hparams(config), init_kwargs)

    validation = _Validator(config, parts, accelerator, output_dir)
    loader_config = config.data.loader
    latent_cache = open_latent_cache(config, parts, loader_config) if config.data.cache else None
    progress = tqdm(
        total=config.train.max_steps, initial=state.global_step, desc=f"stage {stage}",
        disable=not accelerator.is_local_main_process, dynamic_ncols=True,
    )
    losses: list[float] = []
    window_start, window_samples = time.perf_counter(), 0
    batch_size = config.train.batch_size
    loader = None
    key_log = None
    if config.logging.sample_keys:
        (output_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
        key_log = open(output_dir / "sample_keys" / f"rank-{accelerator.process_index}.txt", "a")  # noqa: SIM115
    while state.global_step < config.train.max_steps:
        if latent_cache is not None:
            loader = latent_cache.dataloader(
                loader_config, batch_size=batch_size, rank=accelerator.process_index,
                world_size=accelerator.num_processes, epoch=state.epoch, seed=config.run.seed,
                resume_samples=state.epoch_batches * batch_size, with_reference=stage == 2,
            )
        else:
            loader = build_dataloader(
                config.data.train, loader_config, batch_size=batch_size, rank=accelerator.process_index,
                world_size=accelerator.num_processes, num_workers=config.data.num_workers, epoch=state.epoch,
                seed=config.run.seed, resume_samples=state.epoch_batches * batch_size,
            )
        for batch in loader:
            state.epoch_batches += 1
            if key_log is not None:
                key_log.write("\n".join(batch["key"]) + "\n")
            with accelerator.accumulate(unet):
                inputs = _prepare_inputs(batch, parts, empty_embeds, stage, device)
                with accelerator.autocast():
                    loss = diffusion_loss(
                        unet, parts.noise_scheduler, inputs, generator,
                        snr_gamma=config.train.snr_gamma, noise_offset=config.train.noise_offset, dtype=input_dtype,
                    )
                if not _all_finite(accelerator, loss):
                    optimizer.zero_grad(set_to_none=True)
                    state.skipped_steps += 1
                    state.consecutive_bad_steps += 1
                    if state.consecutive_bad_steps >= config.train.max_consecutive_bad_steps:
                        raise TrainingStoppedError(
                            f"loss was NaN/inf for {state.consecutive_bad_steps} steps in a row at step "
                            f"{state.global_step}: lower optim.lr, use bf16 instead of fp16, or check the data"
                        )
                    continue
                state.consecutive_bad_steps = 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.optim.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window_samples += batch_size * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            if ema is not None:
                ema.step(trainable)
            losses.append(float(loss.detach()))
            progress.update(1)
            if state.global_step % config.logging.every_steps == 0 or state.global_step == config.train.max_steps:
                rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_samples = time.perf_counter(), 0
                logs = {
                    "loss": losses[-1], "lr": lr_scheduler.get_last_lr()[0], "samples_per_s": rate,
                    "skipped_steps": state.skipped_steps, "skipped_samples": loader.skips.total,
                }
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", sps=f"{rate:.1f}")
                accelerator.log(logs, step=state.global_step)
            if config.checkpoint.every_steps > 0 and state.global_step % config.checkpoint.every_steps == 0:
                checkpointing.save_checkpoint(
                    accelerator, output_dir, state.global_step, config.checkpoint.keep_last,
                    rank_state={"generator": generator.get_state()},
                )
            validation.maybe_run(state.global_step, unet, ema, trainable)
            if state.global_step >= config.train.max_steps:
                break
        else:
            state.epoch += 1
            state.epoch_batches = 0
    progress.close()
    if key_log is not None:
        key_log.close()
    checksums = _rank_checksums(accelerator, trainable)
    if len(set(checksums)) > 1:
        raise TrainingStoppedError(f"ranks hold different weights after training (checksums {checksums})")

    validation.maybe_run(state.global_step, unet, ema, trainable, final=True)
    pipeline_dir = save_outputs(config, accelerator, parts, unet, ema, trainable, output_dir)
    accelerator.end_training()
    skipped = loader.skips.as_dict() if loader is not None else {}
    result = TrainResult(
        output_dir, pipeline_dir, state.global_step, losses, state.skipped_steps, skipped,
        time.perf_counter() - started, checksums,
    )
    if accelerator.is_main_process:
        _write_summary(result, accelerator.num_processes)
    return result


def _write_summary(result: TrainResult, num_processes: int) -> None:
    summary = {
        "global_step": result.global_step,
        "seconds": round(result.seconds, 2),
        "num_processes": num_processes,
        "final_loss": result.losses[-1] if result.losses else None,
        "mean_loss_last_10": sum(result.losses[-10:]) / max(1, len(result.losses[-10:])),
        "skipped_steps": result.skipped_steps,
        "skipped_samples": result.skipped_samples,
        "rank_checksums": result.rank_checksums,
    }
    atomic_write_json(result.output_dir / "train_summary.json", summary)


class _Validator:
    """Every ``validation.every_steps`` (and at the end), a grid on fixed samples, on the main process."""

    def __init__(self, config: TrainConfig, parts: TrainingComponents, accelerator: Accelerator, output_dir: Path):
        self.config, self.parts, self.accelerator = config, parts, accelerator
        self.folder = output_dir / "validation"
        self.samples = None
        self.last_step = -1

    def maybe_run(self, step: int, unet, ema, trainable, final: bool = False) -> None:
        every = self.config.validation.every_steps
        due = final or (every > 0 and step % every == 0)
        if not due or step == self.last_step or self.config.validation.num_samples <= 0:
            return
        self.last_step = step
        if self.accelerator.is_main_process:
            self._run(step, unet, ema, trainable)
        self.accelerator.wait_for_everyone()

    def _run(self, step: int, unet, ema, trainable) -> None:
        from dreampainter.training.outputs import build_pipeline
        from dreampainter.training.validation import read_validation_samples, save_grid, validation_grid

        if self.samples is None:
            source = self.config.data.validation or self.config.data.train
            self.samples = read_validation_samples(source, self.config.validation.num_samples)
        if not self.samples:
            return
        if ema is not None:
            ema.store(trainable)
            ema.copy_to(trainable)
        try:
            pipeline = build_pipeline(self.parts, self.accelerator.unwrap_model(unet))
            grid = validation_grid(pipeline, self.samples, self.config.validation, list(self.config.validation.prompts))
        finally:
            if ema is not None:
                ema.restore(trainable)
        path = save_grid(grid, self.folder, step)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid)}, step=step)
        logger.info("validation grid: %s", path)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (for planning ``max_steps``)."""
    return max(1, math.floor(num_samples / (batch_size * world_size * accumulation)))
