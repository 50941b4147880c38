"""One sample: cheap header checks (planning) and full decoding + augmentation (processing).

:func:`inspect_sample` checks a tar group without decoding pixels and returns a :class:`PlannedSample`
or raises :class:`SampleSkipped` with a reason; :func:`process_sample` turns a planned sample into the
per-sample dict documented in :mod:`dreampainter.data.loading.loader`, writing into preallocated batch tensors.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from dreampainter.data.loading import masks
from dreampainter.data.loading.augment import (
    apply_crop,
    plan_crop,
    prepare_reference,
    reference_decode_size,
    to_signed_unit,
)
from dreampainter.data.loading.config import LoaderConfig
from dreampainter.data.loading.fastdecode import ImageHeader, decode_mask, decode_rgb, probe
from dreampainter.data.shards.format import (
    MASK_EXTENSION,
    META_EXTENSION,
    PHOTO_EXTENSIONS,
    REFERENCE_EXTENSIONS,
)
from dreampainter.errors import DreamPainterError, InvalidInputError

TENSOR_KEYS = ("pixel_values", "mask", "masked_pixel_values", "product_mask", "reference_pixel_values")
# What undecodable data raises (PIL, zlib, our decoders); anything else is a bug and propagates.
DECODE_ERRORS = (
    DreamPainterError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
)
_ONE = torch.tensor(1.0)


class SampleSkipped(Exception):
    """A sample failed a cheap check; ``reason`` is the skip-counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class PlannedSample:
    """A sample that passed the cheap checks: its bytes, parsed JSON and upright image headers."""

    key: str
    url: str
    photo: bytes
    mask: bytes
    reference: bytes
    meta: dict[str, Any]
    photo_header: ImageHeader
    reference_header: ImageHeader
    pass_index: int = 0
    names: dict[str, str] = field(default_factory=dict)


def _member(group: Mapping[str, Any], suffixes: Sequence[str], what: str) -> tuple[str, bytes]:
    for suffix in suffixes:
        if suffix in group:
            return suffix, group[suffix]
    raise SampleSkipped("missing_member", f"no {what} member (.{'/.'.join(suffixes)})")


