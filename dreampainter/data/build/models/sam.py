"""Mask refinement with SAM (transformers ``SamModel`` + ``SamProcessor``), prompted by the mask's box.

Each photo is prompted with the bounding box of its mask's product pixels (the whole image when the
mask is empty); the refined mask is SAM's (binarised, at the photo's size): with ``multimask`` the
one of SAM's three with the highest predicted IoU.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dreampainter.errors import InvalidInputError, MissingFileError

from .common import (
    check_masks,
    check_photos,
    check_positive,
    chunks,
    mask_box,
    one_line,
    require_hf_folder,
    resolve_device,
)

HINT = (
    "download a SAM checkpoint folder, e.g. facebook/sam-vit-base (config.json, model.safetensors, "
    "preprocessor_config.json), and set path to it"
)


class SamRefiner:
    """``MaskRefiner``: SAM's mask for the box around each given mask (HxW uint8, 0 or 255)."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        multimask: bool = False,
        batch_size: int = 4,
    ) -> None:
        from transformers import SamModel, SamProcessor

        folder = require_hf_folder(path, "SAM model folder", HINT, model_types=("sam",))
        self.device = resolve_device(device)
        self.multimask = bool(multimask)
        self.batch_size = check_positive("batch_size", batch_size)
        try:
            self.processor = SamProcessor.from_pretrained(str(folder), local_files_only=True)
        except OSError as error:
            raise MissingFileError(
                f"SAM processor files not found in {folder} ({HINT}): {one_line(error)}"
            ) from None
        try:
            self.model = SamModel.from_pretrained(str(folder), local_files_only=True)
        except OSError as error:
            raise MissingFileError(f"SAM weights not found in {folder} ({HINT}): {one_line(error)}") from None
        except (ValueError, RuntimeError) as error:
            raise InvalidInputError(f"{folder}: not a loadable SAM model ({one_line(error)})") from None
        self.model.to(self.device).eval()

    @staticmethod
    def box(mask: np.ndarray) -> list[float]:
        """The prompt box ``[x0, y0, x1, y1]`` in pixels: the mask's, or the whole image when empty."""
        box = mask_box(mask)
        if box is None:
            height, width = mask.shape
            box = (0, 0, width, height)
        return [float(v) for v in box]

    @torch.no_grad()
    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        photos = check_photos(photos)
        masks = check_masks(photos, masks)
        refined: list[np.ndarray] = []
        for indices in chunks(range(len(photos)), self.batch_size):
            inputs = self.processor(
                images=[photos[i] for i in indices],
                input_boxes=[[self.box(masks[i])] for i in indices],
                return_tensors="pt",
            )
            outputs = self.model(
                pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype),
                input_boxes=inputs["input_boxes"].to(self.device, self.model.dtype),
                multimask_output=self.multimask,
            )
            full = self.processor.image_processor.post_process_masks(
                outputs.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
            scores = outputs.iou_scores.float().cpu()  # B x boxes(1) x masks
            for row, i in enumerate(indices):
                best = int(scores[row, 0].argmax())
                mask = full[row][0, best].numpy().astype(np.uint8) * 255
                if mask.shape != photos[i].shape[:2]:  # post-processing resizes to the original size
                    raise InvalidInputError(
                        f"SAM returned a {mask.shape} mask for a {photos[i].shape[:2]} photo"
                    )
                refined.append(mask)
        return refined
