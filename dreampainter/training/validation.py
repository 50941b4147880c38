"""Validation grids: fixed samples, prompts, references and seeds -> one PNG per evaluation point.

Each row shows photo | inpainting mask | reference | result, so progress on both conditions is visible.
:class:`Validator` makes them during training (on the main process, with the EMA weights when enabled).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.format import find_photo_suffix, find_reference_suffix, parse_meta
from dreampainter.data.shards.sources import open_shard, resolve_shards
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.training.components import TrainingComponents
from dreampainter.training.config import TrainConfig
from dreampainter.training.outputs import build_pipeline
from dreampainter.utils.grid import image_grid

logger = logging.getLogger(__name__)


@dataclass
class ValidationSample:
    key: str
    photo: Image.Image
    product_mask: np.ndarray  # uint8, 255 = product
    reference: Image.Image
    prompt: str


def read_validation_samples(source: str, num: int) -> list[ValidationSample]:
    """The first ``num`` readable samples of a shard set (in shard order: fixed across the run)."""
    samples: list[ValidationSample] = []
    for url in resolve_shards(source).urls:
        with open_shard(url) as handle:
            for key, members in iter_tar_samples(handle):
                try:
                    photo = load_image(members[find_photo_suffix(members)], f"{key} photo")
                    mask = load_mask(members["mask.png"], f"{key} mask")
                    reference = load_image(members[find_reference_suffix(members)], f"{key} reference")
                    prompt = parse_meta(key, members["json"]).get("prompt", "")
                except Exception:  # noqa: BLE001 - a bad sample is simply not shown
                    continue
                samples.append(ValidationSample(key, photo, mask, reference, prompt))
                if len(samples) == num:
                    return samples
    return samples


@torch.no_grad()
def validation_grid(
    pipeline, samples: list[ValidationSample], config: GenerationSettings, prompts: list[str] | None = None
) -> Image.Image:
    """Generate one result per sample (seed ``config.seed + row``) with ``config``'s settings; the grid."""
    rows = []
    for i, sample in enumerate(samples):
        prompt = prompts[i % len(prompts)] if prompts else sample.prompt
        generator = torch.Generator().manual_seed(config.seed + i)
        reference = sample.reference if pipeline.has_reference_adapter else None
        result = pipeline(
            prompt=prompt,
            image=sample.photo,
            product_mask=sample.product_mask,
            reference_image=reference,
            generator=generator,
            **config.pipeline_kwargs(),
        ).images[0]
        mask = Image.fromarray(255 - sample.product_mask)  # the inpainting mask: white = repaint
        rows.append([sample.photo, mask, sample.reference, result])
    return image_grid(rows)


def save_grid(grid: Image.Image, folder: str | Path, step: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


class Validator:
    """Every ``validation.every_steps`` (and at the end), a grid on fixed samples, on the main process."""

    def __init__(self, config: TrainConfig, parts: TrainingComponents, accelerator: Accelerator, output_dir: Path):
        self.config, self.parts, self.accelerator = config, parts, accelerator
        self.folder = output_dir / "validation"
        self.samples = None
        self.last_step = -1

    def maybe_run(self, step: int, unet, ema, trainable, final: bool = False) -> None:
        """Make step ``step``'s grid when due (or ``final``); every rank calls this and waits for the main one."""
        every = self.config.validation.every_steps
        due = final or (every > 0 and step % every == 0)
        if not due or step == self.last_step or self.config.validation.num_samples <= 0:
            return
        self.last_step = step
        if self.accelerator.is_main_process:
            self._run(step, unet, ema, trainable)
        self.accelerator.wait_for_everyone()

    def _run(self, step: int, unet, ema, trainable) -> None:
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
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid)}, step=step)
        logger.info("validation grid: %s", path)
