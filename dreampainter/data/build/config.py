"""The build configuration schema (loaded with :func:`dreampainter.utils.config.load_config`).

Component sections (``mask``, ``refine``, ``reference``, ``prompt``, ``translate``) are free-form
mappings: ``kind`` picks the component, every other key is passed to its constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dreampainter.utils.config import ConfigValueError, check_int, check_number


def _check_section(section: dict[str, Any], key: str, optional: bool) -> None:
    kind = section.get("kind")
    if not isinstance(kind, str) or not kind:
        raise ConfigValueError(f"{key}.kind", f"must name a component kind, got {kind!r}")
    if not optional and kind == "none":
        raise ConfigValueError(f"{key}.kind", "this stage cannot be 'none'")


@dataclass
class CleanupConfig:
    """Mask cleanup after the mask stage (see ``masks.clean_mask``)."""

    keep_components_above: float = 0.05  # components over this share of the largest one are kept too
    small_hole_share: float = 0.002  # holes under this share of the product area are always filled
    hole_background_distance: float = 12.0  # larger holes stay open when their colour is this close to the background
    soft_edge: float = 0.7  # Gaussian sigma (pixels) of the kept soft edge; 0 = hard edge

    def __post_init__(self) -> None:
        for name in ("keep_components_above", "small_hole_share", "hole_background_distance", "soft_edge"):
            check_number(getattr(self, name), name)


@dataclass
class FilterConfig:
    """Filters; every drop is counted in the report under its reason."""

    min_side: int = 256  # too_small: the photo's shorter side in pixels
    max_pixels: int = 64_000_000  # oversized: decode limit (the project's default)
    min_mask_share: float = 0.01  # mask_too_small
    max_mask_share: float = 0.95  # mask_too_large
    max_border_touch: float = 0.02  # cut_off: product pixels along any one image edge, as a share of it
    min_binary_share: float = 0.95  # mask_quality: near-binary pixels (0..10 or 245..255)
    min_mask_confidence: float = 0.5  # mask_low_confidence: the mask maker's confidence
    min_sharpness: float = 5.0  # blurry: variance of the Laplacian (grey, longer side reduced to 512)
    duplicate_distance: int = 4  # duplicate: perceptual-hash Hamming distance (imagehash.phash, 64 bits); -1 = off

    def __post_init__(self) -> None:
        check_int(self.min_side, "min_side", 1)
        check_int(self.max_pixels, "max_pixels", 1)
        check_int(self.duplicate_distance, "duplicate_distance", -1)
        for name in ("min_mask_share", "max_mask_share", "max_border_touch", "min_binary_share",
                     "min_mask_confidence", "min_sharpness"):  # fmt: skip
            check_number(getattr(self, name), name)
        if self.min_mask_share >= self.max_mask_share:
            raise ConfigValueError("max_mask_share", "must be above min_mask_share", ["min_mask_share"])


@dataclass
class OutputConfig:
    """How samples are stored and how work is cut into resumable chunks (one shard per chunk)."""

    samples_per_chunk: int = 500
    max_side: int | None = None  # downscale photos (and masks) whose longer side exceeds this
    jpeg_quality: int = 95
    reference_format: str = "jpg"  # jpg or png
    contact_sheet_samples: int = 16
    contact_sheet_drops_per_reason: int = 4
    seed: int = 0  # picks the contact sheets' samples
    wait_timeout_s: float = 86400.0  # how long a rank waits for the others' work

    def __post_init__(self) -> None:
        check_int(self.samples_per_chunk, "samples_per_chunk", 1)
        check_int(self.max_side, "max_side", 8, optional=True)
        check_int(self.jpeg_quality, "jpeg_quality", 1)
        check_int(self.contact_sheet_samples, "contact_sheet_samples", 0)
        check_int(self.contact_sheet_drops_per_reason, "contact_sheet_drops_per_reason", 0)
        check_int(self.seed, "seed", 0)
        check_number(self.wait_timeout_s, "wait_timeout_s")
        if self.jpeg_quality > 100:
            raise ConfigValueError("jpeg_quality", f"must be in 1..100, got {self.jpeg_quality}")
        if self.reference_format not in ("jpg", "png"):
            raise ConfigValueError("reference_format", f"must be jpg or png, got {self.reference_format!r}")


@dataclass
class BuildConfig:
    """``dreampainter data build --config``: one section per stage, plus filters and output."""

    mask: dict[str, Any] = field(default_factory=lambda: {"kind": "studio"})
    refine: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    reference: dict[str, Any] = field(default_factory=lambda: {"kind": "fill"})
    prompt: dict[str, Any] = field(default_factory=lambda: {"kind": "given"})
    translate: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    prompt_template: str = "{caption}"  # model captions: {caption} and {category} (empty when unknown)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    batch_size: int = 8
    device: str = "auto"  # auto: cuda:<LOCAL_RANK> when CUDA is available, else cpu

    def __post_init__(self) -> None:
        _check_section(self.mask, "mask", optional=False)
        _check_section(self.refine, "refine", optional=True)
        _check_section(self.reference, "reference", optional=False)
        _check_section(self.prompt, "prompt", optional=False)
        _check_section(self.translate, "translate", optional=True)
        check_int(self.batch_size, "batch_size", 1)
        if "{caption}" not in self.prompt_template:
            raise ConfigValueError("prompt_template", "must contain {caption}")
