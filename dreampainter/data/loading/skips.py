"""Skipped-sample bookkeeping: per-worker counts and rate-limited warnings, and the run-wide total."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger(__name__)


class SkipCounter:
    """Skipped samples by reason, summed over workers (the loader fills it from each batch's ``skipped``)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def update(self, counts: Mapping[str, int]) -> None:
        for reason, number in counts.items():
            self.counts[reason] += int(number)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"SkipCounter(total={self.total}, {self.as_dict()})"


class SkipLog:
    """A worker's skip bookkeeping: counts since the last batch, and rate-limited warnings."""

    def __init__(self, worker: int, quiet: bool = False) -> None:
        self.worker, self.quiet = worker, quiet
        self.totals: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()

    def skip(self, reason: str, where: str, detail: object = "", number: int = 1) -> None:
        self.totals[reason] += number
        self.pending[reason] += number
        seen = self.totals[reason]
        if self.quiet:
            return
        if seen <= 5 or str(seen).rstrip("0") == "1":  # the first five, then at 10, 100, 1000, ...
            logger.warning(
                "skipped %s (%s): %s [worker %d, %d %s so far]",
                where,
                reason,
                detail,
                self.worker,
                seen,
                reason,
            )

    def take_pending(self) -> dict[str, int]:
        pending, self.pending = dict(self.pending), Counter()
        return pending
