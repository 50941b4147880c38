"""The loader's configuration: the ``data.loader`` section of a training config (a typed schema)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dreampainter.data.loading.augment import CLIP_MEAN, CLIP_STD
from dreampainter.data.loading.buckets import make_buckets
from dreampainter.utils.config import Choice, ConfigValueError, check_int, coerce_choices, config_from_dict


class Language(Choice):
    en = "en"
    zh = "zh"
    random = "random"


class ReferenceMode(Choice):
    """How a reference image is brought to a square: ``pad`` (no distortion) or centre ``crop``."""

    pad = "pad"
    crop = "crop"


class EpochMode(Choice):
    balanced = "balanced"  # the same number of batches on every rank/worker
    exact = "exact"  # every sample once


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_pair(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 and all(map(_is_int, value))


@dataclass
class LoaderConfig:
    """Everything that shapes the samples and the epoch (the ``data.loader`` section of a training config).

    ``resolution``, ``buckets`` and ``mask_grow_px`` take either form below (checked in ``__post_init__``).
    """

    resolution: Any = 512  # int (square side) or [height, width]
    buckets: Any = None  # null / false: off; true: make_buckets(resolution); or a list of [h, w]
    max_zoom: float = 1.0  # random zoom-in on top of the covering scale (the product always stays in)
    flip_prob: float = 0.5
    reference_size: int = 224
    reference_mode: ReferenceMode = ReferenceMode.pad
    reference_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    reference_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    reference_aligned: bool = False  # the reference is the photo's own background: flip it with the photo
    language: Language = Language.en
    p_drop_text: float = 0.05
    p_drop_reference: float = 0.05
    p_drop_both: float = 0.05
    mask_grow_px: Any = 0  # int: dilate (>0) / erode (<0) the product mask; [lo, hi]: random in that range
    bbox_mask_prob: float = 0.0  # probability of using the product's bounding box as its mask
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # encoded samples held per worker (~memory); 0 disables sample shuffling
    resampled: bool = False  # endless: shards drawn with replacement
    epoch_mode: EpochMode = EpochMode.balanced
    samples_per_epoch: int | None = None  # epoch length over all ranks; overrides the index's counts
    drop_last: bool = True
    max_pixels: int | None = 64_000_000

    def __post_init__(self) -> None:
        coerce_choices(self)
        if not (_is_int(self.resolution) and self.resolution > 0) and not (
            _int_pair(self.resolution) and min(self.resolution) > 0
        ):
            raise ConfigValueError("resolution", f"must be a positive int or [height, width], got {self.resolution!r}")
        if not (self.buckets is None or isinstance(self.buckets, bool)) and not (
            isinstance(self.buckets, Sequence) and self.buckets and all(_int_pair(b) for b in self.buckets)
        ):
            raise ConfigValueError("buckets", f"must be true, false, null or a list of [h, w], got {self.buckets!r}")
        if not _is_int(self.mask_grow_px) and not _int_pair(self.mask_grow_px):
            raise ConfigValueError("mask_grow_px", f"must be an int or [lo, hi], got {self.mask_grow_px!r}")
        check_int(self.reference_size, "reference_size", 1)
        check_int(self.shuffle_buffer, "shuffle_buffer", 0)
        drops = (self.p_drop_text, self.p_drop_reference, self.p_drop_both)
        if min(drops) < 0 or sum(drops) > 1:
            raise ConfigValueError(
                "p_drop_text", f"dropout probabilities must be >= 0 and sum to <= 1, got {drops}",
                related=("p_drop_reference", "p_drop_both"),
            )
        if self.max_zoom < 1:
            raise ConfigValueError("max_zoom", f"must be >= 1, got {self.max_zoom}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> LoaderConfig:
        """From a plain or OmegaConf mapping, through the one config loader (unknown keys are errors)."""
        return config_from_dict(cls, values, "data.loader")

    @property
    def size(self) -> tuple[int, int]:
        """The output (height, width) without buckets."""
        if isinstance(self.resolution, int):
            return self.resolution, self.resolution
        height, width = self.resolution
        return int(height), int(width)

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The (height, width) of every bucket; one bucket (``size``) when buckets are off."""
        if self.buckets is True:
            return make_buckets(max(self.size))
        if self.buckets:
            return [(int(h), int(w)) for h, w in self.buckets]
        return [self.size]
