"""File-to-file generation: one job = one product photo (+ mask, prompt, reference) -> result images + a grid.

Used by ``dreampainter generate``; jobs come from arguments or a JSONL file (one JSON object a line).
Every job is checked before any image is generated, so a typo on line 50 fails at once, not after 49.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.pipelines.guidance import check_guidance_scale
from dreampainter.pipelines.image_processing import (
    ProductInput,
    prepare_product_input,
    to_pil_image,
)
from dreampainter.utils.grid import image_grid

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class GenerationJob:
    """One generation request; paths are files, numbers are checked by :meth:`validate`."""

    image: str
    prompt: str
    mask: str | None = None
    reference: str | None = None
    negative_prompt: str | None = None
    steps: int = 30
    seed: int = 0
    text_guidance: float = 7.5
    reference_guidance: float | None = None
    reference_scale: float | None = None
    num: int = 1
    name: str | None = None
    settings: dict = field(
        default_factory=dict
    )  # pipeline keywords shared by all jobs (resolution, feather, ...)

    def validate(self, where: str = "") -> GenerationJob:
        """Check files exist and numbers are sane; raise a one-line error prefixed with ``where``."""
        prefix = f"{where}: " if where else ""
        if not isinstance(self.prompt, str):
            raise InvalidInputError(f"{prefix}prompt: must be a string, got {self.prompt!r}")
        for label, path in (("image", self.image), ("mask", self.mask), ("reference", self.reference)):
            if path is not None and not os.path.isfile(path):
                raise MissingFileError(f"{prefix}{label}: file not found: {path}")
        for label in ("steps", "num"):
            value = getattr(self, label)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidInputError(f"{prefix}{label}: must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidInputError(f"{prefix}seed: must be an integer, got {self.seed!r}")
        try:
            check_guidance_scale(self.text_guidance, "text guidance")
            if self.reference_guidance is not None:
                check_guidance_scale(self.reference_guidance, "reference guidance")
            if self.reference_scale is not None:
                check_guidance_scale(self.reference_scale, "reference scale")
        except InvalidInputError as error:
            raise InvalidInputError(f"{prefix}{error}") from None
        return self

    @property
    def stem(self) -> str:
        return self.name or Path(self.image).stem


def read_jobs(path: str | os.PathLike, defaults: dict | None = None) -> list[GenerationJob]:
    """Jobs from a JSONL file; relative paths are relative to the file; ``defaults`` fill missing keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"--batch: file not found: {path}")
    known = {f.name for f in fields(GenerationJob)} - {"settings"}
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
        unknown = sorted(set(record) - known)
        if unknown:
            raise InvalidInputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        missing = [key for key in ("image", "prompt") if key not in record]
        if missing:
            raise InvalidInputError(f"{where}: missing key(s) {missing}")
        for key in ("image", "mask", "reference"):
            if record.get(key) is not None:
                record[key] = str(path.parent / record[key])
        jobs.append(GenerationJob(**{**(defaults or {}), **record}).validate(where))
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
    max_pixels = job.settings.get("max_pixels")
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
    settings = dict(job.settings)
    product, reference = load_job_inputs(job)
    generator = torch.Generator(device=device).manual_seed(job.seed)
    output = pipe(
        prompt=job.prompt,
        image=product.image,
        product_mask=product.product_mask,
        reference_image=reference,
        negative_prompt=job.negative_prompt,
        text_guidance_scale=job.text_guidance,
        reference_guidance_scale=job.reference_guidance,
        reference_scale=job.reference_scale,
        num_inference_steps=job.steps,
        num_images_per_prompt=job.num,
        generator=generator,
        **settings,
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
