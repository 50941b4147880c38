"""Benchmark settings and inputs: the ``benchmark`` config section, the evaluation YAML file, and a
checked saved pipeline folder (a missing weights file is named with how to get it)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, MissingFileError, require_file
from dreampainter.evaluation.registry import EvaluationConfig
from dreampainter.pipelines.image_processing import DEFAULT_FEATHER_RADIUS

CONTROLS = ("no_reference", "shuffled_reference")


@dataclass
class BenchmarkSettings:
    """How results are generated and reported (the ``benchmark`` section of an evaluation config)."""

    steps: int = 30
    seed: int = 0
    batch_size: int = 4
    controls: list[str] = field(default_factory=lambda: list(CONTROLS))
    limit: int | None = None
    text_guidance: float = 7.5
    reference_guidance: float | None = None
    reference_scale: float | None = None
    negative_prompt: str | None = None
    resolution: int | None = None
    feather_radius: float = DEFAULT_FEATHER_RADIUS
    product_dilation: int = 0
    save_images: bool = True
    contact_metric: str | None = None  # default: the first of CONTACT_METRICS that was measured
    contact_count: int = 4

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None) -> BenchmarkSettings:
        """Build from a dict or OmegaConf node; unknown keys are errors naming the key."""
        if mapping is None:
            return cls().validate()
        if not isinstance(mapping, dict):
            from omegaconf import OmegaConf

            mapping = OmegaConf.to_container(mapping, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise InvalidInputError(f"benchmark: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**mapping).validate()

    def validate(self) -> BenchmarkSettings:
        """Check every value; errors name the setting."""
        self.controls = list(self.controls or [])
        unknown = [name for name in self.controls if name not in CONTROLS]
        if unknown:
            raise InvalidInputError(f"controls: unknown {unknown}; choose from {list(CONTROLS)} (or none)")
        for name in ("steps", "batch_size", "contact_count"):
            _positive_int(getattr(self, name), name)
        for name in ("limit", "resolution"):
            if getattr(self, name) is not None:
                _positive_int(getattr(self, name), name)
        _non_negative_int(self.seed, "seed")
        _non_negative_int(self.product_dilation, "product_dilation")
        for name in ("text_guidance", "feather_radius", "reference_guidance", "reference_scale"):
            value = getattr(self, name)
            if value is None and name in ("reference_guidance", "reference_scale"):
                continue  # None: the pipeline's default
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise InvalidInputError(f"{name}: must be a finite number >= 0, got {value!r}")
        return self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG_SECTIONS = ("evaluation", "benchmark")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Pipeline components that hold weights (the tokenizer and scheduler only hold configs).
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "reference_encoder")


def load_evaluation_file(path: str | os.PathLike | None) -> tuple[EvaluationConfig, BenchmarkSettings]:
    """Read an evaluation YAML (sections ``evaluation`` and ``benchmark``); None gives the defaults."""
    if path is None:
        return EvaluationConfig(), BenchmarkSettings()
    from omegaconf import OmegaConf

    require_file(path, "evaluation config", "see configs/eval_toy.yaml and docs/evaluation.md")
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as error:  # YAML syntax errors come from several libraries
        raise InvalidInputError(f"{path}: cannot read the YAML ({error})".replace("\n", " ")) from None
    loaded = loaded or {}
    if not isinstance(loaded, dict):
        raise InvalidInputError(f"{path}: expected a mapping with sections {list(CONFIG_SECTIONS)}")
    unknown = sorted(set(loaded) - set(CONFIG_SECTIONS))
    if unknown:
        raise InvalidInputError(f"{path}: unknown sections {unknown}; known: {list(CONFIG_SECTIONS)}")
    try:
        return (
            EvaluationConfig.from_dict(loaded.get("evaluation")),
            BenchmarkSettings.from_dict(loaded.get("benchmark")),
        )
    except TypeError as error:  # e.g. a section that is a list
        raise InvalidInputError(f"{path}: {error}") from None
    except InvalidInputError as error:
        raise InvalidInputError(f"{path}: {error}") from None


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Raise :class:`MissingFileError` naming the first missing file of a saved pipeline folder."""
    how = "write it with DreamPainterPipeline.save_pretrained; training writes <output_dir>/pipeline/"
    folder = Path(folder)
    require_file(folder / "model_index.json", "pipeline folder (model_index.json)", how)
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(
            f"{folder / 'model_index.json'}: not a readable JSON file ({error})"
        ) from None
    for name in WEIGHTED_COMPONENTS:
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            continue
        part = folder / name
        require_file(part / "config.json", f"pipeline component {name}", how)
        if not any(path.suffix in WEIGHT_SUFFIXES for path in part.iterdir()):
            raise MissingFileError(
                f"{part}: no weights file (e.g. {part / 'diffusion_pytorch_model.safetensors'} or model.safetensors); {how}"
            )
    adapter = folder / "reference_adapter"
    if adapter.is_dir():
        require_file(adapter / "adapter.safetensors", "reference adapter weights", how)


def load_pipeline(
    folder: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
):
    """Load a saved DreamPainterPipeline (checked first) onto ``device``; loading errors become one line."""
    from dreampainter.pipelines import DreamPainterPipeline

    check_pipeline_folder(folder)
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        pipe = DreamPainterPipeline.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as error:
        raise CheckpointMismatchError(
            f"{folder}: cannot load the pipeline ({error})".replace("\n", " ")
        ) from None
    return pipe.to(device)


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidInputError(f"{name}: must be a positive integer, got {value!r}")


def _non_negative_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"{name}: must be an integer >= 0, got {value!r}")


__all__ = [
    "CONTROLS",
    "BenchmarkSettings",
    "check_pipeline_folder",
    "load_evaluation_file",
    "load_pipeline",
]
