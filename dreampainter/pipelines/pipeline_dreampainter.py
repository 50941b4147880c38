"""DreamPainterPipeline: product photo + prompt + reference image -> the product on a new background.

A diffusers ``DiffusionPipeline`` around an SD inpainting UNet with the reference adapter installed.
Each denoising step makes one batched UNet call over the guidance branches that matter (see
``guidance.py``); the product's pixels are pasted back from the input at the end.

``__call__`` runs the steps of diffusers' ``StableDiffusionInpaintPipeline``, each its own method:
``check_inputs``; the conditions (``encode_prompt``, ``encode_reference``, then
``prepare_branch_conditions`` lays them out per guidance branch); ``prepare_latents`` (noise) and
``prepare_mask_latents`` (mask and masked-photo latents), in that order of random draws; the
denoising loop (``_denoise``); ``_finish`` (decode, resize to the input size, paste the product back).
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from dreampainter.errors import InvalidInputError, require_file
from dreampainter.models import has_reference_adapter, set_rows
from dreampainter.models.backbones import Backbone, StableDiffusionXL, TextConditions, backbone_for_unet
from dreampainter.pipelines import reference_support
from dreampainter.pipelines.guidance import (
    TEXT,
    TEXT_REF,
    UNCOND,
    GuidancePlan,
    ReferenceGuidanceSchedule,
    ScheduledGuidance,
    check_guidance_scale,
)
from dreampainter.pipelines.image_processing import (
    DEFAULT_FEATHER_RADIUS,
    ProductInput,
    composite,
    feathered_alpha,
    inpainting_mask,
    prepare_product_input,
    processing_size,
    to_pil_image,
)

# The adapter's folder inside a saved pipeline (adapter.safetensors + adapter_config.json).
ADAPTER_SUBFOLDER = "reference_adapter"


@dataclass
class DreamPainterPipelineOutput(BaseOutput):
    """``images``: results at the input size (list of PIL, or arrays / tensors); ``masks``: the inpainting
    masks used (``L`` images at the input size, 255 = repainted), one per result."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | list
    masks: list[PIL.Image.Image]


def _as_list(value, name: str) -> list:
    """A list of items: lists and tuples as they are, batched arrays split along their first axis.

    Batched forms are diffusers': numpy ``(B, H, W, C)`` and torch ``(B, C, H, W)`` images, and masks as
    numpy ``(B, H, W)`` / ``(B, H, W, 1)`` or torch ``(B, 1, H, W)`` / ``(B, H, W)``.
    """
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInputError(f"{name}: the list is empty")
        return list(value)
    if isinstance(value, (np.ndarray, torch.Tensor)) and _is_batched(value, name):
        if value.shape[0] == 0:
            raise InvalidInputError(f"{name}: the batch is empty")
        return list(value)
    return [value]


def _is_batched(array, name: str) -> bool:
    """Whether an array holds a batch: 4-D always; 3-D only for masks ``(B, H, W)`` (B > 1, last axis not 1)."""
    if array.ndim == 4:
        return True
    is_mask = name == "product_mask"
    return is_mask and array.ndim == 3 and array.shape[0] > 1 and array.shape[-1] != 1


def _broadcast(values: list, batch_size: int, name: str) -> list:
    """One value per prompt: a single value is shared; otherwise the lengths must match."""
    if len(values) == 1:
        return values * batch_size
    if len(values) != batch_size:
        raise InvalidInputError(
            f"{name}: got {len(values)} values for {batch_size} prompts (give 1 or {batch_size})"
        )
    return values


def _masks_for(images: list, product_mask) -> list:
    """One mask per image: none (RGBA images), one each, or a single mask shared by every image."""
    if product_mask is None:
        return [None] * len(images)
    masks = _as_list(product_mask, "product_mask")
    if len(masks) == 1:
        return masks * len(images)
    if len(masks) != len(images):
        raise InvalidInputError(f"product_mask: got {len(masks)} masks for {len(images)} images (give 1 or {len(images)})")
    return masks


def _sample_latents(encoded, generator) -> torch.Tensor:
    """A sample of a VAE's posterior (``AutoencoderKL``), or its deterministic latents (``AutoencoderTiny``)."""
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.sample(generator)
    if hasattr(encoded, "latents"):
        return encoded.latents
    raise InvalidInputError(f"vae: its encode() output ({type(encoded).__name__}) has no latents")


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InvalidInputError(f"{name}: must be a positive integer, got {value!r}")
    return int(value)


def _negative_prompts(negative_prompt, batch_size: int) -> list[str]:
    """One negative prompt per prompt (``None`` = the empty prompt)."""
    return _broadcast(_as_list(negative_prompt or "", "negative_prompt"), batch_size, "negative_prompt")


# Callback tensor names that are parts of the text conditions (see ``TextConditions``).
_TEXT_PARTS = {"prompt_embeds": "tokens", "add_text_embeds": "pooled", "add_time_ids": "time_ids"}


def _added_tensors(added_cond_kwargs: dict | None) -> dict[str, torch.Tensor | None]:
    """A UNet call's ``added_cond_kwargs`` under their callback names (``None`` where absent)."""
    added = added_cond_kwargs or {}
    return {
        "image_embeds": added.get("image_embeds"),
        "add_text_embeds": added.get("text_embeds"),
        "add_time_ids": added.get("time_ids"),
    }


@dataclass
class BranchConditions:
    """The UNet's conditions of each guidance branch (``text``: prompt rows, with SDXL's pooled embeddings and
    time ids; ``image``: projection inputs, ``None`` without the decoupled adapter; ``in_context``: the
    recorded reference each row attends to, -1 for none, ``None`` without in-context conditioning), laid out
    for a plan's branches at every step."""

    text: dict[str, TextConditions]
    image: dict[str, torch.Tensor] | None
    in_context: dict[str, torch.Tensor] | None = None

    def in_context_rows(self, plan: GuidancePlan) -> torch.Tensor | None:
        """The in-context reference row of every row of one batched call over ``plan.branches``."""
        if self.in_context is None:
            return None
        return torch.cat([self.in_context[branch] for branch in plan.branches])

    def available(self) -> set[str]:
        return set(self.text) & (set(self.image) if self.image is not None else set(self.text))

    def for_plan(self, plan: GuidancePlan) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """``(encoder_hidden_states, added_cond_kwargs)`` for one batched call over ``plan.branches``."""
        text = TextConditions.cat([self.text[branch] for branch in plan.branches])
        added = text.added_cond_kwargs()
        if self.image is not None:
            added["image_embeds"] = torch.cat([self.image[branch] for branch in plan.branches])
        return text.tokens, added or None

    def replace(self, plan: GuidancePlan, name: str, value: torch.Tensor) -> None:
        """Take ``value`` (branch rows in ``plan``'s order, as a callback returns them) as the new ``name``."""
        if name not in _TEXT_PARTS and self.image is None:
            raise InvalidInputError(f"callback_on_step_end returned {name}, but this UNet has no reference adapter")
        if value.shape[0] % plan.num_branches:
            raise InvalidInputError(
                f"callback_on_step_end returned {name} with {value.shape[0]} rows; the guidance branches "
                f"{list(plan.branches)} need a multiple of {plan.num_branches}"
            )
        for branch, rows in zip(plan.branches, value.chunk(plan.num_branches)):
            if name in _TEXT_PARTS:
                self.text[branch] = replace(self.text[branch], **{_TEXT_PARTS[name]: rows})
            else:
                self.image[branch] = rows


