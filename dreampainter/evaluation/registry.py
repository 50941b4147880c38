"""Metric registry, evaluation config and the suite a benchmark runner drives.

```python
suite = build_suite(EvaluationConfig.from_dict(cfg.evaluation))
for batch in batches:                      # EvalBatch of generated samples
    rows = suite.update(batch)             # {key: {column: value}} for the per-sample CSV
report = suite.compute()                   # {"values": {...}, "skipped": {metric: reason}}
```

A metric that cannot be built (weights not configured or missing, package not installed) or
that fails with a user-facing error later is reported in ``skipped`` with the reason; the
others still run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from dreampainter.errors import (
    CheckpointMismatchError,
    DreamPainterError,
    InvalidInputError,
    MissingFileError,
)
from dreampainter.evaluation import backbones as bb
from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.utils.config import Choice, check_int, config_from_dict

DEFAULT_METRICS = ("image_quality", "clip", "dino", "product", "lpips", "expansion", "colour")


class InceptionKind(Choice):
    fid = "fid"  # torchmetrics' FID Inception-v3 weights
    torchscript = "torchscript"  # any scripted uint8 NCHW -> (N, D) extractor


INCEPTION_KINDS = tuple(InceptionKind.values())


@dataclass
class InceptionEntry:
    """``evaluation.backbones.inception``; a plain path is short for ``{path: ...}``."""

    SHORTHAND_KEY: ClassVar[str] = "path"

    path: str | None = None
    kind: InceptionKind = InceptionKind.fid


@dataclass
class ClipEntry:
    """``evaluation.backbones.clip``: an open_clip model name (and JSON config for custom ones) and weights."""

    SHORTHAND_KEY: ClassVar[str] = "path"

    path: str | None = None
    model: str = "ViT-L-14-quickgelu"
    model_config: str | None = None


@dataclass
class DinoEntry:
    """``evaluation.backbones.dino``: a timm architecture, weights, extra ``timm.create_model`` arguments."""

    SHORTHAND_KEY: ClassVar[str] = "path"

    path: str | None = None
    arch: str = "vit_small_patch16_224.dino"
    model_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LpipsEntry:
    """``evaluation.backbones.lpips``: the torchvision trunk (``alex`` or ``vgg``) and its weights."""

    SHORTHAND_KEY: ClassVar[str] = "path"

    path: str | None = None
    net: str = "alex"


@dataclass
class BackboneEntries:
    """Where each metric backbone's weights are (``evaluation.backbones``)."""

    inception: InceptionEntry = field(default_factory=InceptionEntry)
    clip: ClipEntry = field(default_factory=ClipEntry)
    dino: DinoEntry = field(default_factory=DinoEntry)
    lpips: LpipsEntry = field(default_factory=LpipsEntry)


@dataclass
class EvaluationConfig:
    """The ``evaluation`` section of a config (see docs/evaluation.md)."""

    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    backbones: BackboneEntries = field(default_factory=BackboneEntries)
    split: str = "benchmark"
    feature_cache: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0
    segmenter: str | None = None  # "known_scene" for toy data; real data: pass a segmenter in code
    segmenter_tolerance: float = 40.0
    expansion_threshold: float = 0.01
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "kid_subsets", "kid_subset_size"):
            check_int(getattr(self, name), name, 1)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None) -> EvaluationConfig:
        """From a plain dict or an OmegaConf node, through the one config loader (errors name the key)."""
        return config_from_dict(cls, mapping, "evaluation")

    def backbone(self, name: str) -> InceptionEntry | ClipEntry | DinoEntry | LpipsEntry:
        """The entry of backbone ``name`` (``inception``, ``clip``, ``dino`` or ``lpips``)."""
        return getattr(self.backbones, name)


