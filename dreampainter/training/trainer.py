"""One accelerate training loop for both stages.

Stage 1 fine-tunes the inpainting UNet (fully or with LoRA) on product masks, text only. Stage 2
trains the reference adapter (projection + every ``to_k_ref`` / ``to_v_ref``) with the UNet frozen
(or LoRA), dropping text, reference or both as the loader's flags say. :func:`train` reads top to
bottom: set up -> (resume) -> for each batch: step, EMA, log, checkpoint, validate -> save. The
pieces are public, in small modules:

- :mod:`~dreampainter.training.setup`: accelerator, trainable parameters, placement, optimizer, LR schedule, EMA;
- :mod:`~dreampainter.training.checkpointing`: :class:`TrainState`, atomic checkpoints, resume;
- :mod:`~dreampainter.training.inputs` and :mod:`~dreampainter.training.step`: a batch -> ``StepInputs`` -> loss;
- :mod:`~dreampainter.training.update`: one step (NaN/inf skip, backward, clip, optimizer step);
- :mod:`~dreampainter.training.progress`, :mod:`~dreampainter.training.validation`: logs and grids;
- :mod:`~dreampainter.training.outputs`: the final pipeline, adapter and LoRA.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from dreampainter.data.loading.loader import DreamEcomLoader, LoaderConfig, build_dataloader
from dreampainter.training import checkpointing
from dreampainter.training.cache import CachedLoader, LatentCache, open_latent_cache
from dreampainter.training.checkpointing import TrainState
from dreampainter.training.components import load_components
from dreampainter.training.config import TrainConfig, save_config
from dreampainter.training.in_context import add_in_context_inputs
from dreampainter.training.inputs import prepare_inputs
from dreampainter.training.outputs import save_outputs
from dreampainter.training.progress import ProgressLog
from dreampainter.training.setup import (
    build_accelerator,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    mark_trainable,
    place_components,
)
from dreampainter.training.step import diffusion_loss, empty_text
from dreampainter.training.update import TrainingStoppedError, train_step
from dreampainter.training.validation import Validator
from dreampainter.utils import atomic_write_json, mixed_precision_dtype
from dreampainter.utils.config import config_to_dict

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What :func:`train` returns (the main numbers are also in ``<output_dir>/train_summary.json``)."""

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


def train(config: TrainConfig) -> TrainResult:
    """Run one training stage as ``config`` describes (see ``configs/`` and ``docs/training.md``)."""
    # Set up: the run folder, seeds, models, what trains, optimizer, schedule, EMA, the checkpointed state.
    started = time.perf_counter()
    output_dir = Path(config.run.output_dir)
    accelerator = build_accelerator(config, output_dir)
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
    trainable = mark_trainable(config, parts)
    unet = place_components(config, parts, device, weight_dtype)
    empty_embeds = empty_text(parts)
    optimizer = build_optimizer(config, trainable, device)
    lr_scheduler = build_lr_scheduler(config, optimizer, accelerator.num_processes)
    ema = build_ema(config, trainable, device)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    # This rank's noise / timestep / latent-sampling draws; checkpointed per rank.
    generator = torch.Generator().manual_seed(config.run.seed * 1000 + accelerator.process_index)

    # Resume (checkpoint.resume_from_checkpoint), then start the trackers.
    resumed = checkpointing.resume(accelerator, output_dir, config.checkpoint.resume_from_checkpoint, generator)
    if resumed is not None:
        accelerator.print(f"resumed from {resumed} at step {state.global_step} (epoch {state.epoch})")
    if accelerator.is_main_process and accelerator.trackers is not None:
        init_kwargs = {"wandb": {"mode": config.logging.wandb_mode, "dir": str(output_dir)}}
        accelerator.init_trackers(config.logging.project, _flat_hparams(config), init_kwargs)

    # Train: for each batch, step; on each optimizer step, EMA, log, checkpoint, validate.
    def compute_loss(batch: dict) -> torch.Tensor:
        inputs = prepare_inputs(batch, parts, empty_embeds, stage, device)
        inputs = add_in_context_inputs(inputs, batch, parts, config.data.loader, stage, device)  # in-context modes
        with accelerator.autocast():
            return diffusion_loss(
                unet, parts.noise_scheduler, inputs, generator,
                snr_gamma=config.train.snr_gamma, noise_offset=config.train.noise_offset, dtype=input_dtype,
            )

    validation = Validator(config, parts, accelerator, output_dir)
    loader_config = config.data.loader
    latent_cache = open_latent_cache(config, parts, loader_config) if config.data.cache else None
    progress = ProgressLog(accelerator, config, state.global_step)
    losses: list[float] = []
    loader = None
    key_log = None
    if config.logging.sample_keys:
        (output_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
        key_log = open(output_dir / "sample_keys" / f"rank-{accelerator.process_index}.txt", "a")  # noqa: SIM115
    while state.global_step < config.train.max_steps:
        loader = epoch_loader(config, loader_config, latent_cache, accelerator, state)
        for batch in loader:
            state.epoch_batches += 1
            if key_log is not None:
                key_log.write("\n".join(batch["key"]) + "\n")
            loss = train_step(accelerator, unet, optimizer, lr_scheduler, trainable, compute_loss, batch, state, config)
            if loss is None:  # not finite on some rank: skipped everywhere
                continue
            progress.count_samples(config.train.batch_size * accelerator.num_processes)
            if not accelerator.sync_gradients:  # accumulating
                continue
            state.global_step += 1
            if ema is not None:
                ema.step(trainable)
            losses.append(float(loss.detach()))
            progress.step(state.global_step, losses[-1], lr_scheduler.get_last_lr()[0], state.skipped_steps, loader.skips.total)
            if config.checkpoint.every_steps > 0 and state.global_step % config.checkpoint.every_steps == 0:
                checkpointing.save_checkpoint(
                    accelerator, output_dir, state.global_step, config.checkpoint.keep_last, generator
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

    # Save: the final grid, the pipeline / adapter / LoRA, the summary.
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


def epoch_loader(
    config: TrainConfig,
    loader_config: LoaderConfig,
    latent_cache: LatentCache | None,
    accelerator: Accelerator,
    state: TrainState,
) -> DreamEcomLoader | CachedLoader:
    """This rank's batches for ``state.epoch``, from the latent cache or the shards, skipping the
    ``state.epoch_batches`` already trained on (exact resume mid-epoch)."""
    batch_size = config.train.batch_size
    if latent_cache is not None:
        return latent_cache.dataloader(
            loader_config, batch_size=batch_size, rank=accelerator.process_index,
            world_size=accelerator.num_processes, epoch=state.epoch, seed=config.run.seed,
            resume_samples=state.epoch_batches * batch_size, with_reference=config.run.stage == 2,
        )
    return build_dataloader(
        config.data.train, loader_config, batch_size=batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=config.data.num_workers, epoch=state.epoch,
        seed=config.run.seed, resume_samples=state.epoch_batches * batch_size,
    )


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


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int, accumulation: int) -> int:
    """Optimizer steps in one epoch (for planning ``max_steps``)."""
    return max(1, math.floor(num_samples / (batch_size * world_size * accumulation)))
