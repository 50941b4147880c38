"""The studio's generation: one pipeline in memory, requests -> results (full-size PNGs) with their settings.

A :class:`StudioRequest` is a :class:`GenerationSettings` plus what the page adds (prompt, images per
run, which references, the reference-scale preset, the with/without-reference comparison). Every
result carries the settings that reproduce it alone (its own seed, one image, its reference), as a
plain dict the page shows and can load back ("use these settings").
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreampainter.errors import InvalidInputError
from dreampainter.pipelines.image_processing import ProductInput, to_pil_image
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.studio.inputs import Limits, Placement, read_upload
from dreampainter.utils.config import Choice, check_int, config_from_dict, config_to_dict


class ReferencePreset(Choice):
    """Where the attention-level reference scale applies (InstantStyle's split of the UNet's blocks)."""

    all = "all"  # every cross-attention layer (one float)
    layout = "layout"  # the deepest down block with attention: composition and layout
    style = "style"  # the first up block with attention: colours, texture, light
    both = "both"  # layout and style blocks, nothing else


class ReferenceMode(Choice):
    one = "one"  # one chosen reference (reference_index)
    each = "each"  # one run per uploaded reference


def block_scales(unet: torch.nn.Module, preset: ReferencePreset | str, scale: float) -> float | dict:
    """The ``reference_scale`` argument for a preset: a float for ``all``, else a per-block dict for ``unet``."""
    preset = ReferencePreset(preset)
    if preset == ReferencePreset.all:
        return float(scale)
    down = [i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)]
    up = [i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)]
    scales: dict[str, Any] = {}
    if preset in (ReferencePreset.layout, ReferencePreset.both) and down:
        scales["down"] = {f"block_{down[-1]}": float(scale)}
    if preset in (ReferencePreset.style, ReferencePreset.both) and up:
        scales["up"] = {f"block_{up[0]}": float(scale)}
    return scales


@dataclass
class StudioRequest(GenerationSettings):
    """One press of "Generate": the prompt, the generation settings and the page's own choices."""

    prompt: str = ""
    num_images: int = 1
    reference_mode: ReferenceMode = ReferenceMode.one
    reference_index: int = 0  # which uploaded reference (reference_mode one)
    reference_preset: ReferencePreset = ReferencePreset.all
    compare_without_reference: bool = False
    placement: Placement = field(default_factory=Placement)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.num_images, "num_images", 1)
        check_int(self.reference_index, "reference_index", 0)
        self.reference_mode = ReferenceMode(self.reference_mode)
        self.reference_preset = ReferencePreset(self.reference_preset)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "settings") -> StudioRequest:
        """A request from a settings dict (one result's, or the page's controls); errors name the key."""
        return config_from_dict(cls, values, source)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)


@dataclass
class StudioResult:
    """One generated image: the full-size PNG on disk, a caption, and the settings that reproduce it."""

    image: Image.Image
    path: Path
    caption: str
    settings: dict[str, Any]


ProgressCallback = Callable[[int, int, str], None]  # (steps done, steps in all, what)


def load_references(paths: list[str | os.PathLike], limits: Limits) -> list[tuple[str, Image.Image]]:
    """Decode uploaded reference images (``(file name, image)``), within the upload limits."""
    references = []
    for number, path in enumerate(paths, start=1):
        label = f"reference {number} ({Path(path).name})"
        references.append(
            (
                Path(path).name,
                to_pil_image(read_upload(path, label, limits), label, max_pixels=limits.max_pixels),
            )
        )
    return references


