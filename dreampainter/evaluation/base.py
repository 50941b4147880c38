"""The metric interface: ``update(batch)`` gives per-sample values, ``compute()`` the aggregates.

State is kept per sample key, and aggregates are computed over keys in sorted order, so the
result does not depend on batch order or on how a benchmark was split across processes:
each process calls :meth:`Metric.state_dict`, the states are gathered, and one metric
:meth:`Metric.merge_state`\\ s them all before :meth:`Metric.compute`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from dreampainter.evaluation.batch import EvalBatch

Row = dict[str, float]


class Metric(ABC):
    """Base class: subclasses set ``name``, ``requires``, ``columns`` and implement :meth:`score`."""

    name: str = ""
    requires: tuple[str, ...] = ()  # backbone names (config ``evaluation.backbones.<name>``)
    columns: tuple[str, ...] = ()  # per-sample values this metric writes
    higher_is_better: dict[str, bool] = {}

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._rows: dict[str, Row] = {}

    @abstractmethod
    def score(self, batch: EvalBatch) -> list[Row]:
        """Per-sample values for ``batch`` (one dict per sample, in batch order)."""

    def update(self, batch: EvalBatch) -> list[Row]:
        """Score ``batch``, remember the values by sample key, and return them."""
        if len(batch) == 0:  # e.g. a process that got no samples
            return []
        rows = self.score(batch)
        for sample, row in zip(batch, rows):
            self._rows[sample.key] = row
        return rows

    def per_sample(self) -> dict[str, Row]:
        """All per-sample values seen so far, by key (sorted)."""
        return {key: dict(self._rows[key]) for key in sorted(self._rows)}

    def compute(self) -> dict[str, float]:
        """Mean of each column over samples; NaN values (not measurable on a sample) are left out."""
        return {column: nan_mean(self._column(column)) for column in self.columns}

    def _column(self, column: str) -> np.ndarray:
        return np.array(
            [self._rows[key].get(column, math.nan) for key in sorted(self._rows)], dtype=np.float64
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`compute` needs, as plain python/numpy values (for gathering across processes)."""
        return {"rows": {key: dict(row) for key, row in self._rows.items()}}

    def merge_state(self, states: list[dict[str, Any]]) -> None:
        """Add the states of other processes (or of a cached run) to this metric."""
        for state in states:
            self._rows.update(state["rows"])


def nan_mean(values: np.ndarray) -> float:
    """Mean over finite-or-infinite values, ignoring NaN; NaN when nothing is left."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan
