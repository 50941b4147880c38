"""Per-block reference scales in diffusers' ``set_ip_adapter_scale`` dict form, expanded to layers.

``{"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}, "mid": 0.5}`` names the
transformer layers of a UNet's down/up blocks (by block index, then one value per attention in the
block, or one value for all of them) and the mid block. :func:`expand_block_scales` turns it into
``{"down_blocks.2.attentions.1": 1.0, ...}``: module-name prefixes that each attention processor's
name starts with. Blocks and layers not named get ``default``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from dreampainter.errors import InvalidInputError

BlockScales = Mapping[str, Any]


def _attention_counts(blocks: nn.ModuleList) -> dict[int, int]:
    """``{block index: number of transformer layers}`` for the blocks that have attentions."""
    return {i: len(block.attentions) for i, block in enumerate(blocks) if getattr(block, "attentions", None)}


def _expand_side(side: str, value: Any, counts: dict[int, int], default: float) -> dict[str, float]:
    if not isinstance(value, Mapping):
        value = {f"block_{i}": value for i in counts}
    unknown = sorted(set(value) - {f"block_{i}" for i in counts})
    if unknown:
        raise InvalidInputError(
            f"reference scale: {side} has no transformer block(s) {unknown}; "
            f"blocks with attention: {[f'block_{i}' for i in counts]}"
        )
    expanded = {}
    for index, count in counts.items():
        layer_values = value.get(f"block_{index}", default)
        if not isinstance(layer_values, (list, tuple)):
            layer_values = [layer_values] * count
        elif len(layer_values) == 1:
            layer_values = list(layer_values) * count
        elif len(layer_values) != count:
            raise InvalidInputError(
                f"reference scale: {side}.block_{index} has {count} transformer layers, got {len(layer_values)} values"
            )
        for layer, layer_value in enumerate(layer_values):
            expanded[f"{side}_blocks.{index}.attentions.{layer}"] = float(layer_value)
    return expanded


def expand_block_scales(unet: nn.Module, scales: BlockScales, default: float = 0.0) -> dict[str, float]:
    """Module-name prefix -> scale for every transformer layer of ``unet`` (see the module docstring)."""
    unknown = sorted(set(scales) - {"down", "mid", "up"})
    if unknown:
        raise InvalidInputError(f"reference scale: unknown key(s) {unknown}; use 'down', 'mid' and 'up'")
    expanded = {}
    for side in ("down", "up"):
        counts = _attention_counts(getattr(unet, f"{side}_blocks"))
        expanded.update(_expand_side(side, scales.get(side, default), counts, default))
    mid = scales.get("mid", default)
    if isinstance(mid, (list, tuple)):
        if len(mid) != 1:
            raise InvalidInputError(f"reference scale: mid takes one value, got {len(mid)}")
        mid = mid[0]
    if getattr(getattr(unet, "mid_block", None), "attentions", None):
        expanded["mid_block.attentions.0"] = float(mid)
    return expanded
