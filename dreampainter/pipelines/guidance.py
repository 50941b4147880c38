"""Dual classifier-free guidance over text and reference, running only the branches that matter.

``eps = e(∅,∅) + s_text·(e(t,∅) − e(∅,∅)) + s_ref·(e(t,r) − e(t,∅))``

Written per branch the coefficients are ``1 − s_text``, ``s_text − s_ref`` and ``s_ref``; a branch
whose coefficient is zero is not run. So ``s_text == s_ref`` is the usual two-branch guidance
(unconditional vs text + reference), ``s_ref == 0`` (or no reference) is text-only guidance, and
``s_text == 1, s_ref == 0`` runs the text branch alone (diffusers' "no guidance").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dreampainter.errors import InvalidInputError

UNCOND = "uncond"  # e(∅, ∅): negative prompt, no reference
TEXT = "text"  # e(t, ∅): prompt, no reference
TEXT_REF = "text_ref"  # e(t, r): prompt and reference
BRANCH_ORDER = (UNCOND, TEXT, TEXT_REF)


def check_guidance_scale(value: float, name: str) -> float:
    """A finite, non-negative guidance scale, else :class:`InvalidInputError` naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"{name}: must be a finite number >= 0, got {value}")
    return value


@dataclass(frozen=True)
class GuidancePlan:
    """Which UNet branches run (in batch order) and how their predictions combine."""

    text_scale: float
    reference_scale: float
    branches: tuple[str, ...]

    @classmethod
    def create(cls, text_scale: float, reference_scale: float, has_reference: bool) -> GuidancePlan:
        text_scale = check_guidance_scale(text_scale, "text_guidance_scale")
        reference_scale = check_guidance_scale(reference_scale, "reference_guidance_scale")
        if not has_reference:
            reference_scale = 0.0
        weights = {UNCOND: 1.0 - text_scale, TEXT: text_scale - reference_scale, TEXT_REF: reference_scale}
        # Never empty: the three weights sum to 1.
        branches = tuple(name for name in BRANCH_ORDER if weights[name] != 0)
        return cls(text_scale, reference_scale, branches)

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    def combine(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """Combine a batched prediction laid out as ``branches`` chunks into the guided prediction."""
        e = dict(zip(self.branches, noise_pred.chunk(self.num_branches)))
        if len(e) == 1:
            return next(iter(e.values()))
        if len(e) == 3:
            return (
                e[UNCOND]
                + self.text_scale * (e[TEXT] - e[UNCOND])
                + self.reference_scale * (e[TEXT_REF] - e[TEXT])
            )
        if UNCOND in e:  # s_ref == 0 (text-only) or s_text == s_ref (text and reference together)
            conditional = e[TEXT] if TEXT in e else e[TEXT_REF]
            return e[UNCOND] + self.text_scale * (conditional - e[UNCOND])
        return e[TEXT] + self.reference_scale * (e[TEXT_REF] - e[TEXT])  # s_text == 1
