"""File-to-file generation: one job = one product photo (+ mask, prompt, reference) -> result images + a grid.

Used by ``dreampainter generate``; jobs come from arguments or a JSONL file (one JSON object a line).
Every job is checked before any image is generated, so a typo on line 50 fails at once, not after 49.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.pipelines.image_processing import (
    ProductInput,
    prepare_product_input,
    to_pil_image,
)
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.utils.config import check_int, config_from_dict, config_to_dict
from dreampainter.utils.grid import image_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class JobSettings(GenerationSettings):
    """What every job of a ``dreampainter generate`` call shares unless its JSONL line says otherwise."""

    num: int = 1  # images per job (num_images_per_prompt)
    paste_product: bool = True
    max_pixels: int | None = None  # refuse input images above this many pixels

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.num, "num", 1)
        check_int(self.max_pixels, "max_pixels", 1, optional=True)

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {
            **super().pipeline_kwargs(),
            "num_images_per_prompt": self.num,
            "paste_product": self.paste_product,
            "max_pixels": self.max_pixels,
        }


@dataclass(kw_only=True)
class GenerationJob(JobSettings):
    """One generation request (one JSONL line): input files, prompt, and the generation settings.

    Numbers are checked on construction; :meth:`validate` checks that the files exist.
    """

    image: str
    prompt: str
    prompt_2: str | None = None  # SDXL's second text encoder (default: prompt)
    mask: str | None = None
    reference: str | None = None
    name: str | None = None

    def validate(self, where: str = "") -> GenerationJob:
        """Check the files exist; raise a one-line error prefixed with ``where``."""
        prefix = f"{where}: " if where else ""
        for label, path in (("image", self.image), ("mask", self.mask), ("reference", self.reference)):
            if path is not None and not os.path.isfile(path):
                raise MissingFileError(f"{prefix}{label}: file not found: {path}")
        return self

    @property
    def stem(self) -> str:
        return self.name or Path(self.image).stem


def read_jobs(path: str | os.PathLike, defaults: JobSettings | None = None) -> list[GenerationJob]:
    """Jobs from a JSONL file; relative paths are relative to the file; ``defaults`` fill missing keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--batch: file not found: {path}")
    shared = config_to_dict(defaults or JobSettings())
    jobs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InvalidInputError(f"{where}: invalid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise InvalidInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for key in ("image", "mask", "reference"):
            if isinstance(record.get(key), str):
                record[key] = str(path.parent / record[key])
        jobs.append(config_from_dict(GenerationJob, {**shared, **record}, where).validate(where))
    if not jobs:
        raise InvalidInputError(f"{path}: no jobs in the file")
    names = [job.stem for job in jobs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidInputError(
            f"{path}: several jobs would write the same files {duplicates}; give them a 'name'"
        )
    return jobs


def output_paths(out: str | os.PathLike, stem: str, num: int) -> tuple[list[Path], Path]:
    """Result paths and the grid path: ``out`` is an image file (single job) or a folder."""
    out = Path(out)
    if out.suffix.lower() in IMAGE_SUFFIXES:
        results = [out] if num == 1 else [out.with_name(f"{out.stem}_{k}{out.suffix}") for k in range(num)]
        return results, out.with_name(f"{out.stem}_grid.png")
    return [out / f"{stem}_{k}.png" for k in range(num)], out / f"{stem}_grid.png"


def load_job_inputs(job: GenerationJob) -> tuple[ProductInput, Image.Image | None]:
    """Decode and check the job's photo, mask and reference (errors name the files)."""
    max_pixels = job.max_pixels
    product = prepare_product_input(
        job.image, job.mask, name=job.image, mask_name=job.mask or "mask", max_pixels=max_pixels
    )
    reference = None
    if job.reference is not None:
        reference = to_pil_image(job.reference, job.reference, max_pixels=max_pixels)
    return product, reference


def check_job_inputs(jobs: list[GenerationJob]) -> None:
    """Decode every job's files once before any model is loaded, so bad files fail in seconds."""
    for job in jobs:
        load_job_inputs(job)


def run_job(
    pipe, job: GenerationJob, out: str | os.PathLike, device: torch.device | str = "cpu"
) -> list[Path]:
    """Generate ``job`` with ``pipe``; save the results and a grid (input, mask, reference, results)."""
    product, reference = load_job_inputs(job)
    generator = torch.Generator(device=device).manual_seed(job.seed)
    output = pipe(
        prompt=job.prompt,
        **({} if job.prompt_2 is None else {"prompt_2": job.prompt_2}),
        image=product.image,
        product_mask=product.product_mask,
        reference_image=reference,
        generator=generator,
        **job.pipeline_kwargs(),
    )
    results, grid_path = output_paths(out, job.stem, job.num)
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    for image, path in zip(output.images, results):
        image.save(path)
    mask_image = Image.fromarray(product.product_mask)
    tiles = [("input", product.image), ("product mask", mask_image), ("reference", reference)]
    tiles += [(f"result {k}", image) for k, image in enumerate(output.images)]
    image_grid([tiles], tile=min(256, max(product.image.size))).save(grid_path)
    return [*results, grid_path]


def run_jobs(
    pipe, jobs: list[GenerationJob], out: str | os.PathLike, device: torch.device | str = "cpu"
) -> list[Path]:
    """Run every job in order with one progress bar; returns the written files."""
    written = []
    show_inner = len(jobs) == 1
    pipe.set_progress_bar_config(disable=not show_inner)
    for job in tqdm(jobs, desc="generate", disable=show_inner):
        written += run_job(pipe, job, out, device)
    return written
