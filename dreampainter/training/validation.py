"""Validation grids: fixed samples, prompts, references and seeds -> one PNG per evaluation point.

Each row shows photo | inpainting mask | reference | result, so progress on both conditions is visible.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.format import find_photo_suffix, find_reference_suffix, parse_meta
from dreampainter.data.shards.sources import open_shard, resolve_shards
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.pipelines.settings import GenerationSettings


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


def _tile(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.convert("RGB").resize(size, Image.Resampling.BICUBIC)


def make_grid(rows: list[list[Image.Image]], cell: int = 128) -> Image.Image:
    """Rows of images, each cell resized to ``cell`` x ``cell``."""
    columns = max(len(row) for row in rows)
    grid = Image.new("RGB", (columns * cell, len(rows) * cell), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(_tile(image, (cell, cell)), (c * cell, r * cell))
    return grid


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
    return make_grid(rows)


def save_grid(grid: Image.Image, folder: str | Path, step: int) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:07d}.png"
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path