class StudioService:
    """One pipeline on one device, shared by every user of the page (calls are serialised)."""

    def __init__(
        self,
        pipe,
        device: torch.device | str = "cpu",
        limits: Limits | None = None,
        out_dir: str | os.PathLike | None = None,
    ) -> None:
        self.pipe = pipe
        self.device = torch.device(device)
        self.limits = limits or Limits()
        self.out_dir = Path(out_dir or tempfile.mkdtemp(prefix="dreampainter-studio-"))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike, device: torch.device | str, dtype: torch.dtype, **kwargs
    ) -> StudioService:
        """Load the pipeline folder once onto ``device`` in ``dtype``."""
        from dreampainter.errors import require_file
        from dreampainter.pipelines import DreamPainterPipeline

        require_file(
            Path(folder) / "model_index.json",
            "pipeline folder (model_index.json)",
            "see `dreampainter demo` or `dreampainter assemble`",
        )
        pipe = DreamPainterPipeline.from_pretrained(folder, torch_dtype=dtype).to(device)
        return cls(pipe, device, **kwargs)

    @property
    def has_reference(self) -> bool:
        return self.pipe.reference_encoder is not None and self.pipe.has_reference_adapter

    def runs(self, request: StudioRequest, references: list[tuple[str, Image.Image]]) -> list[int | None]:
        """The reference (an index into ``references``, ``None``: text only) of each pipeline call."""
        if references and not self.has_reference:
            raise InvalidInputError(
                "references: this pipeline has no reference encoder and adapter; remove them"
            )
        if not references:
            return [None]
        if request.reference_mode == ReferenceMode.each:
            chosen: list[int | None] = list(range(len(references)))
        elif request.reference_index >= len(references):
            raise InvalidInputError(
                f"reference: number {request.reference_index + 1} chosen but {len(references)} uploaded"
            )
        else:
            chosen = [request.reference_index]
        return chosen + [None] if request.compare_without_reference else chosen  # one text-only run to compare

    def generate(
        self,
        product: ProductInput,
        references: list[tuple[str, Image.Image]],
        request: StudioRequest,
        progress: ProgressCallback | None = None,
    ) -> list[StudioResult]:
        """Every image of a request, in order: per run (reference), ``num_images`` seeds ``seed, seed+1, ...``,
        one pipeline call each (so that a result's own settings make it again exactly)."""
        if not request.prompt.strip() and not references:
            raise InvalidInputError("prompt: write a prompt or upload a reference image")
        runs = self.runs(request, references)
        total = len(runs) * request.num_images * request.num_inference_steps
        kwargs = request.pipeline_kwargs()
        kwargs["reference_scale"] = self.reference_scale(request)
        results = []
        with self.lock:
            calls = [(index, request.seed + k) for index in runs for k in range(request.num_images)]
            for call, (index, seed) in enumerate(calls):
                name, reference = references[index] if index is not None else (None, None)
                what = f"{name or 'no reference'}, seed {seed}"
                done = call * request.num_inference_steps

                def on_step(pipe, step, timestep, tensors, done=done, what=what):
                    if progress is not None:
                        progress(done + step + 1, total, what)
                    return {}

                # One image per call: each result is then exactly what its own settings make alone.
                output = self.pipe(
                    prompt=request.prompt,
                    image=product.image,
                    product_mask=product.product_mask,
                    reference_image=reference,
                    generator=torch.Generator(self.device).manual_seed(seed),
                    callback_on_step_end=on_step,
                    **kwargs,
                )
                results.append(self._result(output.images[0], request, seed, index, name))
        return results

    def reference_scale(self, request: StudioRequest) -> float | dict | None:
        """The pipeline's ``reference_scale``: the preset's blocks at the request's scale (``None`` with the
        ``all`` preset keeps the pipeline's saved scale; other presets then use 1.0)."""
        if request.reference_scale is None and request.reference_preset == ReferencePreset.all:
            return None
        scale = 1.0 if request.reference_scale is None else request.reference_scale
        return block_scales(self.pipe.unet, request.reference_preset, scale)

    def _result(
        self, image: Image.Image, request: StudioRequest, seed: int, index: int | None, name: str | None
    ) -> StudioResult:
        path = self.out_dir / f"dreampainter-{uuid.uuid4().hex[:12]}.png"
        image.save(path)
        settings = dataclasses.replace(
            request,
            seed=seed,
            num_images=1,
            compare_without_reference=False,
            reference_mode=ReferenceMode.one,
            reference_index=index or 0,
        ).to_dict()
        settings["reference"] = name  # the reference's file name (None: text only); not a request key
        caption = f"{name or 'no reference'} · seed {seed}"
        return StudioResult(image=image, path=path, caption=caption, settings=settings)