def inspect_sample(group: Mapping[str, Any], max_pixels: int | None = None) -> PlannedSample:
    """The cheap checks (members, JSON, prompt, headers, truncation, mask size); raises :class:`SampleSkipped`."""
    key = group["__key__"]
    photo_ext, photo = _member(group, PHOTO_EXTENSIONS, "photo")
    _, mask = _member(group, (MASK_EXTENSION,), "mask")
    reference_ext, reference = _member(group, REFERENCE_EXTENSIONS, "reference")
    _, raw_meta = _member(group, (META_EXTENSION,), "json")
    try:
        meta = json.loads(raw_meta.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SampleSkipped("bad_json", f"{key}.json: {error}") from None
    if not isinstance(meta, dict):
        raise SampleSkipped("bad_json", f"{key}.json: not a JSON object")
    prompt = meta.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise SampleSkipped("empty_prompt", f"{key}.json: missing or empty 'prompt'")
    names = {
        "photo": f"{key}.{photo_ext}",
        "mask": f"{key}.{MASK_EXTENSION}",
        "reference": f"{key}.{reference_ext}",
    }
    try:
        photo_header = probe(photo, names["photo"], max_pixels)
        mask_header = probe(mask, names["mask"], max_pixels)
        reference_header = probe(reference, names["reference"], max_pixels)
    except InvalidInputError as error:
        reason = "truncated_image" if "truncated" in str(error) else "undecodable"
        raise SampleSkipped(reason, str(error)) from None
    if mask_header.size != photo_header.size:
        raise SampleSkipped(
            "mask_size", f"{names['mask']} is {mask_header.size}, photo is {photo_header.size}"
        )
    return PlannedSample(
        key, group["__url__"], photo, mask, reference, meta, photo_header, reference_header, names=names
    )


def _sample_rng(seed: int, epoch: int, item: PlannedSample) -> random.Random:
    return random.Random(f"sample/{seed}/{epoch}/{item.pass_index}/{item.key}")


def _choose_prompt(meta: Mapping[str, Any], language: str, rng: random.Random) -> str:
    english = meta["prompt"].strip()
    chinese = meta.get("prompt_zh")
    chinese = chinese.strip() if isinstance(chinese, str) else ""
    use_chinese = rng.random() < 0.5 if language == "random" else language == "zh"
    return chinese if use_chinese and chinese else english


def allocate_batch(
    batch_size: int, out_size: tuple[int, int], reference_size: int, shared: bool = False
) -> dict[str, torch.Tensor]:
    """Uninitialised batch tensors that :func:`process_sample` fills slot by slot (no stacking copy).

    ``shared=True`` (inside DataLoader workers) allocates in shared memory, as ``default_collate``
    does, so handing the batch to the main process does not copy it again.
    """
    height, width = out_size
    shapes = {
        "pixel_values": (3, height, width),
        "mask": (1, height, width),
        "masked_pixel_values": (3, height, width),
        "product_mask": (1, height, width),
        "reference_pixel_values": (3, reference_size, reference_size),
    }
    buffers = {}
    for name, shape in shapes.items():
        shape = (batch_size, *shape)
        if shared:
            numel = batch_size * shape[1] * shape[2] * shape[3]
            storage = torch.empty(0)._typed_storage()._new_shared(numel, device="cpu")
            buffers[name] = torch.empty(0).new(storage).resize_(shape)
        else:
            buffers[name] = torch.empty(shape)
    return buffers


def process_sample(
    item: PlannedSample,
    config: LoaderConfig,
    out_size: tuple[int, int],
    seed: int = 0,
    epoch: int = 0,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Decode and augment one planned sample to the per-sample dict (see the module docstring).

    ``out_size`` is ``(height, width)``. All randomness comes from ``(seed, epoch, pass, key)``.
    ``out``: per-sample views (e.g. ``allocate_batch(...)[name][i]``) to write the tensors into.
    """
    rng = _sample_rng(seed, epoch, item)
    out_h, out_w = out_size
    mask_full = decode_mask(item.mask, item.names.get("mask", "mask"))
    box = masks.bounding_box(mask_full, masks.MASK_THRESHOLD)
    plan = plan_crop(
        item.photo_header.size, (out_w, out_h), box, rng, max_zoom=config.max_zoom, flip_prob=config.flip_prob
    )
    photo = decode_rgb(
        item.photo, item.names.get("photo", "photo"), item.photo_header, min_size=plan.scaled_size
    )
    grow = config.mask_grow_px
    grow_px = rng.randint(int(grow[0]), int(grow[1])) if isinstance(grow, Sequence) else int(grow)
    use_box = rng.random() < config.bbox_mask_prob
    reference_size = reference_decode_size(
        item.reference_header.size, config.reference_size, config.reference_mode
    )
    reference = decode_rgb(
        item.reference, item.names.get("reference", "reference"), item.reference_header, reference_size
    )
    if config.reference_aligned and plan.flip:
        reference = reference.flip(-1)
    reference_pixel_values = prepare_reference(
        reference, config.reference_size, config.reference_mode, config.reference_mean, config.reference_std
    )
    if out is None:
        out = {name: tensor[0] for name, tensor in allocate_batch(1, out_size, config.reference_size).items()}
    product = out["product_mask"]
    product.copy_(apply_crop(mask_full, plan, fill=0)).gt_(masks.MASK_THRESHOLD)  # {0, 1} float, in place
    if grow_px:
        product.copy_(masks.grow(product, grow_px))
    if use_box:
        product.copy_(masks.box_mask(product))
    torch.sub(_ONE, product, out=out["mask"])  # inpainting mask = NOT(product)
    pixel_values = to_signed_unit(apply_crop(photo, plan, fill=127), out=out["pixel_values"])
    torch.mul(pixel_values, product, out=out["masked_pixel_values"])
    out["reference_pixel_values"].copy_(reference_pixel_values)
    prompt = _choose_prompt(item.meta, config.language, rng)
    draw = rng.random()
    p_text, p_ref, p_both = config.p_drop_text, config.p_drop_reference, config.p_drop_both
    both = p_text + p_ref <= draw < p_text + p_ref + p_both
    category = item.meta.get("category")
    return {
        **{name: out[name] for name in TENSOR_KEYS},
        "prompt": prompt,
        "drop_text": draw < p_text or both,
        "drop_reference": p_text <= draw < p_text + p_ref or both,
        "key": item.key,
        "category": category if isinstance(category, str) else "",
        # SDXL's micro-conditioning: the photo's size (height, width) and the crop's top-left in the resized photo
        "original_size": (item.photo_header.size[1], item.photo_header.size[0]),
        "crop_top_left": (max(plan.offset[1], 0), max(plan.offset[0], 0)),
    }


def collate(
    samples: Sequence[Mapping[str, Any]], tensors: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Stack per-sample dicts into a batch: tensors stacked, strings as lists, flags as bool tensors.

    ``tensors``: the already-filled batch tensors when the samples were written into ``allocate_batch``.
    """
    if tensors is None:
        tensors = {name: torch.stack([s[name] for s in samples]) for name in TENSOR_KEYS}
    batch: dict[str, Any] = dict(tensors)
    for name in ("prompt", "key", "category"):
        batch[name] = [s[name] for s in samples]
    for name in ("drop_text", "drop_reference"):
        batch[name] = torch.tensor([bool(s[name]) for s in samples], dtype=torch.bool)
    for name in ("original_size", "crop_top_left"):
        batch[name] = torch.tensor([s[name] for s in samples], dtype=torch.long)
    return batch
