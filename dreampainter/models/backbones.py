"""UNet backbones: everything that differs between Stable Diffusion 1.x/2.x and SDXL, in one module.

A backbone knows its text encoders (component names and classes), how prompts become the UNet's text
conditions (cross-attention tokens, and for SDXL the pooled embedding), the UNet's extra inputs (SDXL's
size/crop micro-conditioning ``time_ids``), its native resolution and its resolution buckets, and how to
recognise its UNet. The pipeline, the trainer, the latent cache, evaluation and the CLI ask the backbone
(:func:`backbone_for_unet`, :func:`backbone_for_folder`); a third UNet backbone is one more subclass here,
added to :data:`BACKBONES`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from dreampainter.data.loading.buckets import make_buckets, nearest_bucket
from dreampainter.errors import InvalidInputError


@dataclass
class TextConditions:
    """The UNet's per-row conditions that come from the prompt (and, for SDXL, the image size).

    ``tokens``: cross-attention tokens ``(B, L, D)``; ``pooled``: SDXL's pooled text embedding ``(B, P)``;
    ``time_ids``: SDXL's micro-conditioning ``(B, 6)`` (original size, crop top-left, target size).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TextConditions:
        """Apply ``fn`` to every tensor present."""
        return TextConditions(**{f.name: _apply(fn, getattr(self, f.name)) for f in fields(self)})

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def cat(items: Sequence[TextConditions]) -> TextConditions:
        """Rows of several conditions, stacked in order (all must have the same parts)."""
        parts = {}
        for f in fields(TextConditions):
            values = [getattr(item, f.name) for item in items]
            if any(v is None for v in values) and not all(v is None for v in values):
                raise InvalidInputError(f"text conditions: {f.name} is missing in some rows")
            parts[f.name] = None if values[0] is None else torch.cat(values)
        return TextConditions(**parts)

    def where(self, drop: torch.Tensor, other: TextConditions) -> TextConditions:
        """Rows of ``other`` (one row, broadcast) where ``drop``; ``time_ids`` are kept (they are no text)."""

        def pick(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
            if mine is None:
                return None
            mask = drop.to(device=mine.device, dtype=torch.bool).view(-1, *([1] * (mine.ndim - 1)))
            return torch.where(mask, theirs.to(device=mine.device, dtype=mine.dtype).expand_as(mine), mine)

        return replace(self, tokens=pick(self.tokens, other.tokens), pooled=pick(self.pooled, other.pooled))

    def added_cond_kwargs(self) -> dict[str, torch.Tensor]:
        """The UNet's ``added_cond_kwargs`` entries these conditions supply (empty for SD1.x/2.x)."""
        extra = {}
        if self.pooled is not None:
            extra["text_embeds"] = self.pooled
        if self.time_ids is not None:
            extra["time_ids"] = self.time_ids
        return extra


def _apply(fn, value):
    return None if value is None else fn(value)


def _unet_config(unet_or_config: Any) -> Any:
    return getattr(unet_or_config, "config", unet_or_config)


def _config_get(config: Any, key: str, default=None):
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


class Backbone:
    """One UNet family. Subclasses set the class attributes and implement :meth:`encode_text`."""

    name: ClassVar[str]
    description: ClassVar[str]
    # (tokenizer component, text encoder component, text encoder class name in transformers)
    text_components: ClassVar[tuple[tuple[str, str, str], ...]]
    default_resolution: ClassVar[int]
    size_multiple: ClassVar[int] = 64  # processing sizes of the resolution buckets
    max_aspect: ClassVar[float] = 2.0
    snaps_to_buckets: ClassVar[bool] = (
        False  # default processing size: a resolution bucket (else the input's)
    )
    upcasts_fp16_vae: ClassVar[bool] = False  # run a float16 VAE in float32 (its config's force_upcast)
    zeros_for_empty_prompt: ClassVar[bool] = False  # "no prompt" is zeros (training's text dropout follows)
    download_hint: ClassVar[str]

    @classmethod
    def matches(cls, unet_config: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def uses_pooled_text(self) -> bool:
        return False

    @property
    def component_names(self) -> tuple[str, ...]:
        """The text components' names in a pipeline folder, tokenizers first."""
        return tuple(t for t, _, _ in self.text_components) + tuple(e for _, e, _ in self.text_components)

    def encode_text(
        self, holder: Any, texts: list[str], device: torch.device, texts_2: list[str] | None = None
    ) -> TextConditions:
        """Prompts -> tokens (and pooled embeddings), one row per text. ``holder`` has the text components
        as attributes (a pipeline, or the trainer's components)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def time_ids(
        self,
        unet: Any,
        original_sizes: Sequence[tuple[int, int]],
        target_size: tuple[int, int],
        crops: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor | None:
        """The micro-conditioning per row (``None`` for backbones without it). Sizes are ``(height, width)``."""
        return None

    def null_conditions(
        self, unet: Any, rows: int, pixel_size: tuple[int, int], device: torch.device, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """The UNet's extra inputs for a pass without a prompt (the in-context reference pass): none for SD;
        for SDXL zero pooled embeddings and the pass's own size as micro-conditioning."""
        return {}

    def buckets(self, resolution: int | None = None) -> list[tuple[int, int]]:
        """Resolution buckets ``(height, width)`` with area about ``resolution**2`` (default: native)."""
        return make_buckets(resolution or self.default_resolution, self.size_multiple, self.max_aspect)

    def bucket_size(self, width: int, height: int, resolution: int | None = None) -> tuple[int, int]:
        """The ``(width, height)`` bucket closest in aspect ratio to an input of that size."""
        buckets = self.buckets(resolution)
        bucket_height, bucket_width = buckets[nearest_bucket((width, height), buckets)]
        return bucket_width, bucket_height


def _tokenize(tokenizer, texts: list[str], device: torch.device):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).to(device)


class StableDiffusion(Backbone):
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden states as cross-attention tokens."""

    name = "sd"
    description = "Stable Diffusion 1.x/2.x (one text encoder)"
    text_components = (("tokenizer", "text_encoder", "CLIPTextModel"),)
    default_resolution = 512
    download_hint = (
        "download a Stable-Diffusion-1.5 inpainting model in diffusers format (e.g. "
        "stable-diffusion-v1-5/stable-diffusion-inpainting)"
    )

    @classmethod
    def matches(cls, unet_config: Any) -> bool:
        return _config_get(_unet_config(unet_config), "addition_embed_type") is None

    def encode_text(self, holder, texts, device, texts_2=None) -> TextConditions:
        if texts_2 is not None and texts_2 != texts:
            raise InvalidInputError(
                "prompt_2 / negative_prompt_2: this model has one text encoder (SDXL has two)"
            )
        tokenizer, encoder = holder.tokenizer, holder.text_encoder
        tokens = _tokenize(tokenizer, texts, device)
        attention_mask = (
            tokens.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
        )
        return TextConditions(encoder(tokens.input_ids, attention_mask=attention_mask)[0])


class StableDiffusionXL(Backbone):
    """SDXL: two CLIP text encoders (penultimate hidden states, concatenated), the second one's pooled
    projection, and the size/crop micro-conditioning (``addition_embed_type="text_time"``)."""

    name = "sdxl"
    description = "Stable Diffusion XL (two text encoders, pooled embeddings, size/crop conditioning)"
    text_components = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
    )
    default_resolution = 1024
    max_aspect = 4.0  # SDXL was trained on buckets from 512x2048 to 2048x512
    snaps_to_buckets = True
    upcasts_fp16_vae = True
    zeros_for_empty_prompt = True  # diffusers' SDXL pipelines: force_zeros_for_empty_prompt
    download_hint = (
        "download an SDXL inpainting model in diffusers format (e.g. "
        "diffusers/stable-diffusion-xl-1.0-inpainting-0.1)"
    )

    @classmethod
    def matches(cls, unet_config: Any) -> bool:
        return _config_get(_unet_config(unet_config), "addition_embed_type") == "text_time"

    @property
    def uses_pooled_text(self) -> bool:
        return True

    def encode_text(self, holder, texts, device, texts_2=None) -> TextConditions:
        texts_2 = texts if texts_2 is None else texts_2
        if len(texts_2) != len(texts):
            raise InvalidInputError(f"prompt_2: got {len(texts_2)} prompts for {len(texts)} prompts")
        hidden, pooled = [], None
        for (tokenizer_name, encoder_name, _), batch in zip(self.text_components, (texts, texts_2)):
            tokenizer, encoder = getattr(holder, tokenizer_name, None), getattr(holder, encoder_name, None)
            if encoder is None:
                continue  # diffusers allows an SDXL pipeline with only the second encoder (the refiner)
            output = encoder(_tokenize(tokenizer, batch, device).input_ids, output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        if not hidden or pooled is None:
            raise InvalidInputError(
                "text_encoder_2: SDXL needs a CLIPTextModelWithProjection as its second text encoder"
            )
        return TextConditions(torch.cat(hidden, dim=-1), pooled)

    def null_conditions(self, unet, rows, pixel_size, device, dtype) -> dict[str, torch.Tensor]:
        config = _unet_config(unet)
        pooled_dim = _config_get(config, "projection_class_embeddings_input_dim") - 6 * _config_get(
            config, "addition_time_embed_dim"
        )
        return {
            "text_embeds": torch.zeros((rows, pooled_dim), device=device, dtype=dtype),
            "time_ids": self.time_ids(unet, [pixel_size] * rows, pixel_size).to(device=device, dtype=dtype),
        }

    def time_ids(self, unet, original_sizes, target_size, crops=None) -> torch.Tensor:
        crops = crops or [(0, 0)] * len(original_sizes)
        rows = [[*original, *crop, *target_size] for original, crop in zip(original_sizes, crops)]
        return torch.tensor(rows, dtype=torch.float32)


BACKBONES: tuple[type[Backbone], ...] = (StableDiffusionXL, StableDiffusion)


def backbone_named(name: str) -> Backbone:
    for cls in BACKBONES:
        if cls.name == name:
            return cls()
    raise InvalidInputError(f"backbone: unknown {name!r}; known: {[cls.name for cls in BACKBONES]}")


def backbone_for_unet(unet_or_config: Any) -> Backbone:
    """The backbone of a UNet (or its config / config dict)."""
    for cls in BACKBONES:
        if cls.matches(unet_or_config):
            return cls()
    kind = _config_get(_unet_config(unet_or_config), "addition_embed_type")
    raise InvalidInputError(
        f"unet: addition_embed_type {kind!r} is not a supported backbone (SD 1.x/2.x or SDXL)"
    )


def backbone_for_folder(folder: str | os.PathLike) -> Backbone:
    """The backbone of a diffusers / DreamPainter pipeline folder, from ``unet/config.json``."""
    path = Path(folder) / "unet" / "config.json"
    if not path.exists():
        raise InvalidInputError(f"{folder}: no unet/config.json; not a diffusers pipeline folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidInputError(f"{path}: not readable JSON ({error})") from error
    return backbone_for_unet(config)
