"""The systems a comparison runs: each kind turns a batch of benchmark samples into raw and composited
results the way the runner's :func:`~dreampainter.evaluation.runner.generate_batch` does (same
per-sample seeds, same product compositing), so every system goes through the same runner and metrics.

| kind | what | reference |
| --- | --- | --- |
| ``dreampainter`` | a ``DreamPainterPipeline.save_pretrained`` folder, run by the runner as ``evaluate`` does | yes |
| ``diffusers_inpaint`` | diffusers' ``StableDiffusionInpaintPipeline`` (or SDXL's) folder, text only | no |
| ``diffusers_ip_adapter`` | the same + a public IP-Adapter file (``load_ip_adapter``) and an image-encoder folder | yes |
| ``reference_paste`` | the product pasted onto the reference resized to the photo (no model) | yes |
| ``copy_input`` | the input photo itself (a sanity row) | no |
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, require_file
from dreampainter.evaluation.bench_data import BenchSample
from dreampainter.evaluation.bench_settings import BenchmarkSettings, check_pipeline_folder, load_pipeline
from dreampainter.evaluation.runner import BenchmarkSystem, Generated, paste_products, sample_generators
from dreampainter.models.backbones import backbone_for_folder, backbone_for_unet
from dreampainter.pipelines.image_processing import inpainting_mask, processing_size
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.utils.config import Choice, ConfigValueError, as_choice, check_number


class SystemKind(Choice):
    """How a system makes its results (see the module docstring)."""

    dreampainter = "dreampainter"
    diffusers_inpaint = "diffusers_inpaint"
    diffusers_ip_adapter = "diffusers_ip_adapter"
    reference_paste = "reference_paste"
    copy_input = "copy_input"


# The keys each kind needs and may have (beside ``kind``); anything else given is an error.
FILES = {
    SystemKind.dreampainter: ("pipeline",),
    SystemKind.diffusers_inpaint: ("pipeline",),
    SystemKind.diffusers_ip_adapter: ("pipeline", "ip_adapter", "image_encoder"),
    SystemKind.reference_paste: (),
    SystemKind.copy_input: (),
}
GUIDANCE = {
    SystemKind.dreampainter: (
        "text_guidance_scale",
        "reference_guidance_scale",
        "reference_scale",
        "negative_prompt",
    ),
    SystemKind.diffusers_inpaint: ("text_guidance_scale", "negative_prompt"),
    SystemKind.diffusers_ip_adapter: ("text_guidance_scale", "reference_scale", "negative_prompt"),
    SystemKind.reference_paste: (),
    SystemKind.copy_input: (),
}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class SystemEntry:
    """One system of a comparison (``systems.<name>`` in the systems file).

    ``pipeline``: a pipeline folder; ``ip_adapter``: an IP-Adapter ``.safetensors`` / ``.bin`` file;
    ``image_encoder``: a ``CLIPVisionModelWithProjection`` folder. The guidance keys override the
    shared ``benchmark`` settings for this system only (``null``: the shared value).
    """

    kind: SystemKind = MISSING
    pipeline: str | None = None
    ip_adapter: str | None = None
    image_encoder: str | None = None
    text_guidance_scale: float | None = None
    reference_guidance_scale: float | None = None
    reference_scale: float | None = None
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        self.kind = as_choice(self.kind, SystemKind, "kind")
        allowed = (*FILES[self.kind], *GUIDANCE[self.kind])
        for name in (*FILES[SystemKind.diffusers_ip_adapter], *GUIDANCE[SystemKind.dreampainter]):
            if getattr(self, name) is not None and name not in allowed:
                raise ConfigValueError(
                    name, f"not used by a {self.kind} system (it takes: {', '.join(allowed) or 'nothing'})"
                )
        for name in FILES[self.kind]:
            if not getattr(self, name):
                raise ConfigValueError(name, f"a {self.kind} system needs it")
        for name in ("text_guidance_scale", "reference_guidance_scale", "reference_scale"):
            check_number(getattr(self, name), name, optional=True)

    def settings(self, shared: BenchmarkSettings) -> BenchmarkSettings:
        """The shared benchmark settings with this system's guidance overrides."""
        overrides = {
            name: getattr(self, name) for name in GUIDANCE[self.kind] if getattr(self, name) is not None
        }
        return dataclasses.replace(shared, **overrides)


