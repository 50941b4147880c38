"""What a benchmark runner hands to the metrics: one record per generated sample.

Every image is held as an 8-bit ``HxWx3`` numpy array, the form in which results are saved and
looked at, so that pixel metrics (PSNR, the compositing check) measure what a user gets.
Images may come in as PIL images, numpy arrays (uint8, or float in [0, 1]) or torch tensors
(``CxHxW`` or ``HxWxC``, uint8 or float in [0, 1]).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from dreampainter.errors import InvalidInputError

# A product-mask value at or above this counts as product (masks are 8-bit, 255 = product).
PRODUCT_THRESHOLD = 128


def to_rgb_array(image: Any, name: str) -> np.ndarray:
    """Return ``image`` as a contiguous uint8 ``HxWx3`` array; ``name`` is used in errors."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise InvalidInputError(
            f"{name}: expected an image (PIL, numpy or torch), got {type(image).__name__}"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise InvalidInputError(f"{name}: expected an HxWx3 image, got shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating):
            raise InvalidInputError(f"{name}: expected uint8 or float pixels, got {image.dtype}")
        image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def to_mask_array(mask: Any, name: str) -> np.ndarray:
    """Return a product mask as uint8 ``HxW`` (255 = product); accepts bool, 0/1, 0/255 or float masks."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    mask = np.squeeze(mask)
    if mask.ndim != 2:
        raise InvalidInputError(f"{name}: expected an HxW mask, got shape {tuple(mask.shape)}")
    if mask.dtype == bool:
        return mask.astype(np.uint8) * 255
    values = mask.astype(np.float64)
    if values.max(initial=0.0) <= 1.0:  # 0/1 or float in [0, 1]
        values = values * 255.0
    return np.round(np.clip(values, 0.0, 255.0)).astype(np.uint8)


@dataclass
class EvalSample:
    """One generated sample and everything needed to score it.

    ``raw`` is the generated image before the product is composited back, ``composited`` the
    final result; ``photo`` is the input photo (also the split's real photo for FID/KID),
    ``product_mask`` its mask (uint8, 255 = product), ``reference`` the background reference
    (any size).
    """

    key: str
    raw: np.ndarray
    composited: np.ndarray
    photo: np.ndarray
    product_mask: np.ndarray
    reference: np.ndarray
    prompt: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"sample {self.key!r}"
        self.raw = to_rgb_array(self.raw, f"{where}: raw result")
        self.composited = to_rgb_array(self.composited, f"{where}: composited result")
        self.photo = to_rgb_array(self.photo, f"{where}: photo")
        self.reference = to_rgb_array(self.reference, f"{where}: reference")
        self.product_mask = to_mask_array(self.product_mask, f"{where}: product mask")
        size = self.photo.shape[:2]
        for name in ("raw", "composited", "product_mask"):
            if getattr(self, name).shape[:2] != size:
                raise InvalidInputError(
                    f"{where}: {name} is {getattr(self, name).shape[:2]}, the photo is {size}; they must match"
                )

    @property
    def product(self) -> np.ndarray:
        """Boolean ``HxW`` product region (mask >= 128)."""
        return self.product_mask >= PRODUCT_THRESHOLD

    @property
    def background(self) -> np.ndarray:
        """Boolean ``HxW`` region outside the product."""
        return ~self.product


@dataclass
class EvalBatch:
    """A list of :class:`EvalSample`; build one with :meth:`from_lists`."""

    samples: list[EvalSample]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[EvalSample]:
        return iter(self.samples)

    @property
    def keys(self) -> list[str]:
        return [sample.key for sample in self.samples]

    @classmethod
    def from_lists(
        cls,
        keys: Sequence[str],
        raw: Sequence[Any],
        composited: Sequence[Any],
        photo: Sequence[Any],
        product_mask: Sequence[Any],
        reference: Sequence[Any],
        prompt: Sequence[str] | None = None,
        meta: Sequence[dict] | None = None,
    ) -> EvalBatch:
        """Zip per-field sequences (lists, or batched tensors/arrays with a leading batch axis)."""
        n = len(keys)
        fields = dict(
            raw=raw, composited=composited, photo=photo, product_mask=product_mask, reference=reference
        )
        for name, values in fields.items():
            if len(values) != n:
                raise InvalidInputError(
                    f"batch field {name!r} has {len(values)} items, expected {n} (one per key)"
                )
        prompt = list(prompt) if prompt is not None else [""] * n
        meta = list(meta) if meta is not None else [{} for _ in range(n)]
        if len(prompt) != n or len(meta) != n:
            raise InvalidInputError(f"batch prompts/meta must have {n} items (one per key)")
        samples = [
            EvalSample(
                key=str(keys[i]),
                raw=raw[i],
                composited=composited[i],
                photo=photo[i],
                product_mask=product_mask[i],
                reference=reference[i],
                prompt=prompt[i],
                meta=meta[i],
            )
            for i in range(n)
        ]
        return cls(samples)
