"""The loader's configuration: the ``data.loader`` section of a training config."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dreampainter.data.loading.augment import CLIP_MEAN, CLIP_STD, REFERENCE_MODES
from dreampainter.data.loading.buckets import make_buckets
from dreampainter.errors import InvalidInputError

LANGUAGES = ("en", "zh", "random")
EPOCH_MODES = ("balanced", "exact")


@dataclass
class LoaderConfig:
    """Everything that shapes the samples and the epoch (the ``data`` section of a training config)."""

    resolution: int | tuple[int, int] = 512  # square side, or (height, width)
    buckets: bool | Sequence[Sequence[int]] | None = None  # True: make_buckets(resolution); or (h, w) list
    max_zoom: float = 1.0  # random zoom-in on top of the covering scale (the product always stays in)
    flip_prob: float = 0.5
    reference_size: int = 224
    reference_mode: str = "pad"  # "pad" (no distortion) | "crop"
    reference_mean: Sequence[float] = CLIP_MEAN
    reference_std: Sequence[float] = CLIP_STD
    reference_aligned: bool = False  # the reference is the photo's own background: flip it with the photo
    language: str = "en"  # "en" | "zh" | "random"
    p_drop_text: float = 0.05
    p_drop_reference: float = 0.05
    p_drop_both: float = 0.05
    mask_grow_px: int | Sequence[int] = 0  # dilate (>0) / erode (<0) the product mask; (lo, hi): random
    bbox_mask_prob: float = 0.0  # probability of using the product's bounding box as its mask
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # encoded samples held per worker (~memory); 0 disables sample shuffling
    resampled: bool = False  # endless: shards drawn with replacement
    epoch_mode: str = "balanced"  # "balanced": same number of batches on every rank/worker | "exact"
    samples_per_epoch: int | None = None  # epoch length over all ranks; overrides the index's counts
    drop_last: bool = True
    max_pixels: int | None = 64_000_000

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise InvalidInputError(f"data.language must be one of {LANGUAGES}, got {self.language!r}")
        if self.reference_mode not in REFERENCE_MODES:
            raise InvalidInputError(
                f"data.reference_mode must be one of {REFERENCE_MODES}, got {self.reference_mode!r}"
            )
        if self.epoch_mode not in EPOCH_MODES:
            raise InvalidInputError(f"data.epoch_mode must be one of {EPOCH_MODES}, got {self.epoch_mode!r}")
        drops = (self.p_drop_text, self.p_drop_reference, self.p_drop_both)
        if min(drops) < 0 or sum(drops) > 1:
            raise InvalidInputError(f"data dropout probabilities must be >= 0 and sum to <= 1, got {drops}")
        if self.max_zoom < 1:
            raise InvalidInputError(f"data.max_zoom must be >= 1, got {self.max_zoom}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> LoaderConfig:
        """Build from a plain or OmegaConf mapping; unknown keys are an error (typos must not pass silently)."""
        try:
            from omegaconf import OmegaConf

            if OmegaConf.is_config(values):
                values = OmegaConf.to_container(values, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a project dependency
            pass
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidInputError(f"unknown data config key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

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