def check_system_name(name: str) -> None:
    """A system name is also a folder name: letters, digits, ``_ . -``."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(
            f"system name {name!r}: use letters, digits, '_', '.' or '-' (it names a folder)"
        )


def check_system_files(entry: SystemEntry) -> None:
    """Raise naming the first missing folder or file of ``entry`` (before anything loads)."""
    if entry.pipeline:
        check_pipeline_folder(entry.pipeline)
    if entry.ip_adapter:
        require_file(
            entry.ip_adapter, "IP-Adapter weights", "e.g. ip-adapter_sd15.safetensors from h94/IP-Adapter"
        )
    if entry.image_encoder:
        require_file(
            Path(entry.image_encoder) / "config.json",
            "image encoder folder (config.json)",
            "a CLIPVisionModelWithProjection folder, e.g. models/image_encoder of h94/IP-Adapter",
        )


def load_system(
    entry: SystemEntry, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """The object the runner evaluates: a DreamPainter pipeline, or a :class:`BenchmarkSystem`."""
    if entry.kind == SystemKind.dreampainter:
        return load_pipeline(entry.pipeline, device, dtype)
    if entry.kind == SystemKind.reference_paste:
        return ReferencePaste()
    if entry.kind == SystemKind.copy_input:
        return CopyInput()
    pipe = _load_diffusers_inpaint(entry.pipeline, device, dtype)
    if entry.kind == SystemKind.diffusers_inpaint:
        return DiffusersInpaint(pipe)
    _load_ip_adapter(pipe, entry.ip_adapter, entry.image_encoder, device)
    return DiffusersIPAdapter(pipe)


def _load_diffusers_inpaint(folder: str, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    """diffusers' inpainting pipeline of the folder's backbone (SD 1.x/2.x or SDXL)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline

    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        if backbone_for_folder(folder).name == "sdxl":
            pipe = StableDiffusionXLInpaintPipeline.from_pretrained(folder, local_files_only=True, **kwargs)
        else:
            pipe = StableDiffusionInpaintPipeline.from_pretrained(
                folder, safety_checker=None, requires_safety_checker=False, local_files_only=True, **kwargs
            )
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointMismatchError(
            f"{folder}: cannot load the diffusers inpainting pipeline ({error})".replace("\n", " ")
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _load_ip_adapter(pipe: Any, weights: str, image_encoder: str, device: torch.device | str) -> None:
    from transformers import CLIPVisionModelWithProjection

    weights = Path(weights)
    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(image_encoder, local_files_only=True)
        pipe.register_modules(image_encoder=encoder.to(device=device, dtype=pipe.unet.dtype))
        pipe.load_ip_adapter(
            str(weights.parent), subfolder="", weight_name=weights.name, image_encoder_folder=None
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise CheckpointMismatchError(
            f"{weights}: cannot load the IP-Adapter with the image encoder {image_encoder} ({error})".replace(
                "\n", " "
            )
        ) from None
    pipe.to(device)


def _resize_to(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float HxWx3 -> the photo's (width, height), bicubic with antialiasing as the DreamPainter pipeline does."""
    width, height = size
    if image.shape[:2] == (height, width):
        return np.asarray(image, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True)
    return tensor[0].clamp(0, 1).permute(1, 2, 0).numpy()


class DiffusersInpaint(BenchmarkSystem):
    """diffusers' ``StableDiffusionInpaintPipeline`` or ``StableDiffusionXLInpaintPipeline`` (text only): the
    repaint mask is the inverted product mask, the processing size the one DreamPainter's pipeline picks
    (SDXL: the resolution bucket), full strength; the output is resized back to the photo and the product
    pasted back as for DreamPainter."""

    uses_reference = False

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    def _extra(
        self, samples: list[BenchSample], references: list[Any] | None, settings: GenerationSettings
    ) -> dict:
        return {}

    def generate(
        self, samples: list[BenchSample], references: list[Any] | None, settings: GenerationSettings
    ) -> Generated:
        backbone = backbone_for_unet(self.pipe.unet)
        if backbone.snaps_to_buckets:
            width, height = backbone.bucket_size(*samples[0].photo.size, settings.resolution)
        else:
            multiple = max(8, int(self.pipe.vae_scale_factor))
            width, height = processing_size(*samples[0].photo.size, multiple, settings.resolution)
        if any(s.photo.size != samples[0].photo.size for s in samples):
            raise InvalidInputError(
                "a diffusers system generates one photo size per batch (the runner groups them)"
            )
        negative = None if settings.negative_prompt is None else [settings.negative_prompt] * len(samples)
        size_conditioning = {}
        if backbone.uses_pooled_text:  # SDXL: the photo's own size as the original size, as DreamPainter does
            size_conditioning["original_size"] = samples[0].photo.size[::-1]
        output = self.pipe(
            prompt=[s.prompt for s in samples],
            image=[s.photo for s in samples],
            mask_image=[inpainting_mask(s.product_mask, settings.product_dilation) for s in samples],
            height=height,
            width=width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.text_guidance_scale,
            negative_prompt=negative,
            generator=sample_generators(samples, settings.seed),
            strength=1.0,  # SDXL's default is 0.9999 (a trace of the photo); DreamPainter always starts from noise
            output_type="np",
            **size_conditioning,
            **self._extra(samples, references, settings),
        )
        raw = [_resize_to(image, s.photo.size) for image, s in zip(output.images, samples)]
        return paste_products(raw, samples, settings)


class DiffusersIPAdapter(DiffusersInpaint):
    """The inpainting pipeline with an IP-Adapter loaded by diffusers (``load_ip_adapter``): text + reference.

    The reference embeddings are computed by the pipeline's own ``encode_image`` (one per sample, zero
    embeddings for the unconditional branch, as diffusers does) and passed as ``ip_adapter_image_embeds``.
    ``reference_scale`` is diffusers' ``set_ip_adapter_scale`` (default 1.0).
    """

    uses_reference = True

    def _extra(
        self, samples: list[BenchSample], references: list[Any] | None, settings: GenerationSettings
    ) -> dict:
        from diffusers.models.embeddings import ImageProjection

        pipe = self.pipe
        pipe.set_ip_adapter_scale(1.0 if settings.reference_scale is None else settings.reference_scale)
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        images = references if references is not None else [s.photo for s in samples]
        with torch.no_grad():
            embeds, uncond = pipe.encode_image(images, pipe.device, 1, not isinstance(layer, ImageProjection))
        if references is None:  # text only: the unconditional (zero) embedding everywhere
            embeds = uncond
        embeds, uncond = embeds[:, None], uncond[:, None]
        rows = torch.cat([uncond, embeds]) if settings.text_guidance_scale > 1 else embeds
        return {"ip_adapter_image_embeds": [rows]}


class ReferencePaste(BenchmarkSystem):
    """The trivial baseline: the reference resized to the photo, the product pasted on it (no model)."""

    def generate(
        self, samples: list[BenchSample], references: list[Any] | None, settings: GenerationSettings
    ) -> Generated:
        from PIL import Image

        backgrounds = references if references is not None else [s.reference for s in samples]
        raw = [
            np.asarray(
                reference.convert("RGB").resize(s.photo.size, Image.Resampling.BICUBIC), dtype=np.float32
            )
            / 255.0
            for reference, s in zip(backgrounds, samples)
        ]
        return paste_products(raw, samples, settings)


class CopyInput(BenchmarkSystem):
    """The sanity row: the input photo itself, before and after compositing."""

    uses_reference = False

    def generate(
        self, samples: list[BenchSample], references: list[Any] | None, settings: GenerationSettings
    ) -> Generated:
        photos = [np.asarray(s.photo, dtype=np.float32) / 255.0 for s in samples]
        return Generated(photos, [photo.copy() for photo in photos])


__all__ = [
    "CopyInput",
    "DiffusersIPAdapter",
    "DiffusersInpaint",
    "ReferencePaste",
    "SystemEntry",
    "SystemKind",
    "check_system_files",
    "check_system_name",
    "load_system",
]
