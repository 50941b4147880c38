"""Background references with LaMa: the product region (dilated) removed by a TorchScript inpainter.

The file is a TorchScript module called as ``model(image, mask)`` with image float [0, 1] Bx3xHxW and
mask Bx1xHxW (1 = fill), returning Bx3xHxW in [0, 1] — the ``big-lama.pt`` export that IOPaint /
lama-cleaner load. Photos are padded (symmetric) to a multiple of 8, batched by size, and the result is
composited: pixels outside the dilated mask are the photo's own.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dreampainter.errors import InvalidInputError

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
    "download the big-lama TorchScript file big-lama.pt (as IOPaint / lama-cleaner use it) and set path to it"
)
MODULO = 8


def _pad_to_modulo(array: np.ndarray, modulo: int = MODULO) -> np.ndarray:
    """Pad the two leading (spatial) axes symmetrically at the bottom/right to multiples of ``modulo``."""
    height, width = array.shape[:2]
    pad = [(0, -height % modulo), (0, -width % modulo)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, mode="symmetric")


class LamaReference:
    """``ReferenceMaker``: each photo with its (dilated) product region filled in by LaMa (HxWx3 uint8)."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        dilation: int = 16,
        batch_size: int = 4,
    ) -> None:
        path = require_path(path, "LaMa TorchScript model", HINT)
        if path.is_dir():
            raise InvalidInputError(f"{path}: expected a TorchScript file (big-lama.pt), got a folder")
        self.path = path
        self.device = resolve_device(device)
        self.dilation = check_dilation(dilation)
        self.batch_size = check_positive("batch_size", batch_size)
        try:
            self.model = torch.jit.load(str(path), map_location=self.device)
        except (RuntimeError, ValueError) as error:
            raise InvalidInputError(
                f"{path}: not a TorchScript file ({one_line(error)}; LaMa's training checkpoint best.ckpt needs "
                "the lama repository: use the big-lama.pt TorchScript export)"
            ) from None
        arguments = [a for a in self.model.forward.schema.arguments if a.name != "self"]
        if len(arguments) != 2:
            raise InvalidInputError(
                f"{path}: expected a TorchScript inpainter called as model(image, mask), its forward takes "
                f"{[a.name for a in arguments]}"
            )
        self.model.eval()

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The model's output, Bx3xHxW in [0, 1], for image Bx3xHxW [0, 1] and mask Bx1xHxW {0, 1}."""
        output = self.model(images, masks)
        if isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor) or output.shape != images.shape:
            shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise InvalidInputError(
                f"{self.path}: the inpainter returned {shape} for images {list(images.shape)}, expected the same shape"
            )
        return output.clamp(0.0, 1.0)

    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        photos = check_photos(photos)
        masks = check_masks(photos, masks)
        regions = [dilate(mask, self.dilation) for mask in masks]
        # a photo with nothing to remove is its own reference; the others are inpainted, batched by size
        results: list[np.ndarray | None] = [
            None if region.any() else photo.copy() for photo, region in zip(photos, regions)
        ]
        todo = [i for i, result in enumerate(results) if result is None]
        for batch in batches_by_key([photos[i].shape for i in todo], self.batch_size):
            indices = [todo[j] for j in batch]
            height, width = photos[indices[0]].shape[:2]
            images = np.stack([_pad_to_modulo(photos[i]) for i in indices]).astype(np.float32) / 255.0
            fills = np.stack([_pad_to_modulo(regions[i]) for i in indices]).astype(np.float32)
            output = self.inpaint(
                torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device),
                torch.from_numpy(fills)[:, None].to(self.device),
            )
            output = output[:, :, :height, :width].permute(0, 2, 3, 1).float().cpu().numpy()
            for row, i in enumerate(indices):
                painted = np.clip(np.rint(output[row] * 255.0), 0, 255).astype(np.uint8)
                results[i] = np.where(regions[i][..., None], painted, photos[i])
        return results  # type: ignore[return-value]
