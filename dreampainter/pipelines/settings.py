"""One set of generation settings, spelled as the pipeline's own keyword arguments.

Training validation (``validation:``), the benchmark (``benchmark:``), ``dreampainter generate`` jobs
(JSONL) and the CPU demo all extend or hold a :class:`GenerationSettings`; the pipeline call is
``pipe(prompt=..., image=..., generator=..., **settings.pipeline_kwargs())``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from dreampainter.errors import InvalidInputError
from dreampainter.pipelines.guidance import check_reference_guidance_interval
from dreampainter.pipelines.image_processing import DEFAULT_FEATHER_RADIUS
from dreampainter.utils.config import ConfigValueError, check_int, check_number


@dataclass
class GenerationSettings:
    """The ``DreamPainterPipeline.__call__`` keywords shared by every caller, and the seed.

    Old spellings (``steps``, ``inference_steps``, ``text_guidance``, ``reference_guidance``) are
    errors in config files and JSONL jobs that name the new key.
    """

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "steps": "num_inference_steps",
        "inference_steps": "num_inference_steps",
        "text_guidance": "text_guidance_scale",
        "reference_guidance": "reference_guidance_scale",
    }

    num_inference_steps: int = 30
    text_guidance_scale: float = 7.5  # s_text
    reference_guidance_scale: float | None = None  # s_ref; None: = s_text (plain two-branch guidance)
    reference_scale: float | None = None  # attention-level reference weight; None: as set in the UNet
    # The reference guidance schedule (s_text != s_ref): run the branch measuring the reference only inside
    # these (start, end) fractions of the steps, there every k-th step (reusing the last delta between).
    reference_guidance_interval: tuple[float, float] | None = None  # None: all steps
    reference_guidance_every: int = 1
    negative_prompt: str | None = None
    negative_prompt_2: str | None = None  # SDXL's second text encoder (default: negative_prompt); SD: must be None
    seed: int = 0  # how each caller seeds its generators (per sample, per row) is its own
    resolution: int | None = None  # process at about resolution^2 pixels; None: the input size
    feather_radius: float = DEFAULT_FEATHER_RADIUS  # when pasting the product back
    product_dilation: int = 0  # grow the product mask by this many pixels

    def __post_init__(self) -> None:
        check_int(self.num_inference_steps, "num_inference_steps", 1)
        check_number(self.text_guidance_scale, "text_guidance_scale")
        check_number(self.reference_guidance_scale, "reference_guidance_scale", optional=True)
        check_number(self.reference_scale, "reference_scale", optional=True)
        try:
            interval = check_reference_guidance_interval(self.reference_guidance_interval)
        except InvalidInputError as error:
            raise ConfigValueError("reference_guidance_interval", str(error).split(": ", 1)[1]) from None
        self.reference_guidance_interval = interval
        check_int(self.reference_guidance_every, "reference_guidance_every", 1)
        for name in ("negative_prompt", "negative_prompt_2"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ConfigValueError(name, f"must be a string or null, got {value!r}")
        check_int(self.seed, "seed")
        check_int(self.resolution, "resolution", 1, optional=True)
        check_number(self.feather_radius, "feather_radius")
        check_int(self.product_dilation, "product_dilation", 0)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The pipeline call's keyword arguments (all but ``seed``: callers make the generators)."""
        return {name: getattr(self, name) for name in PIPELINE_KEYS}

    def generation_settings(self) -> GenerationSettings:
        """Just the shared settings (of a subclass such as the benchmark's or a job)."""
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(GenerationSettings)})


PIPELINE_KEYS = tuple(f.name for f in dataclasses.fields(GenerationSettings) if f.name != "seed")

__all__ = ["PIPELINE_KEYS", "GenerationSettings"]