class DreamPainterPipeline(DiffusionPipeline):
    """Product-background inpainting controlled by a prompt and a reference image.

    Components: ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` (a 9-channel inpainting UNet, with the
    reference adapter installed for reference control), ``scheduler`` and ``reference_encoder``
    (optional: without it the pipeline is text-only and equals diffusers'
    ``StableDiffusionInpaintPipeline``). An SDXL UNet (``addition_embed_type="text_time"``) also needs
    ``text_encoder_2`` / ``tokenizer_2``; text-only it equals ``StableDiffusionXLInpaintPipeline``. What
    differs between the two is the :attr:`backbone` (``dreampainter.models.backbones``).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->reference_encoder->unet->vae"
    # vae / unet / scheduler may be None for a pipeline that only encodes prompts (``encode_prompt``).
    _optional_components = ["reference_encoder", "vae", "unet", "scheduler", "text_encoder_2", "tokenizer_2"]
    # Tensors a step-end callback may read; those it returns replace the loop's (``noise_pred`` is read-only).
    # ``prompt_embeds`` / ``image_embeds`` are the UNet's rows for every guidance branch run, in branch
    # order (as diffusers' ``[negative, positive]``); the mask latents have one row per generated image.
    # ``add_text_embeds`` / ``add_time_ids``: SDXL's pooled embeddings and micro-conditioning, likewise.
    _callback_tensor_inputs = [
        "latents", "prompt_embeds", "image_embeds", "mask_latents", "masked_image_latents", "noise_pred",
        "add_text_embeds", "add_time_ids",
    ]  # fmt: skip

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        reference_encoder=None,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            reference_encoder=reference_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        # SDXL: no negative prompt -> zero negative conditions, as diffusers' SDXL pipelines (SD ignores it).
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Save every component; the UNet as a plain diffusers UNet, the adapter in ``reference_adapter/``.

        Keeping the adapter out of ``unet/`` means ``unet/`` loads with ``UNet2DConditionModel`` (or into
        diffusers' own pipelines) and the adapter is one small folder to swap or export.
        """
        from dreampainter.models import check_adapter_complete, save_adapter, without_reference_adapter

        if getattr(self.unet, "peft_config", None):
            raise InvalidInputError(
                "save_pretrained: the UNet carries an unfused LoRA, which would not load back as a plain UNet; "
                "fuse it first (pipe.unet.fuse_lora(); pipe.unet.unload_lora()) or save it on its own "
                "(pipe.unet.save_lora_adapter(folder))"
            )
        if self.has_reference_adapter:
            check_adapter_complete(self.unet)  # before anything is written
        adapter_folder = Path(save_directory) / ADAPTER_SUBFOLDER
        if adapter_folder.exists():
            shutil.rmtree(adapter_folder)  # never leave a stale adapter beside a new UNet
        if not self.has_reference_adapter:
            super().save_pretrained(save_directory, **kwargs)
            return
        with without_reference_adapter(self.unet):
            super().save_pretrained(save_directory, **kwargs)
        save_adapter(self.unet, adapter_folder)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs
    ) -> DreamPainterPipeline:
        """Load a folder written by :meth:`save_pretrained` (local only), re-installing the adapter."""
        from dreampainter.models import load_adapter

        folder = Path(pretrained_model_name_or_path)
        require_file(
            folder / "model_index.json",
            "pipeline folder (model_index.json)",
            "write one with save_pretrained",
        )
        pipe = super().from_pretrained(str(folder), **kwargs)
        adapter_folder = folder / ADAPTER_SUBFOLDER
        if adapter_folder.exists():
            load_adapter(pipe.unet, adapter_folder)
        return pipe

    @classmethod
    def from_parts(
        cls,
        base: str | os.PathLike,
        *,
        base_config: str | os.PathLike | None = None,
        reference_encoder: str | os.PathLike | None = None,
        open_clip_model: str | None = None,
        adapter: str | os.PathLike | None = None,
        adapter_scale: float | None = None,
        lora: str | os.PathLike | None = None,
        lora_scale: float = 1.0,
        fuse_lora: bool = True,
    ) -> DreamPainterPipeline:
        """Build a pipeline from local public weights (SD or SDXL inpainting, a CLIP image encoder, an IP-Adapter,
        optionally a LoRA) without the trainer; see :func:`dreampainter.pipelines.assembly.assemble_components`."""
        from dreampainter.pipelines.assembly import assemble_components

        return cls(
            **assemble_components(
                base,
                base_config=base_config,
                reference_encoder=reference_encoder,
                open_clip_model=open_clip_model,
                adapter=adapter,
                adapter_scale=adapter_scale,
                lora=lora,
                lora_scale=lora_scale,
                fuse_lora=fuse_lora,
            )
        )

    # ------------------------------------------------------------------ conditions

    @property
    def has_reference_adapter(self) -> bool:
        """Whether the UNet carries the reference adapter (else only text-only generation is possible)."""
        return has_reference_adapter(self.unet)

    @property
    def backbone(self) -> Backbone:
        """The UNet family (SD 1.x/2.x or SDXL): text encoding, micro-conditioning, default sizes."""
        if self.unet is not None:
            return backbone_for_unet(self.unet)
        return StableDiffusionXL() if self.text_encoder_2 is not None else backbone_for_unet({})

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, ...]:
        """Text-encoder states, one row per generated image, as diffusers' ``encode_prompt``.

        SD 1.x/2.x: ``(prompt_embeds, negative_prompt_embeds)``. SDXL: ``(prompt_embeds,
        negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)``, the two encoders'
        penultimate states concatenated (``prompt_2`` / ``negative_prompt_2`` go to the second encoder,
        default: the same texts; no ``negative_prompt`` gives zeros when ``force_zeros_for_empty_prompt``).
        The negative ones only with ``do_classifier_free_guidance``. Given embeddings (one row per prompt)
        are used as they are. Works on a pipeline built with only its text encoders and tokenizers.
        """
        text, negative = self.encode_text_conditions(
            prompt, device, num_images_per_prompt, do_classifier_free_guidance, negative_prompt,
            prompt_embeds, negative_prompt_embeds, prompt_2=prompt_2, negative_prompt_2=negative_prompt_2,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )  # fmt: skip
        negative_tokens = None if negative is None else negative.tokens
        if not self.backbone.uses_pooled_text:
            return text.tokens, negative_tokens
        return text.tokens, negative_tokens, text.pooled, None if negative is None else negative.pooled

    def encode_text_conditions(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        *,
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[TextConditions, TextConditions | None]:
        """:meth:`encode_prompt` as :class:`TextConditions` (tokens, and SDXL's pooled embeddings)."""
        device = device or self._execution_device
        dtype = self.unet.dtype if self.unet is not None else self.text_encoder.dtype
        backbone = self.backbone
        pooled_needed = backbone.uses_pooled_text

        def encode(texts: list[str], texts_2: list[str] | None) -> TextConditions:
            return backbone.encode_text(self, texts, device, texts_2)

        def given(tokens: torch.Tensor, pooled: torch.Tensor | None, name: str) -> TextConditions:
            if pooled_needed and pooled is None:
                raise InvalidInputError(f"{name}: SDXL needs the pooled embeddings too (pooled_{name})")
            return TextConditions(tokens, pooled if pooled_needed else None)

        def per_image(conditions: TextConditions) -> TextConditions:
            return conditions.map(
                lambda t: t.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)
            )

        if prompt_embeds is None:
            prompts = _as_list(prompt, "prompt")
            text = encode(prompts, None if prompt_2 is None else _broadcast(_as_list(prompt_2, "prompt_2"), len(prompts), "prompt_2"))
        else:
            text = given(prompt_embeds, pooled_prompt_embeds, "prompt_embeds")
        negative = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is not None:
                negative = given(negative_prompt_embeds, negative_pooled_prompt_embeds, "negative_prompt_embeds")
            elif pooled_needed and negative_prompt is None and self.config.get("force_zeros_for_empty_prompt", True):
                negative = text.map(torch.zeros_like)
            else:
                negatives = _negative_prompts(negative_prompt, text.rows)
                negatives_2 = None
                if negative_prompt_2 is not None:
                    negatives_2 = _broadcast(_as_list(negative_prompt_2, "negative_prompt_2"), text.rows, "negative_prompt_2")
                negative = encode(negatives, negatives_2)
            negative = per_image(negative)
        return per_image(text), negative

    def encode_reference(
        self, references: list[PIL.Image.Image | None], device: torch.device, num_images_per_prompt: int
    ) -> torch.Tensor:
        """Adapter input features, one row per generated image; rows without a reference are zeros."""
        given = [image for image in references if image is not None]
        encoder = self.reference_encoder
        pixel_values = encoder.preprocess(given).to(device=device, dtype=encoder.dtype)
        features = reference_support.features_for_adapter(self.unet, encoder(pixel_values))
        features = features.to(dtype=self.unet.dtype)
        rows = torch.zeros((len(references), *features.shape[1:]), dtype=features.dtype, device=device)
        present = [index for index, image in enumerate(references) if image is not None]
        rows[present] = features
        return rows.repeat_interleave(num_images_per_prompt, dim=0)

    def prepare_branch_conditions(
        self,
        prompt_embeds: torch.Tensor | TextConditions,
        negative_embeds: torch.Tensor | TextConditions | None,
        reference_features: torch.Tensor | None,
        device: torch.device,
    ) -> BranchConditions:
        """The UNet's conditions per guidance branch: the negative prompt rows for ``UNCOND``, the prompt rows
        otherwise; with the adapter installed, ``reference_features`` for ``TEXT_REF`` and zeros ("no
        reference") for the other branches. Branches whose inputs are missing are left out. The text rows
        are tensors (SD) or :class:`TextConditions` (with SDXL's pooled embeddings and time ids)."""
        if isinstance(prompt_embeds, torch.Tensor):
            prompt_embeds = TextConditions(prompt_embeds)
        if isinstance(negative_embeds, torch.Tensor):
            negative_embeds = TextConditions(negative_embeds)
        text = {TEXT: prompt_embeds, TEXT_REF: prompt_embeds}
        if negative_embeds is not None:
            text[UNCOND] = negative_embeds
        if not reference_support.uses_decoupled(self.unet):
            return BranchConditions(text, None)
        no_reference = reference_support.zero_features(
            self.unet, prompt_embeds.rows, device, self.unet.dtype, like=reference_features
        )
        image = {branch: no_reference for branch in (UNCOND, TEXT)}
        if reference_features is not None:
            image[TEXT_REF] = reference_features
        return BranchConditions(text, image)

    # ------------------------------------------------------------------ inputs

    def check_inputs(
        self,
        prompt,
        image,
        product_mask=None,
        reference_image=None,
        negative_prompt=None,
        *,
        text_guidance_scale: float = 7.5,
        reference_guidance_scale: float | None = None,
        reference_scale: float | dict | None = None,
        reference_guidance_interval: tuple[float, float] | None = None,
        reference_guidance_every: int = 1,
        num_inference_steps: int = 30,
        num_images_per_prompt: int = 1,
        generator=None,
        height: int | None = None,
        width: int | None = None,
        resolution: int | None = None,
        product_dilation: int = 0,
        feather_radius: float = DEFAULT_FEATHER_RADIUS,
        output_type: str = "pil",
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        reference_image_embeds: torch.Tensor | None = None,
    ) -> None:
        """Validate the arguments of :meth:`__call__` without decoding an image or running a model.

        Raises :class:`InvalidInputError` (one line, naming the argument) for the first problem found.
        The images themselves (decoding, sizes, masks, ``max_pixels``) are checked when they are prepared.
        """
        batch_size = self._check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds)
        if image is None:
            raise InvalidInputError("image: the product photo is required")
        _check_positive_int(num_inference_steps, "num_inference_steps")
        num_images_per_prompt = _check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        if (
            reference_scale is not None
            and not isinstance(reference_scale, dict)
            and not (
                isinstance(reference_scale, (int, float))
                and math.isfinite(reference_scale)
                and reference_scale >= 0
            )
        ):
            raise InvalidInputError(f"reference_scale: must be a finite number >= 0, got {reference_scale!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InvalidInputError(f"output_type: must be pil, np, pt or latent, got {output_type!r}")
        if product_dilation < 0 or not math.isfinite(feather_radius) or feather_radius < 0:
            raise InvalidInputError("product_dilation and feather_radius: must be >= 0")
        unknown = sorted(set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise InvalidInputError(
                f"callback_on_step_end_tensor_inputs: unknown {unknown}; available: {self._callback_tensor_inputs}"
            )
        num_rows = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != num_rows:
            raise InvalidInputError(
                f"generator: got {len(generator)} generators for {num_rows} results "
                f"({batch_size} prompts x {num_images_per_prompt} images)"
            )

        images = _as_list(image, "image")
        _masks_for(images, product_mask)
        _broadcast(images, batch_size, "image")
        if reference_image_embeds is not None:
            self._check_reference_embeds(reference_image, reference_image_embeds, batch_size)
        if reference_image is not None:
            references = _broadcast(
                _as_list(reference_image, "reference_image"), batch_size, "reference_image"
            )
            if any(reference is not None for reference in references) and (
                not self.has_reference_adapter
                or (self.reference_encoder is None and reference_support.uses_decoupled(self.unet))
            ):
                raise InvalidInputError(
                    "reference_image: this pipeline has no reference encoder and adapter; it can only generate from text"
                )
        check_guidance_scale(text_guidance_scale, "text_guidance_scale")
        if reference_guidance_scale is not None:
            check_guidance_scale(reference_guidance_scale, "reference_guidance_scale")
        ReferenceGuidanceSchedule.create(reference_guidance_interval, reference_guidance_every)
        self._check_size_arguments(height, width, resolution)

    @staticmethod
    def _check_text_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds) -> int:
        """Check the prompt arguments; returns the number of prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise InvalidInputError("prompt / prompt_embeds: give exactly one of them")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise InvalidInputError("negative_prompt / negative_prompt_embeds: give at most one of them")
        if prompt_embeds is None:
            prompts = _as_list(prompt, "prompt")
            if not all(isinstance(text, str) for text in prompts):
                raise InvalidInputError("prompt: must be a string or a list of strings")
            batch_size = len(prompts)
        else:
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
                raise InvalidInputError("prompt_embeds: must be a (prompts, tokens, width) tensor")
            batch_size = prompt_embeds.shape[0]
        if negative_prompt_embeds is not None and (
            prompt_embeds is None or negative_prompt_embeds.shape != prompt_embeds.shape
        ):
            raise InvalidInputError(
                "negative_prompt_embeds: needs prompt_embeds of the same shape, got "
                f"{tuple(negative_prompt_embeds.shape)} and "
                f"{None if prompt_embeds is None else tuple(prompt_embeds.shape)}"
            )
        _negative_prompts(negative_prompt, batch_size)
        return batch_size

    def _check_reference_embeds(self, reference_image, embeds, batch_size: int) -> None:
        if reference_image is not None:
            raise InvalidInputError("reference_image / reference_image_embeds: give at most one of them")
        if not self.has_reference_adapter:
            raise InvalidInputError("reference_image_embeds: this pipeline has no reference adapter")
        if not isinstance(embeds, torch.Tensor) or embeds.shape[0] not in (1, batch_size):
            rows = embeds.shape[0] if isinstance(embeds, torch.Tensor) else type(embeds).__name__
            raise InvalidInputError(f"reference_image_embeds: expected 1 or {batch_size} rows, got {rows}")

    def _check_size_arguments(self, height, width, resolution) -> None:
        factor = self.vae_scale_factor
        if (height is None) != (width is None):
            raise InvalidInputError("height/width: give both or neither")
        if height is not None:
            for name, value in (("height", height), ("width", width)):
                if _check_positive_int(value, name) % factor:
                    raise InvalidInputError(
                        f"{name}: must be a multiple of {factor} (the VAE's factor), got {value}"
                    )
        if resolution is not None:
            _check_positive_int(resolution, "resolution")

    def _prepare_products(
        self, image, product_mask, batch_size: int, max_pixels: int | None
    ) -> list[ProductInput]:
        images = _as_list(image, "image")
        masks = _masks_for(images, product_mask)
        products = [
            prepare_product_input(
                picture,
                mask,
                name="image" if len(images) == 1 else f"image[{index}]",
                mask_name="product_mask" if len(images) == 1 else f"product_mask[{index}]",
                max_pixels=max_pixels,
            )
            for index, (picture, mask) in enumerate(zip(images, masks))
        ]
        return _broadcast(products, batch_size, "image")

    def _prepare_references(self, reference_image, batch_size: int, max_pixels: int | None) -> list:
        if reference_image is None:
            return [None] * batch_size
        references = _as_list(reference_image, "reference_image")
        references = [
            None
            if reference is None
            else to_pil_image(
                reference,
                "reference_image" if len(references) == 1 else f"reference_image[{index}]",
                max_pixels=max_pixels,
            )
            for index, reference in enumerate(references)
        ]
        return _broadcast(references, batch_size, "reference_image")

    def _processing_sizes(
        self, products: list[ProductInput], height: int | None, width: int | None, resolution: int | None
    ) -> list[tuple[int, int]]:
        """The (width, height) each product is processed at: given; else its size rounded to the VAE factor
        (SD), or the backbone's resolution bucket of the closest aspect ratio (SDXL)."""
        if height is not None:
            return [(int(width), int(height))] * len(products)
        if self.backbone.snaps_to_buckets:  # SDXL: the resolution bucket closest in aspect ratio
            return [self.backbone.bucket_size(*product.size, resolution) for product in products]
        return [processing_size(*product.size, self.vae_scale_factor, resolution) for product in products]

    def _preprocess_products(
        self,
        products: list[ProductInput],
        product_dilation: int,
        height: int,
        width: int,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor, list[PIL.Image.Image]]:
        """``(init_image, mask_condition, inpaint_masks)``: the photos in [-1, 1] and the binarized inpainting
        masks (1 = repaint) at the processing size, in the VAE's dtype; the masks as ``L`` images too."""
        inpaint_masks = [inpainting_mask(product.product_mask, product_dilation) for product in products]
        init_image = self.image_processor.preprocess([p.image for p in products], height=height, width=width)
        mask_condition = self.mask_processor.preprocess(inpaint_masks, height=height, width=width)
        init_image = init_image.to(device=device, dtype=self.vae.dtype)  # the VAE may run in another dtype
        mask_condition = mask_condition.to(device=device, dtype=self.vae.dtype)
        return init_image, mask_condition, inpaint_masks

    def _call_per_size(
        self,
        sizes: list[tuple[int, int]],
        prompts: list[str],
        products: list[ProductInput],
        references: list,
        negative_prompt,
        generator,
        num_images_per_prompt: int,
        output_type: str,
        return_dict: bool,
        shared: dict,
    ):
        """Images needing different processing sizes: one batched call per size, results in input order."""
        n = num_images_per_prompt
        if isinstance(negative_prompt, (list, tuple)):
            negative_prompt = _broadcast(list(negative_prompt), len(prompts), "negative_prompt")
        rows: list = [None] * (len(prompts) * n)
        masks: list = [None] * (len(prompts) * n)
        per_prompt = {}  # SDXL's second prompts, grouped like the prompts
        for name in ("prompt_2", "negative_prompt_2"):
            if isinstance(shared.get(name), (list, tuple)):
                per_prompt[name] = _broadcast(list(shared.pop(name)), len(prompts), name)
        for size in dict.fromkeys(sizes):
            group = [i for i, other in enumerate(sizes) if other == size]
            output = self(
                **{name: [values[i] for i in group] for name, values in per_prompt.items()},
                prompt=[prompts[i] for i in group],
                image=[products[i].image for i in group],
                product_mask=[products[i].product_mask for i in group],
                reference_image=[references[i] for i in group],
                negative_prompt=[negative_prompt[i] for i in group]
                if isinstance(negative_prompt, list)
                else negative_prompt,
                generator=[generator[i * n + k] for i in group for k in range(n)]
                if isinstance(generator, list)
                else generator,
                num_images_per_prompt=n,
                output_type=output_type,
                **shared,
            )
            for j, i in enumerate(group):
                for k in range(n):
                    rows[i * n + k] = output.images[j * n + k]
                    masks[i * n + k] = output.masks[j * n + k]
        if output_type in ("np", "pt", "latent") and len({tuple(row.shape) for row in rows}) == 1:
            rows = np.stack(rows) if output_type == "np" else torch.stack(rows)
        if not return_dict:
            return rows, masks
        return DreamPainterPipelineOutput(images=rows, masks=masks)

    # ------------------------------------------------------------------ latents

    def _prepare_timesteps(self, num_inference_steps: int, device: torch.device) -> torch.Tensor:
        """Set the scheduler's timesteps for a full-strength run (starting at its first step)."""
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        return self.scheduler.timesteps

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The initial latents: ``latents`` if given, else Gaussian noise, scaled by the scheduler's initial sigma.

        Noise is drawn with ``generator`` (one per row when a list), like diffusers' pipelines.
        """
        shape = (
            batch_size,
            num_channels_latents,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise InvalidInputError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_mask_latents(
        self,
        mask: torch.Tensor,
        masked_image: torch.Tensor,
        num_images_per_prompt: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask_latents, masked_image_latents)``: the inpainting mask at latent size and the VAE latents of
        the masked photos, one row per generated image.

        ``mask`` (1 = repaint) and ``masked_image`` (the photo in [-1, 1], zero where repainted) have one
        row per prompt at the processing size ``height`` x ``width``; the latents are sampled with
        ``generator`` (row ``i * num_images_per_prompt``'s generator for prompt ``i`` when a list).
        """
        masked_latents = self._encode_masked_images(masked_image, generator, num_images_per_prompt)
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        mask_latents = F.interpolate(mask, size=latent_size).to(dtype)
        mask_latents = mask_latents.repeat_interleave(num_images_per_prompt, dim=0)
        masked_latents = masked_latents.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        return mask_latents, masked_latents

    def _encode_masked_images(
        self, masked_images: torch.Tensor, generator, rows_per_image: int
    ) -> torch.Tensor:
        """VAE latents (sampled, like diffusers) of the masked images; generator lists align with result rows."""
        with self._vae_precision():
            masked_images = masked_images.to(self.vae.dtype)
            if isinstance(generator, list):
                latents = [
                    _sample_latents(self.vae.encode(masked_images[i : i + 1]), generator[i * rows_per_image])
                    for i in range(masked_images.shape[0])
                ]
                latents = torch.cat(latents)
            else:
                latents = _sample_latents(self.vae.encode(masked_images), generator)
        return self.vae.config.scaling_factor * latents

    @contextmanager
    def _vae_precision(self):
        """SDXL's VAE overflows in float16: run it in float32 (``force_upcast``), as diffusers' SDXL pipelines."""
        upcast = (
            self.backbone.upcasts_fp16_vae
            and self.vae.dtype == torch.float16
            and getattr(self.vae.config, "force_upcast", False)
        )
        if upcast:
            self.vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                self.vae.to(torch.float16)

    def _extra_step_kwargs(self, generator, eta: float) -> dict:
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------ generation

    # ------------------------------------------------------------------ diffusers' pipeline conveniences

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023) on the UNet's up blocks; SD1.5 values: s1=0.9, s2=0.2, b1=1.5, b2=1.6."""
        self.unet.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        self.unet.disable_freeu()

    def fuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        """Fuse the attention projections (query/key/value, or key/value for cross-attention); the
        reference branch is unaffected (it belongs to the attention modules, not their processors)."""
        if unet:
            self.unet.fuse_qkv_projections()
        if vae and self.vae is not None and hasattr(self.vae, "fuse_qkv_projections"):
            self.vae.fuse_qkv_projections()

    def unfuse_qkv_projections(self, unet: bool = True, vae: bool = True) -> None:
        if unet:
            self.unet.unfuse_qkv_projections()
        if vae and self.vae is not None and hasattr(self.vae, "unfuse_qkv_projections"):
            self.vae.unfuse_qkv_projections()

    def enable_vae_slicing(self) -> None:
        """Decode the batch one image at a time (less memory for large batches)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Encode and decode in overlapping tiles (large images in bounded memory)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def set_ip_adapter_scale(self, scale: float | dict) -> None:
        """The attention-level reference scale under diffusers' name (so callbacks such as
        ``IPAdapterScaleCutoffCallback`` work); same as ``reference_scale`` at call time, but persistent."""
        reference_support.set_scale(self.unet, scale)

    # ------------------------------------------------------------------ state a step-end callback can read

    @property
    def guidance_scale(self) -> float:
        """The text guidance scale ``s_text`` of the running call (diffusers' name); a callback may change it."""
        return self._guidance_scale

    @property
    def reference_guidance_scale(self) -> float:
        """The reference guidance scale ``s_ref`` of the running call; a callback may change it."""
        return self._reference_guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the unconditional branch runs (the text is guided)."""
        return UNCOND in self._plan.branches

    @property
    def do_reference_guidance(self) -> bool:
        """Whether the reference is guided: the with-reference branch runs beside one without it."""
        return TEXT_REF in self._plan.branches and self._plan.num_branches > 1

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` in a callback to skip the remaining steps (as in diffusers)."""
        return self._interrupt

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        product_mask=None,
        reference_image=None,
        negative_prompt: str | list[str] | None = None,
        text_guidance_scale: float = 7.5,
        reference_guidance_scale: float | None = None,
        reference_scale: float | dict | None = None,
        reference_guidance_interval: tuple[float, float] | None = None,
        reference_guidance_every: int = 1,
        num_inference_steps: int = 30,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        resolution: int | None = None,
        product_dilation: int = 0,
        paste_product: bool = True,
        feather_radius: float = DEFAULT_FEATHER_RADIUS,
        eta: float = 0.0,
        max_pixels: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        reference_image_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        prompt_2: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
    ) -> DreamPainterPipelineOutput | tuple:
        """Generate a new background around the product.

        Args:
            prompt: the background description, one per image of the batch (or ``prompt_embeds``).
            image: the product photo(s): RGB with ``product_mask``, or RGBA whose alpha marks the product
                (PIL, path, HxWxC array, (C, H, W) tensor in [0, 1], or a batch: (B, H, W, C) array,
                (B, C, H, W) tensor); one per prompt or shared.
            product_mask: 255 (or 1) = product; soft edges allowed; one per image, one shared by all images,
                or a batch ((B, H, W) array, (B, 1, H, W) tensor). Inverted into the inpainting mask.
            reference_image: the background reference(s): one per prompt, shared, or ``None`` (text only);
                list entries may be ``None``.
            text_guidance_scale, reference_guidance_scale: ``s_text`` and ``s_ref`` of the dual guidance;
                ``s_ref`` defaults to ``s_text`` (the usual two-branch guidance).
            reference_guidance_interval, reference_guidance_every: a schedule for the branch that measures
                the reference's effect (``e(t,∅)``, run when ``s_text != s_ref``): it runs only on steps
                ``start·N <= step < end·N`` of the ``(start, end)`` fractions, and there only every ``k``-th
                step, the steps between reusing the last delta ``e(t,r) − e(t,∅)``; outside the interval the
                reference is guided at ``s_text``. Those steps run two branches instead of three. Default
                (``None``, ``1``): every step, full dual guidance.
            reference_scale: the attention-level weight of the reference (float, or per-block dict as in
                diffusers' ``set_ip_adapter_scale``); ``None`` keeps the UNet's current setting.
            generator: a generator, or one per result (``len(prompts) * num_images_per_prompt``) for results
                that do not depend on the batch they are made in.
            height, width / resolution: the processing size (multiples of the VAE factor), or the side of the
                square of equal area to scale to; default: the input size rounded to the VAE factor. Images
                that need different sizes run as one batch per size (the callback then restarts per batch).
            product_dilation: grow the product by this many pixels before inverting (the model keeps a margin).
            paste_product, feather_radius: paste the product's pixels back from the input, feathered outward.
            output_type: ``"pil"``, ``"np"`` (float in [0, 1]), ``"pt"`` or ``"latent"``.
            prompt_embeds, negative_prompt_embeds: precomputed text-encoder states, one row per prompt
                (``encode_prompt`` gives them), instead of ``prompt`` / ``negative_prompt``.
            reference_image_embeds: precomputed projection inputs (``encode_reference`` gives them), one row
                per prompt or one shared, instead of ``reference_image``; all-zero rows mean "no reference".
            latents: the initial noise, ``(rows, C, H / f, W / f)`` with one row per result.
            callback_on_step_end: ``f(pipe, step, timestep, tensors) -> dict`` after each step: ``tensors``
                holds the ``callback_on_step_end_tensor_inputs``; every tensor returned replaces the loop's,
                and ``pipe._guidance_scale`` / ``pipe._reference_guidance_scale`` / ``pipe._interrupt`` may
                be changed (a guidance scale set to <= 1 turns classifier-free guidance off, as in diffusers).
            prompt_2, negative_prompt_2, pooled_prompt_embeds, negative_pooled_prompt_embeds: SDXL only, as in
                diffusers' SDXL pipelines: the second text encoder's prompts (default: the same texts) and the
                pooled embeddings that go with precomputed ``prompt_embeds``.
            original_size, crops_coords_top_left, target_size (and their ``negative_`` versions): SDXL's
                micro-conditioning, ``(height, width)`` / ``(top, left)``. Default: each product photo's own
                size as the original size, no crop, the processing size as the target size.
        """
        xl_arguments = dict(
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, original_size=original_size,
            target_size=target_size, negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
        )  # fmt: skip
        self._check_backbone_arguments(xl_arguments, prompt_embeds, negative_prompt_embeds)
        self.check_inputs(
            prompt, image, product_mask, reference_image, negative_prompt,
            text_guidance_scale=text_guidance_scale, reference_guidance_scale=reference_guidance_scale,
            reference_scale=reference_scale, reference_guidance_interval=reference_guidance_interval,
            reference_guidance_every=reference_guidance_every, num_inference_steps=num_inference_steps,
            num_images_per_prompt=num_images_per_prompt, generator=generator, height=height, width=width,
            resolution=resolution, product_dilation=product_dilation, feather_radius=feather_radius,
            output_type=output_type, callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            reference_image_embeds=reference_image_embeds,
        )  # fmt: skip
        batch_size = prompt_embeds.shape[0] if prompt_embeds is not None else len(_as_list(prompt, "prompt"))
        n = int(num_images_per_prompt)
        num_inference_steps = int(num_inference_steps)
        if reference_guidance_scale is None:
            reference_guidance_scale = text_guidance_scale

        # Pixels: decoded and checked products and references, the size(s) to process them at.
        products = self._prepare_products(image, product_mask, batch_size, max_pixels)
        references = self._prepare_references(reference_image, batch_size, max_pixels)
        sizes = self._processing_sizes(products, height, width, resolution)
        if len(set(sizes)) > 1:
            precomputed = [prompt_embeds, negative_prompt_embeds, reference_image_embeds, latents]
            if any(value is not None for value in precomputed):
                raise InvalidInputError(
                    "prompt_embeds / reference_image_embeds / latents: these images need different processing "
                    "sizes; give height and width (or images of one size) with precomputed inputs"
                )
            shared = dict(
                text_guidance_scale=text_guidance_scale, reference_guidance_scale=reference_guidance_scale,
                reference_scale=reference_scale, num_inference_steps=num_inference_steps,
                reference_guidance_interval=reference_guidance_interval,
                reference_guidance_every=reference_guidance_every, resolution=resolution, product_dilation=product_dilation, paste_product=paste_product,
                feather_radius=feather_radius, eta=eta, max_pixels=max_pixels,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                crops_coords_top_left=crops_coords_top_left, **xl_arguments,
            )  # fmt: skip
            return self._call_per_size(
                sizes, _as_list(prompt, "prompt"), products, references, negative_prompt, generator, n,
                output_type, return_dict, shared,
            )  # fmt: skip
        width, height = sizes[0]
        device, dtype = self._execution_device, self.unet.dtype
        has_reference = reference_image_embeds is not None or any(ref is not None for ref in references)
        plan = GuidancePlan.create(text_guidance_scale, reference_guidance_scale, has_reference)
        self._guidance_scale, self._reference_guidance_scale = plan.text_scale, plan.reference_scale
        self._plan, self._interrupt = plan, False
        schedule = ReferenceGuidanceSchedule.create(reference_guidance_interval, reference_guidance_every)

        # Conditions: the branches' text rows (with SDXL's pooled embeddings and time ids) and reference features.
        prompt_embeds, negative_embeds = self.encode_text_conditions(
            prompt, device, n, UNCOND in plan.branches, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        )  # fmt: skip
        prompt_embeds, negative_embeds = self._with_time_ids(
            prompt_embeds, negative_embeds, products, (height, width), n, original_size, crops_coords_top_left,
            target_size, negative_original_size, negative_crops_coords_top_left, negative_target_size,
        )  # fmt: skip
        features = None
        if reference_support.uses_decoupled(self.unet) and TEXT_REF in plan.branches:
            features = (
                self.encode_reference(references, device, n)
                if reference_image_embeds is None
                else self._given_reference_features(reference_image_embeds, batch_size, n, device)
            )
        conditions = self.prepare_branch_conditions(prompt_embeds, negative_embeds, features, device)
        reference_latents = self._prepare_in_context(
            conditions, references, reference_image_embeds, plan, n, height, width, device, dtype
        )

        # Latents: noise first, then the masked photos' latents (the order of diffusers' random draws).
        init_image, mask_condition, inpaint_masks = self._preprocess_products(
            products, product_dilation, height, width, device
        )
        timesteps = self._prepare_timesteps(num_inference_steps, device)
        latents = self.prepare_latents(
            batch_size * n, self.vae.config.latent_channels, height, width, dtype, device, generator, latents
        )
        mask_latents, masked_latents = self.prepare_mask_latents(
            mask_condition, init_image * (mask_condition < 0.5), n, height, width, dtype, generator
        )

        self._num_timesteps = len(timesteps)
        with (
            reference_support.scale_for_call(self.unet, reference_scale),
            reference_support.in_context_for_call(self.unet, reference_latents, dtype),
        ):
            latents = self._denoise(
                latents, timesteps, mask_latents, masked_latents, conditions, has_reference,
                self._extra_step_kwargs(generator, eta), callback_on_step_end, callback_on_step_end_tensor_inputs,
                schedule,
            )  # fmt: skip

        images = self._finish(latents, products, n, paste_product, feather_radius, output_type)
        masks = [inpaint_masks[row // n] for row in range(batch_size * n)]
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, masks
        return DreamPainterPipelineOutput(images=images, masks=masks)

    def _check_backbone_arguments(self, xl_arguments: dict, prompt_embeds, negative_prompt_embeds) -> None:
        """SDXL-only arguments on an SD pipeline, or precomputed SDXL embeddings without their pooled ones."""
        if not self.backbone.uses_pooled_text:
            given = [name for name, value in xl_arguments.items() if value is not None]
            if given:
                raise InvalidInputError(
                    f"{given[0]}: only SDXL pipelines take it; this UNet is {self.backbone.description}"
                )
            return
        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        for name, value in embeds.items():
            pooled = name.replace("prompt_embeds", "pooled_prompt_embeds")
            if value is not None and xl_arguments[pooled] is None:
                raise InvalidInputError(f"{name}: SDXL also needs the pooled embeddings ({pooled})")
        sizes = ("original_size", "target_size", "negative_original_size", "negative_crops_coords_top_left",
                 "negative_target_size")  # fmt: skip
        for name in sizes:
            value = xl_arguments[name]
            if value is not None and (len(value) != 2 or any(not isinstance(v, int) or v < 0 for v in value)):
                raise InvalidInputError(f"{name}: must be two integers >= 0, (height, width) or (top, left); got {value!r}")

    def _with_time_ids(
        self,
        text: TextConditions,
        negative: TextConditions | None,
        products: list[ProductInput],
        processing: tuple[int, int],
        num_images_per_prompt: int,
        original_size,
        crops,
        target_size,
        negative_original_size,
        negative_crops,
        negative_target_size,
    ) -> tuple[TextConditions, TextConditions | None]:
        """Add the backbone's micro-conditioning (SDXL ``time_ids``) to the text rows; SD is unchanged."""
        rows = text.rows

        def ids(original, crop, target) -> torch.Tensor | None:
            originals = (
                [tuple(original)] * rows
                if original is not None
                else [products[row // num_images_per_prompt].size[::-1] for row in range(rows)]
            )
            made = self.backbone.time_ids(self.unet, originals, tuple(target or processing), [tuple(crop)] * rows)
            return None if made is None else made.to(device=text.tokens.device, dtype=text.tokens.dtype)

        positive = ids(original_size, crops, target_size)
        if positive is None:
            return text, negative
        text = replace(text, time_ids=positive)
        if negative is not None:
            negative = replace(
                negative,
                time_ids=ids(
                    negative_original_size or original_size,
                    negative_crops or crops,
                    negative_target_size or target_size,
                ),
            )
        return text, negative

    def _prepare_in_context(
        self, conditions: BranchConditions, references: list, reference_image_embeds, plan: GuidancePlan,
        num_images_per_prompt: int, height: int, width: int, device: torch.device, dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """In-context modes: the given references' VAE latents (one row per reference, for the reference
        pass), and in ``conditions`` which of them each branch row attends to (``TEXT_REF`` rows only)."""
        if not reference_support.uses_in_context(self.unet) or TEXT_REF not in plan.branches:
            return None
        present = [index for index, reference in enumerate(references) if reference is not None]
        if not present:
            if reference_image_embeds is not None:
                raise InvalidInputError(
                    "reference_image_embeds: in-context reference conditioning needs the reference_image itself"
                )
            return None
        side = reference_support.in_context_side(self.unet, height, width, self.vae_scale_factor)
        latents = reference_support.encode_reference_latents(
            self.vae, [references[i] for i in present], side, device, dtype
        )
        slot = {index: row for row, index in enumerate(present)}
        rows = torch.tensor([slot.get(index, -1) for index in range(len(references))], device=device)
        rows = rows.repeat_interleave(num_images_per_prompt)
        none = torch.full_like(rows, -1)
        conditions.in_context = {UNCOND: none, TEXT: none, TEXT_REF: rows}
        return latents

    def _given_reference_features(
        self, embeds: torch.Tensor, batch_size: int, num_images_per_prompt: int, device: torch.device
    ) -> torch.Tensor:
        """Precomputed projection inputs -> one row per generated image (a single row is shared)."""
        rows = embeds.to(device=device, dtype=self.unet.dtype)
        if rows.shape[0] == 1:
            rows = rows.expand(batch_size, *rows.shape[1:])
        return rows.repeat_interleave(num_images_per_prompt, dim=0)

    def _replan(self, plan: GuidancePlan, made_from: tuple[float, float], conditions: BranchConditions, has_reference: bool):
        """The plan for the guidance scales a callback left in ``_guidance_scale`` / ``_reference_guidance_scale``."""
        scales = (self._guidance_scale, self._reference_guidance_scale)
        if scales == made_from:
            return plan, made_from
        if scales[0] <= 1 < made_from[0]:  # diffusers: guidance_scale <= 1 turns classifier-free guidance off
            new = GuidancePlan(1.0, float(has_reference), (TEXT_REF if has_reference else TEXT,))
        else:
            new = GuidancePlan.create(*scales, has_reference)
        missing = sorted(set(new.branches) - conditions.available())
        if missing:
            raise InvalidInputError(
                f"callback_on_step_end: guidance scales {scales} need the {missing} branch(es), which this call "
                "did not prepare; start the call with guidance that runs them"
            )
        return new, scales

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        mask_latents: torch.Tensor,
        masked_latents: torch.Tensor,
        conditions: BranchConditions,
        has_reference: bool,
        extra_step_kwargs: dict,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        schedule: ReferenceGuidanceSchedule | None = None,
    ) -> torch.Tensor:
        """The denoising loop: per step one batched UNet call over the plan's branches, guided, stepped.

        ``latents`` and the mask latents have one row per generated image; the conditions are laid out per
        branch each step. A step-end callback reads and replaces tensors and may change the guidance
        (``_guidance_scale``, ``_reference_guidance_scale``) or stop the loop (``_interrupt``). With a
        ``schedule`` the ``TEXT`` branch of a plan that has it beside ``TEXT_REF`` runs on its steps only.
        """
        plan, made_from = self._plan, (self._guidance_scale, self._reference_guidance_scale)
        guidance = ScheduledGuidance(schedule, len(timesteps))
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    progress_bar.update()
                    continue
                step_plan = guidance.step_plan(plan, step)
                repeat = step_plan.num_branches
                encoder_hidden_states, added_cond_kwargs = conditions.for_plan(step_plan)
                if conditions.in_context is not None:  # in-context modes: which rows attend to the reference
                    set_rows(self.unet, conditions.in_context_rows(step_plan))
                model_input = self.scheduler.scale_model_input(torch.cat([latents] * repeat), t)
                model_input = torch.cat(
                    [model_input, mask_latents.repeat(repeat, 1, 1, 1), masked_latents.repeat(repeat, 1, 1, 1)],
                    dim=1,
                )
                noise_pred = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=False,
                )[0]
                noise_pred = guidance.combine(plan, step_plan, step, noise_pred)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents, "prompt_embeds": encoder_hidden_states, "mask_latents": mask_latents,
                        "masked_image_latents": masked_latents, "noise_pred": noise_pred,
                        **_added_tensors(added_cond_kwargs),
                    }  # fmt: skip
                    returned = dict(
                        callback_on_step_end(
                            self, step, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                        )
                        or {}
                    )
                    latents = returned.pop("latents", latents)
                    mask_latents = returned.pop("mask_latents", mask_latents)
                    masked_latents = returned.pop("masked_image_latents", masked_latents)
                    plan, made_from = self._after_callback(returned, plan, step_plan, made_from, conditions, has_reference)
                progress_bar.update()
        return latents

    def _after_callback(
        self,
        returned: dict,
        plan: GuidancePlan,
        step_plan: GuidancePlan,
        made_from: tuple[float, float],
        conditions: BranchConditions,
        has_reference: bool,
    ) -> tuple[GuidancePlan, tuple[float, float]]:
        """Apply what a step-end callback changed besides the latents: the guidance scales (a new plan) and
        returned conditions (rows as the callback was given them: this step's branches)."""
        returned.pop("noise_pred", None)  # read-only
        previous = plan
        plan, made_from = self._replan(plan, made_from, conditions, has_reference)
        self._plan = plan
        for name in ("prompt_embeds", "image_embeds", "add_text_embeds", "add_time_ids"):
            if name in returned:
                conditions.replace(step_plan if plan is previous else plan, name, returned.pop(name))
        return plan, made_from

    def _finish(
        self,
        latents: torch.Tensor,
        products: list[ProductInput],
        num_images_per_prompt: int,
        paste_product: bool,
        feather_radius: float,
        output_type: str,
    ):
        """Final latents -> decoded images at the input size, product pasted back, in ``output_type``."""
        if output_type == "latent":
            return latents
        with self._vae_precision():
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            decoded = self.vae.decode(latents, return_dict=False)[0]
        decoded = (decoded.float() / 2 + 0.5).clamp(0, 1)
        results = []
        for row, image in enumerate(decoded):
            product = products[row // num_images_per_prompt]
            width, height = product.size
            if image.shape[-2:] != (height, width):
                image = F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True)
                image = image[0].clamp(0, 1)
            array = image.permute(1, 2, 0).cpu().numpy()
            if paste_product:
                original = np.asarray(product.image, dtype=np.float32) / 255.0
                array = composite(array, original, feathered_alpha(product.product_mask, feather_radius))
            results.append(array.astype(np.float32))
        if output_type == "pil":
            return [PIL.Image.fromarray((array * 255).round().astype(np.uint8)) for array in results]
        same_size = len({array.shape for array in results}) == 1
        if output_type == "np":
            return np.stack(results) if same_size else results
        tensors = [torch.from_numpy(array).permute(2, 0, 1) for array in results]
        return torch.stack(tensors) if same_size else tensors
