"""Captions with BLIP (transformers ``BlipForConditionalGeneration`` + ``BlipProcessor``), from a local folder.

Each caption is put into ``template``, which may use ``{caption}`` and ``{category}`` (the shop's
product category, set once for the run).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from dreampainter.errors import InvalidInputError, MissingFileError

from .common import check_photos, check_positive, chunks, one_line, require_hf_folder, resolve_device

HINT = (
    "download a BLIP captioning folder, e.g. Salesforce/blip-image-captioning-base (config.json, "
    "model.safetensors, preprocessor_config.json, tokenizer files), and set path to it"
)


def check_template(template: str, category: str | None) -> str:
    """The template, after checking it formats with ``caption`` (and ``category`` when it uses it)."""
    if not isinstance(template, str):
        raise InvalidInputError(f"template: expected a string, got {template!r}")
    try:
        template.format(caption="", category="" if category is None else category)
    except (KeyError, IndexError, ValueError) as error:
        raise InvalidInputError(
            f"template: {template!r} may only use {{caption}} and {{category}} ({one_line(error)})"
        ) from None
    if category is None and "{category}" in template:
        raise InvalidInputError(f"template: {template!r} uses {{category}} but no category is set")
    return template


class BlipCaptioner:
    """``Captioner``: one caption per image, put into ``template``."""

    def __init__(
        self,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        template: str = "{caption}",
        category: str | None = None,
        max_new_tokens: int = 30,
        batch_size: int = 8,
    ) -> None:
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = require_hf_folder(path, "BLIP captioning model folder", HINT, model_types=("blip",))
        self.template = check_template(template, category)
        self.category = category
        self.max_new_tokens = check_positive("max_new_tokens", max_new_tokens)
        self.batch_size = check_positive("batch_size", batch_size)
        self.device = resolve_device(device)
        try:
            self.processor = BlipProcessor.from_pretrained(str(folder), local_files_only=True)
        except OSError as error:
            raise MissingFileError(
                f"BLIP processor files not found in {folder} ({HINT}): {one_line(error)}"
            ) from None
        try:
            self.model = BlipForConditionalGeneration.from_pretrained(str(folder), local_files_only=True)
        except OSError as error:
            raise MissingFileError(
                f"BLIP weights not found in {folder} ({HINT}): {one_line(error)}"
            ) from None
        except (ValueError, RuntimeError) as error:
            raise InvalidInputError(
                f"{folder}: not a loadable BLIP captioning model ({one_line(error)})"
            ) from None
        self.model.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: list[np.ndarray]) -> list[str]:
        images = check_photos(images, what="images")
        captions: list[str] = []
        for indices in chunks(range(len(images)), self.batch_size):
            inputs = self.processor(images=[images[i] for i in indices], return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
            ids = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens)
            for text in self.processor.batch_decode(ids, skip_special_tokens=True):
                caption = " ".join(text.split())
                captions.append(self.template.format(caption=caption, category=self.category or "").strip())
        return captions
