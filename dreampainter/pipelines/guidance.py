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

    def without_text_branch(self) -> GuidancePlan:
        """This plan less the ``TEXT`` branch: the two-branch steps of a reference guidance schedule."""
        return GuidancePlan(self.text_scale, self.reference_scale, tuple(b for b in self.branches if b != TEXT))

    @property
    def measures_reference(self) -> bool:
        """Whether the plan runs both ``TEXT`` and ``TEXT_REF``, so a schedule can skip the ``TEXT`` branch."""
        return TEXT in self.branches and TEXT_REF in self.branches

    def reference_delta(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """``e(t,r) − e(t,∅)`` from a prediction laid out as this plan's branches (``measures_reference``)."""
        e = dict(zip(self.branches, noise_pred.chunk(self.num_branches)))
        return e[TEXT_REF] - e[TEXT]

    def combine_reduced(self, noise_pred: torch.Tensor, reference_delta: torch.Tensor | None) -> torch.Tensor:
        """Guide a prediction of :meth:`without_text_branch`'s branches, with ``e(t,∅)`` estimated as
        ``e(t,r) − reference_delta``: ``e(∅,∅) + s_text·(e(t,r) − e(∅,∅)) + (s_ref − s_text)·delta``.
        Without a delta the reference is guided at ``s_text`` (plain two-branch guidance)."""
        reduced = self.without_text_branch()
        guided = reduced.combine(noise_pred)
        if reference_delta is None:
            return guided
        return guided + (self.reference_scale - self.text_scale) * reference_delta


def check_reference_guidance_interval(value) -> tuple[float, float] | None:
    """``None`` or ``(start, end)`` fractions of the steps with ``0 <= start < end <= 1``."""
    if value is None:
        return None
    name = "reference_guidance_interval"
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise InvalidInputError(f"{name}: must be two fractions (start, end) of the steps, got {value!r}")
    start, end = value
    for number in (start, end):
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise InvalidInputError(f"{name}: must be two numbers (start, end), got {value!r}")
    if not 0 <= start < end <= 1:
        raise InvalidInputError(f"{name}: needs 0 <= start < end <= 1, got {tuple(value)!r}")
    return float(start), float(end)


def check_reference_guidance_every(value) -> int:
    """A positive int: run the reference-measuring branch every ``value``-th step."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"reference_guidance_every: must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class ReferenceGuidanceSchedule:
    """On which steps the ``TEXT`` branch (with ``TEXT_REF`` it measures the reference's effect) runs.

    Inside ``interval`` (fractions of the steps, ``start·N <= step < end·N``) it runs on every ``every``-th
    step counted from the interval's first step; the steps between reuse the last measured delta
    ``e(t,r) − e(t,∅)``. Outside the interval the reference is guided at ``s_text`` (two branches).
    ``interval=None, every=1`` runs it on every step: today's full dual guidance.
    """

    interval: tuple[float, float] | None = None
    every: int = 1

    @classmethod
    def create(cls, interval=None, every: int = 1) -> ReferenceGuidanceSchedule:
        return cls(check_reference_guidance_interval(interval), check_reference_guidance_every(every))

    @property
    def is_full(self) -> bool:
        return self.interval is None and self.every == 1

    def inside(self, step: int, num_steps: int) -> bool:
        if self.interval is None:
            return True
        start, end = self.interval
        return start * num_steps <= step < end * num_steps

    def first_inside(self, num_steps: int) -> int:
        return 0 if self.interval is None else math.ceil(self.interval[0] * num_steps)


class ScheduledGuidance:
    """A denoising loop's guidance under a :class:`ReferenceGuidanceSchedule`: which branches each step runs,
    and how their predictions combine (keeping the last measured reference delta for the reduced steps)."""

    def __init__(self, schedule: ReferenceGuidanceSchedule | None, num_steps: int) -> None:
        self.schedule = schedule or ReferenceGuidanceSchedule()
        self.num_steps = num_steps
        self.first_inside = None if self.schedule.is_full else self.schedule.first_inside(num_steps)
        self.delta = None  # the last e(t,r) - e(t,∅)

    def _scheduled(self, plan: GuidancePlan) -> bool:
        return self.first_inside is not None and plan.measures_reference

    def step_plan(self, plan: GuidancePlan, step: int) -> GuidancePlan:
        """``plan``, or ``plan`` without its ``TEXT`` branch on a step the schedule skips."""
        if not self._scheduled(plan):
            return plan
        if not self.schedule.inside(step, self.num_steps):
            return plan.without_text_branch()
        if self.delta is not None and (step - self.first_inside) % self.schedule.every:
            return plan.without_text_branch()
        return plan

    def combine(self, plan: GuidancePlan, step_plan: GuidancePlan, step: int, noise_pred: torch.Tensor) -> torch.Tensor:
        """The guided prediction of one step that ran ``step_plan`` (from :meth:`step_plan`) for ``plan``."""
        if step_plan is plan:
            if self._scheduled(plan):
                self.delta = plan.reference_delta(noise_pred)
            return plan.combine(noise_pred)
        reuse = self.delta if self.schedule.inside(step, self.num_steps) else None
        return plan.combine_reduced(noise_pred, reuse)
