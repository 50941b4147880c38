"""dreampainter.evaluation: benchmark metrics with locally loaded backbones (see docs/evaluation.md)."""

from dreampainter.evaluation.base import Metric
from dreampainter.evaluation.batch import EvalBatch, EvalSample
from dreampainter.evaluation.registry import (
    DEFAULT_METRICS,
    METRICS,
    EvaluationConfig,
    MetricSpec,
    MetricSuite,
    build_suite,
    json_ready,
    register_metric,
)

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "EvalBatch",
    "EvalSample",
    "EvaluationConfig",
    "Metric",
    "MetricSpec",
    "MetricSuite",
    "build_suite",
    "json_ready",
    "register_metric",
]
