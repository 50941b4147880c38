"""Benchmark settings and inputs: the ``benchmark`` config section, the evaluation YAML file, and a
checked saved pipeline folder (a missing weights file is named with how to get it)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, MissingFileError, require_file
from dreampainter.evaluation.registry import EvaluationConfig
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.utils.config import (
    Choice,
    ConfigValueError,
    as_choice,
    check_int,
    config_from_dict,
    config_to_dict,
    load_config,
)


class Control(Choice):
    """A control run beside the main one (see docs/evaluation.md)."""

    no_reference = "no_reference"  # text only
    shuffled_reference = "shuffled_reference"  # each sample shown another sample's reference


CONTROLS = tuple(Control.values())


@dataclass
class BenchmarkSettings(GenerationSettings):
    """How results are generated and reported (the ``benchmark`` section of an evaluation config).

    The generation settings are :class:`GenerationSettings` (the pipeline's keyword names); ``seed``
    is the base of every sample's own seed (``runner.sample_seed``).
    """

    batch_size: int = 4
    controls: list[Control] = field(default_factory=lambda: list(Control))
    limit: int | None = None
    save_images: bool = True
    contact_metric: str | None = None  # default: the first of CONTACT_METRICS that was measured
    contact_count: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.controls, str) or not isinstance(self.controls, Sequence):
            raise ConfigValueError("controls", f"must be a list, got {self.controls!r}")
        try:
            self.controls = [as_choice(name, Control, "controls") for name in self.controls]
        except ConfigValueError as error:
            raise ConfigValueError("controls", f"{error.problem} (or none: [])") from None
        for name in ("batch_size", "contact_count"):
            check_int(getattr(self, name), name, 1)
        check_int(self.limit, "limit", 1, optional=True)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None) -> BenchmarkSettings:
        """From a dict or OmegaConf node, through the one config loader (errors name the key)."""
        return config_from_dict(cls, mapping, "benchmark")

    def as_dict(self) -> dict[str, Any]:
        """Plain values (controls as strings), as written to ``metrics.json``."""
        return config_to_dict(self)


@dataclass
class EvaluationFile:
    """An evaluation YAML file: the ``evaluation`` (metrics) and ``benchmark`` (generation) sections."""

    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Pipeline components that hold weights (the tokenizer and scheduler only hold configs).
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "reference_encoder")


def load_evaluation_file(
    path: str | os.PathLike | None, overrides: Sequence[str] = ()
) -> tuple[EvaluationConfig, BenchmarkSettings]:
    """Read an evaluation YAML (``base:`` chains and ``key=value`` overrides as for training); None: defaults."""
    if path is not None:
        require_file(path, "evaluation config", "see configs/eval_toy.yaml and docs/evaluation.md")
    loaded = load_config(EvaluationFile, path, overrides)
    return loaded.evaluation, loaded.benchmark


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


__all__ = [
    "CONTROLS",
    "BenchmarkSettings",
    "Control",
    "EvaluationFile",
    "check_pipeline_folder",
    "load_evaluation_file",
    "load_pipeline",
]