class Backbones:
    """Loads each configured backbone once, on first use; ``given`` objects are used as they are.

    ``given`` may hold an ``nn.Module`` feature extractor for ``inception`` (uint8 NCHW -> (N, D)),
    a :class:`~dreampainter.evaluation.backbones.ClipBackbone`, a
    :class:`~dreampainter.evaluation.backbones.DinoBackbone` or an LPIPS module.
    """

    _hints = {
        "inception": bb.INCEPTION_HINT,
        "clip": bb.CLIP_HINT,
        "dino": bb.DINO_HINT,
        "lpips": bb.LPIPS_HINT,
    }

    def __init__(self, config: EvaluationConfig, given: Mapping[str, Any] | None = None) -> None:
        self.config = config
        self._loaded: dict[str, Any] = dict(given or {})

    def get(self, name: str) -> Any:
        if name not in self._loaded:
            self._loaded[name] = self._load(name)
        value = self._loaded[name]
        if name == "inception" and not isinstance(value, bb.ImageFeatureExtractor):
            value = self._loaded[name] = bb.ImageFeatureExtractor(value, name=type(value).__name__)
        return value

    def _load(self, name: str) -> Any:
        entry = self.config.backbone(name)
        if not entry.path:
            raise MissingFileError(
                f"no weights configured for the {name} backbone: set evaluation.backbones.{name}.path "
                f"({self._hints[name]})"
            )
        device = self.config.device
        if isinstance(entry, InceptionEntry):
            if entry.kind == InceptionKind.torchscript:
                return bb.load_torchscript_features(entry.path, device)
            return bb.load_inception(entry.path, device)
        if isinstance(entry, ClipEntry):
            return bb.load_clip(entry.model, entry.path, device, model_config=entry.model_config)
        if isinstance(entry, DinoEntry):
            return bb.load_dino(entry.arch, entry.path, device, entry.model_kwargs or {})
        return bb.load_lpips(entry.net, entry.path, device)


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its name, the backbones it needs, and how to build it."""

    name: str
    requires: tuple[str, ...]
    summary: str
    build: Callable[[EvaluationConfig, Backbones, Any], Metric]


METRICS: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec) -> None:
    """Add (or replace) a metric; users can register their own before building a suite."""
    METRICS[spec.name] = spec


def _build_image_quality(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.fid import ImageQualityMetric

    return ImageQualityMetric(
        backbones.get("inception"),
        split=config.split,
        cache_dir=config.feature_cache,
        kid_subsets=config.kid_subsets,
        kid_subset_size=config.kid_subset_size,
        seed=config.seed,
        batch_size=config.batch_size,
        progress=config.progress,
    )


def _build_clip(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.clip_scores import ClipMetric

    return ClipMetric(backbones.get("clip"), batch_size=config.batch_size, progress=config.progress)


def _build_dino(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.dino import DinoMetric

    return DinoMetric(backbones.get("dino"), batch_size=config.batch_size, progress=config.progress)


def _build_product(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.product import ProductMetric

    return ProductMetric()


def _build_lpips(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.product import LpipsMetric

    return LpipsMetric(backbones.get("lpips"))


def _build_expansion(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.expansion import ExpansionMetric, KnownSceneSegmenter

    if segmenter is None:
        if config.segmenter is None:
            raise MissingFileError(
                "object expansion needs a segmenter: pass one to build_suite(segmenter=...) "
                "or set evaluation.segmenter: known_scene (toy data only)"
            )
        if config.segmenter != "known_scene":
            raise InvalidInputError(
                f"evaluation.segmenter: expected known_scene or null, got {config.segmenter!r}"
            )
        segmenter = KnownSceneSegmenter(config.segmenter_tolerance)
    return ExpansionMetric(segmenter, threshold=config.expansion_threshold)


def _build_colour(config: EvaluationConfig, backbones: Backbones, segmenter: Any) -> Metric:
    from dreampainter.evaluation.colour import BackgroundColourMetric

    return BackgroundColourMetric()


for _spec in (
    MetricSpec(
        "image_quality", ("inception",), "FID and KID vs the split's real photos", _build_image_quality
    ),
    MetricSpec("clip", ("clip",), "CLIP-T (result vs prompt) and CLIP-I (result vs reference)", _build_clip),
    MetricSpec("dino", ("dino",), "DINO CLS cosine of result vs reference", _build_dino),
    MetricSpec("product", (), "PSNR/SSIM of the product before compositing; change after", _build_product),
    MetricSpec("lpips", ("lpips",), "LPIPS of the product before compositing", _build_lpips),
    MetricSpec("expansion", (), "object expansion outside the product mask", _build_expansion),
    MetricSpec("colour", (), "background colour/histogram distance to the reference", _build_colour),
):
    register_metric(_spec)


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


class MetricSuite:
    """Runs several metrics side by side; a metric that cannot run is skipped with its reason."""

    def __init__(
        self,
        metrics: dict[str, Metric],
        skipped: dict[str, str] | None = None,
        backbones: Backbones | None = None,
    ) -> None:
        self.metrics = dict(metrics)
        self.skipped = dict(skipped or {})
        self.backbones = backbones  # reuse with build_suite(backbones=suite.backbones), e.g. for controls

    def _skip(self, name: str, error: BaseException) -> None:
        self.metrics.pop(name, None)
        self.skipped[name] = _reason(error)

    def update(self, batch: EvalBatch) -> dict[str, Row]:
        """Score ``batch`` with every metric; returns ``{key: {column: value}}`` for this batch."""
        rows: dict[str, Row] = {sample.key: {} for sample in batch}
        for name, metric in list(self.metrics.items()):
            try:
                values = metric.update(batch)
            except DreamPainterError as error:
                self._skip(name, error)
                continue
            for sample, row in zip(batch, values):
                rows[sample.key].update(row)
        return rows

    def columns(self) -> list[str]:
        """Per-sample column names of the running metrics, in metric order (a CSV header)."""
        return [column for metric in self.metrics.values() for column in metric.columns]

    def higher_is_better(self) -> dict[str, bool]:
        """Direction of each value that has one (for picking best and worst cases)."""
        return {k: v for metric in self.metrics.values() for k, v in metric.higher_is_better.items()}

    def per_sample(self) -> dict[str, Row]:
        """Every per-sample value seen so far, merged over metrics, by key (sorted)."""
        merged: dict[str, Row] = {}
        for metric in self.metrics.values():
            for key, row in metric.per_sample().items():
                merged.setdefault(key, {}).update(row)
        return {key: merged[key] for key in sorted(merged)}

    def compute(self) -> dict[str, Any]:
        """``{"values": {name: float}, "skipped": {metric: reason}}`` (NaN: nothing measurable)."""
        values: dict[str, float] = {}
        for name, metric in list(self.metrics.items()):
            try:
                values.update(metric.compute())
            except DreamPainterError as error:
                self._skip(name, error)
        return {"values": values, "skipped": dict(self.skipped)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "metrics": {n: m.state_dict() for n, m in self.metrics.items()},
            "skipped": dict(self.skipped),
        }

    def merge_state(self, states: list[dict[str, Any]]) -> None:
        """Merge the states gathered from other processes (identical results to one process)."""
        for state in states:
            for name, reason in state["skipped"].items():
                self.skipped.setdefault(name, reason)
                self.metrics.pop(name, None)
        for name, metric in self.metrics.items():
            metric.merge_state([state["metrics"][name] for state in states if name in state["metrics"]])


def build_suite(
    config: EvaluationConfig | None = None,
    backbones: Backbones | Mapping[str, Any] | None = None,
    segmenter: Any = None,
    metrics: list[str] | None = None,
) -> MetricSuite:
    """Build the configured (or named) metrics; those that cannot run here (weights missing or not
    fitting, package missing) are skipped with the reason; invalid config values raise.

    ``backbones``: objects to use instead of loading from the config (see :class:`Backbones`), or
    the :class:`Backbones` of another suite, so that loaded backbones are shared (controls, ranks).
    """
    config = config or EvaluationConfig()
    names = list(metrics if metrics is not None else config.metrics)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise InvalidInputError(f"unknown metrics {unknown}; known: {sorted(METRICS)}")
    provider = backbones if isinstance(backbones, Backbones) else Backbones(config, backbones)
    built: dict[str, Metric] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            built[name] = METRICS[name].build(config, provider, segmenter)
        except (MissingFileError, CheckpointMismatchError, ImportError) as error:
            skipped[name] = _reason(error)  # cannot run here; a bad config value still raises
    return MetricSuite(built, skipped, provider)


__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "BackboneEntries",
    "Backbones",
    "ClipEntry",
    "DinoEntry",
    "EvaluationConfig",
    "InceptionEntry",
    "InceptionKind",
    "LpipsEntry",
    "MetricSpec",
    "MetricSuite",
    "build_suite",
    "json_ready",
    "register_metric",
]


def json_ready(value: Any) -> Any:
    """``value`` with NaN/inf floats as ``None`` and numpy scalars as python ones (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
