"""Background references with a diffusers inpainting pipeline: the dilated product region repainted.

The folder is a diffusers pipeline (``model_index.json``), loaded with ``AutoPipelineForInpainting``
(``StableDiffusionInpaintPipeline`` when the auto class does not know it), locally only and without the
safety checker. Each photo is resized so that its longer side is ``resolution`` (both sides multiples
of 8), repainted under the dilated mask from ``prompt``, resized back and composited: pixels outside the
dilated mask are the photo's own. Every image has its own generator seeded with ``seed``, so a photo's
reference does not depend on the batch it was in.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.utils import TORCH_DTYPES

from .common import (
    batches_by_key,
    check_dilation,
    check_masks,
    check_photos,
    check_positive,
    dilate,
    one_line,
    require_path,
    resolve_device,
)

HINT = (
    "download a diffusers inpainting pipeline folder, e.g. stable-diffusion-v1-5/stable-diffusion-inpainting "
    "(model_index.json and its component folders), and set path to it"
)


def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(height, width)`` with the longer side ``resolution``, both rounded to multiples of 8 (at least 8)."""
    scale = resolution / max(height, width)
    return tuple(max(8, int(round(side * scale / 8.0)) * 8) for side in (height, width))  # type: ignore[return-value]


class DiffusersInpaintReference:
    """``ReferenceMaker``: each photo with its dilated product region repainted by a diffusion model."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        prompt: str = "empty background, nothing",
        steps: int = 20,
        dilation: int = 16,
        seed: int = 0,
        resolution: int = 512,
        negative_prompt: str | None = None,
        guidance_scale: float = 7.5,
        dtype: str = "auto",
        batch_size: int = 4,
    ) -> None:
        folder = require_path(path, "diffusers inpainting pipeline", HINT, folder=True)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise MissingFileError(f"diffusers inpainting pipeline not found: {index_file} ({HINT})")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InvalidInputError(
                f"{index_file}: not a diffusers model_index.json ({one_line(error)})"
            ) from None
        if not isinstance(index, dict) or "_class_name" not in index:
            raise InvalidInputError(f"{index_file}: not a diffusers model_index.json (no _class_name)")
        self.device = resolve_device(device)
        self.prompt = str(prompt)
        self.negative_prompt = negative_prompt
        self.steps = check_positive("steps", steps)
        self.dilation = check_dilation(dilation)
        self.seed = int(seed)
        self.resolution = check_positive("resolution", resolution)
        if self.resolution % 8:
            raise InvalidInputError(f"resolution: expected a multiple of 8, got {resolution}")
        self.guidance_scale = float(guidance_scale)
        self.batch_size = check_positive("batch_size", batch_size)
        if dtype == "auto":
            self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        elif dtype in TORCH_DTYPES:
            self.dtype = TORCH_DTYPES[dtype]
        else:
            raise InvalidInputError(f"dtype: expected auto, {', '.join(TORCH_DTYPES)}; got {dtype!r}")
        extra = (
            {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        )
        self.pipe = self._load(folder, extra)
        self.pipe.to(self.device, self.dtype)
        self.pipe.set_progress_bar_config(disable=True)

    def _load(self, folder, extra: dict):
        from diffusers import AutoPipelineForInpainting, StableDiffusionInpaintPipeline

        options = dict(local_files_only=True, **extra)  # dtype: set by .to() (diffusers renamed the argument)
        try:
            try:
                return AutoPipelineForInpainting.from_pretrained(str(folder), **options)
            except ValueError:  # a pipeline class the auto mapping does not know: load it as SD inpainting
                return StableDiffusionInpaintPipeline.from_pretrained(str(folder), **options)
        except OSError as error:
            raise MissingFileError(
                f"diffusers inpainting pipeline incomplete: {folder} ({one_line(error)}; {HINT})"
            ) from None
        except (ValueError, TypeError, RuntimeError, KeyError) as error:
            raise InvalidInputError(
                f"{folder}: not a loadable diffusers inpainting pipeline ({one_line(error)})"
            ) from None

    @torch.no_grad()
    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        photos = check_photos(photos)
        masks = check_masks(photos, masks)
        regions = [dilate(mask, self.dilation) for mask in masks]
        sizes = [working_size(p.shape[0], p.shape[1], self.resolution) for p in photos]
        # a photo with nothing to remove is its own reference; the others are inpainted, batched by size
        results: list[np.ndarray | None] = [
            None if region.any() else photo.copy() for photo, region in zip(photos, regions)
        ]
        todo = [i for i, result in enumerate(results) if result is None]
        for batch in batches_by_key([sizes[i] for i in todo], self.batch_size):
            indices = [todo[j] for j in batch]
            height, width = sizes[indices[0]]
            images = [
                Image.fromarray(photos[i]).resize((width, height), Image.Resampling.BICUBIC) for i in indices
            ]
            fills = [
                Image.fromarray(regions[i].astype(np.uint8) * 255).resize(
                    (width, height), Image.Resampling.NEAREST
                )
                for i in indices
            ]
            count = len(indices)
            output = self.pipe(
                prompt=[self.prompt] * count,
                negative_prompt=None if self.negative_prompt is None else [self.negative_prompt] * count,
                image=images,
                mask_image=fills,
                height=height,
                width=width,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                generator=[torch.Generator("cpu").manual_seed(self.seed) for _ in indices],
                output_type="np",
            ).images
            if len(output) != count:
                raise InvalidInputError(
                    f"the inpainting pipeline returned {len(output)} images for {count} photos"
                )
            for row, i in enumerate(indices):
                painted = (np.clip(np.asarray(output[row], dtype=np.float32), 0.0, 1.0) * 255.0).round()
                full_h, full_w = photos[i].shape[:2]
                painted = Image.fromarray(painted.astype(np.uint8)).resize(
                    (full_w, full_h), Image.Resampling.BICUBIC
                )
                results[i] = np.where(regions[i][..., None], np.asarray(painted), photos[i])
        return results  # type: ignore[return-value]
