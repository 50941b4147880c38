"""The benchmark runner: generate a result for every benchmark sample, score them, write the report.

```python
pipe = DreamPainterPipeline.from_pretrained(folder).to(device)
report = run_benchmark(pipe, "bench/", "eval_out/", EvaluationConfig.from_dict(cfg.evaluation),
                       BenchmarkSettings(steps=30, seed=0))
```

- **Seeds**: sample ``key`` is generated with ``torch.Generator().manual_seed(sample_seed(seed, key))``
  (a CPU generator, one per image): results depend neither on the batch a sample lands in nor on
  the number of processes, and every run (main and controls) uses the same noise for a sample.
- **Runs**: ``main`` (the true reference) and the controls ``no_reference`` (text only) and
  ``shuffled_reference`` (the reference of another sample, a fixed derangement). Every run is
  scored against the *true* reference, so the controls give the baselines that reference
  fidelity (CLIP-I, DINO, background distance) is read against.
- **Processes**: under ``accelerate launch`` the samples are checked split by index
  (``index % num_processes``), then generated in global batches (equal photo sizes, listing
  order) dealt out round-robin, so each sample is generated in the same batch whatever the number
  of processes; metric states (``MetricSuite.state_dict``) are gathered and merged on the main
  process, which writes the report: bitwise the same numbers as one process at the same batch size.
- **Outputs** (``out/``): ``metrics.json`` (all runs, skipped metrics with reasons, config,
  counts, bad samples), ``per_sample.csv``, ``contact_sheet.png`` and ``images/<run>/<key>.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dreampainter.errors import InvalidInputError
from dreampainter.evaluation.batch import EvalBatch, EvalSample
from dreampainter.evaluation.bench_data import (
    BadSample,
    BenchSample,
    EncodedEntry,
    read_benchmark_share,
    read_encoded,
    shuffled_partners,
)
from dreampainter.evaluation.registry import EvaluationConfig, MetricSuite, build_suite

MAIN_RUN = "main"
CONTROLS = ("no_reference", "shuffled_reference")
RUN_DESCRIPTIONS = {
    MAIN_RUN: "the sample's own reference",
    "no_reference": "no reference (text only), same seeds",
    "shuffled_reference": "another sample's reference (fixed derangement), same seeds",
}


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
    feather_radius: float = 2.0
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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError(f"seed: must be a non-negative integer, got {self.seed!r}")
        if (
            isinstance(self.product_dilation, bool)
            or not isinstance(self.product_dilation, int)
            or self.product_dilation < 0
        ):
            raise InvalidInputError(
                f"product_dilation: must be an integer >= 0, got {self.product_dilation!r}"
            )
        for name in ("text_guidance", "reference_guidance", "reference_scale", "feather_radius"):
            value = getattr(self, name)
            if value is None and name != "text_guidance" and name != "feather_radius":
                continue
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

    from dreampainter.errors import require_file

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
    import json

    from dreampainter.errors import MissingFileError, require_file

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
    from dreampainter.errors import CheckpointMismatchError
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


def sample_seed(seed: int, key: str) -> int:
    """The generation seed of sample ``key``: a hash of the base seed and the key (63 bits)."""
    digest = hashlib.sha256(f"{seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class ProcessGroup:
    """Where this process stands among the evaluating processes (one process by default).

    :meth:`from_accelerate` wraps accelerate's ``PartialState`` (``accelerate launch``).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _state: Any = None

    @classmethod
    def from_accelerate(cls, state: Any = None) -> ProcessGroup:
        from accelerate import PartialState

        if state is None:
            api = getattr(torch, "accelerator", None)
            available = api.is_available() if api is not None else torch.cuda.is_available()
            state = PartialState(cpu=not available)  # without a GPU, launched processes use gloo on the CPU
        return cls(state.process_index, state.num_processes, state.device, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every process, in rank order (a collective call: every process must make it)."""
        if self.world_size == 1:
            return [value]
        from accelerate.utils import gather_object

        return list(gather_object([value]))

    def barrier(self) -> None:
        if self.world_size > 1:
            self._state.wait_for_everyone()


@dataclass
class Generated:
    """One run's results for a batch: raw (before compositing) and composited, float HxWx3 in [0, 1]."""

    raw: list[np.ndarray]
    composited: list[np.ndarray]


def generate_batch(
    pipe: Any,
    samples: list[BenchSample],
    references: list[Any] | None,
    settings: BenchmarkSettings,
) -> Generated:
    """Generate ``samples`` (one image each, per-sample seeds); ``references`` None for text only.

    The pipeline is asked for its raw output at the input size (``paste_product=False``) and the
    product is pasted back here with the pipeline's own feathered compositing, so one generation
    gives both the image the product metrics need and the final result.
    """
    from dreampainter.pipelines.image_processing import composite, feathered_alpha

    generators = [torch.Generator().manual_seed(sample_seed(settings.seed, s.key)) for s in samples]
    output = pipe(
        prompt=[s.prompt for s in samples],
        image=[s.photo for s in samples],
        product_mask=[s.product_mask for s in samples],
        reference_image=references,
        negative_prompt=settings.negative_prompt,
        text_guidance_scale=settings.text_guidance,
        reference_guidance_scale=settings.reference_guidance,
        reference_scale=settings.reference_scale,
        num_inference_steps=settings.steps,
        generator=generators,
        resolution=settings.resolution,
        product_dilation=settings.product_dilation,
        paste_product=False,
        output_type="np",
    )
    raw = [np.asarray(image, dtype=np.float32) for image in output.images]
    composited = [
        composite(
            image,
            np.asarray(s.photo, dtype=np.float32) / 255.0,
            feathered_alpha(s.product_mask, settings.feather_radius),
        )
        for image, s in zip(raw, samples)
    ]
    return Generated(raw, composited)


def plan_batches(good: list[tuple[int, str, tuple[int, int]]], batch_size: int) -> list[list[int]]:
    """Global batches of sample indices: equally sized photos together (one size per pipeline call),
    in listing order. Batch ``j`` goes to process ``j % world_size``, so every sample is generated in
    the same batch whatever the number of processes, and the results are bitwise the same."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, _, size in good:
        groups.setdefault(tuple(size), []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def image_path(out: Path, run: str, key: str) -> Path:
    """Where a run's composited result for ``key`` is saved (keys may contain ``/``)."""
    return out / "images" / run / f"{key}.png"


class _Scorer:
    """Buffers one run's generated samples and updates its metric suite in chunks."""

    def __init__(self, suite: MetricSuite, chunk: int, bar: tqdm) -> None:
        self.suite = suite
        self.chunk = chunk
        self.bar = bar
        self.pending: list[EvalSample] = []
        self.seconds = 0.0

    def add(self, samples: list[EvalSample]) -> None:
        self.pending += samples
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        start = time.perf_counter()
        self.suite.update(EvalBatch(self.pending))
        self.seconds += time.perf_counter() - start
        self.bar.update(len(self.pending))
        self.pending = []


def plan_runs(pipe: Any, controls: list[str], good_keys: list[str]) -> tuple[list[str], dict[str, str]]:
    """The runs to make and the controls that cannot be made here, with the reason."""
    runs = [MAIN_RUN]
    skipped: dict[str, str] = {}
    for control in controls:
        if not _has_reference(pipe):
            skipped[control] = "the pipeline has no reference encoder and adapter: the main run is text only"
        elif control == "shuffled_reference" and len(good_keys) < 2:
            skipped[control] = f"needs at least 2 evaluable samples, got {len(good_keys)}"
        else:
            runs.append(control)
    return runs, skipped


def run_benchmark(
    pipe: Any,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: EvaluationConfig | None = None,
    settings: BenchmarkSettings | None = None,
    *,
    group: ProcessGroup | None = None,
    backbones: Mapping[str, Any] | None = None,
    segmenter: Any = None,
    suites: dict[str, MetricSuite] | None = None,
    progress: bool = True,
    pipeline_name: str | None = None,
) -> dict[str, Any] | None:
    """Evaluate ``pipe`` on the benchmark shards ``data``; write the report to ``out``.

    Returns the ``metrics.json`` content on the main process (None on the others). ``config`` is
    the metric config (``device: auto`` or ``cuda`` runs the metrics on this process's device);
    ``backbones`` / ``segmenter`` are passed to :func:`build_suite`, or give ready ``suites``
    (``{run: suite}``, e.g. built before the pipeline is loaded so missing weights show early).
    """
    from dreampainter.evaluation.report import write_report

    group = group or ProcessGroup(device=getattr(pipe, "device", torch.device("cpu")))
    config = config or EvaluationConfig()
    settings = (settings or BenchmarkSettings()).validate()
    out = Path(out)
    show = progress and group.is_main
    started = time.perf_counter()

    share = read_benchmark_share(data, group.rank, group.world_size, settings.limit)
    listing = [(index, entry.key, share.sizes[index]) for index, entry in share.good.items()]
    found = group.gather((listing, share.bad))
    good = sorted(entry for part, _ in found for entry in part)
    bad = sorted((b for _, part in found for b in part), key=lambda b: (b.shard, _order(b.index)))
    good_keys = [key for _, key, _ in good]
    index_of = {key: index for index, key, _ in good}
    runs, skipped_runs = plan_runs(pipe, settings.controls, good_keys)
    suites = dict(suites or {})
    missing = [run for run in runs if run not in suites]
    if missing:
        shared = next(iter(suites.values())).backbones if suites else backbones
        suites.update(build_run_suites(missing, config, group, backbones=shared, segmenter=segmenter))

    batches = plan_batches(good, settings.batch_size)[group.rank :: group.world_size]
    partners = shuffled_partners(good_keys, settings.seed) if "shuffled_reference" in runs else {}
    mine = {index for batch in batches for index in batch}
    key_at = {index: key for index, key, _ in good}
    partner_of = {index: index_of[partners[key_at[index]]] for index in mine if partners}
    needed = mine | set(partner_of.values())
    encoded = {index: entry for index, entry in share.good.items() if index in needed}
    share.good = {}  # free what other processes generate
    encoded.update(read_encoded(data, needed - set(encoded), settings.limit))

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    total = sum(len(batch) for batch in batches) * len(runs)
    generate_bar = tqdm(total=total, desc="generate", unit="img", disable=not show)
    score_bar = tqdm(total=total, desc="features", unit="img", disable=not show)
    scorers = {run: _Scorer(suites[run], max(1, config.batch_size), score_bar) for run in runs}
    generate_seconds = 0.0
    with_reference = _has_reference(pipe)
    infos = []
    for batch_indices in batches:
        batch = [encoded[index].decode() for index in batch_indices]
        infos += [_info(sample, settings.seed, partners) for sample in batch]
        for run in runs:
            references = _references(run, batch, partner_of, encoded, with_reference)
            start = time.perf_counter()
            generated = generate_batch(pipe, batch, references, settings)
            generate_seconds += time.perf_counter() - start
            generate_bar.update(len(batch))
            evaluated = [
                EvalSample(
                    key=s.key,
                    raw=raw,
                    composited=composited,
                    photo=s.photo,
                    product_mask=s.product_mask,
                    reference=s.reference,  # always the true reference: controls are baselines
                    prompt=s.prompt,
                    meta=s.meta,
                )
                for s, raw, composited in zip(batch, generated.raw, generated.composited)
            ]
            if settings.save_images:
                _save_images(out, run, evaluated)
            scorers[run].add(evaluated)
    for scorer in scorers.values():
        scorer.flush()
    generate_bar.close()
    score_bar.close()

    states = {run: group.gather(suites[run].state_dict()) for run in runs}
    infos = [info for part in group.gather(infos) for info in part]
    timings = group.gather(
        {"generate_s": generate_seconds, "score_s": sum(s.seconds for s in scorers.values())}
    )
    report = None
    if group.is_main:
        for run in runs:
            suites[run].merge_state([state for rank, state in enumerate(states[run]) if rank != group.rank])
        report = write_report(
            out,
            suites=suites,
            runs=runs,
            skipped_runs=skipped_runs,
            infos=sorted(infos, key=lambda info: info["key"]),
            bad=bad,
            listed=len(share.keys),
            index_of=index_of,
            data=os.fspath(data),
            config=config,
            settings=settings,
            world_size=group.world_size,
            pipeline=pipeline_name,
            timings={
                "wall_s": time.perf_counter() - started,
                "generate_s_per_process": [t["generate_s"] for t in timings],
                "score_s_per_process": [t["score_s"] for t in timings],
            },
        )
    group.barrier()
    return report


def _has_reference(pipe: Any) -> bool:
    return getattr(pipe, "reference_encoder", None) is not None and bool(
        getattr(pipe, "has_reference_adapter", False)
    )


def _order(index: int | None) -> float:
    return math.inf if index is None else index


def _references(
    run: str,
    batch: list[BenchSample],
    partner_of: dict[int, int],
    encoded: dict[int, EncodedEntry],
    with_reference: bool,
) -> list[Any] | None:
    if run == "no_reference" or not with_reference:
        return None
    if run == "shuffled_reference":
        return [encoded[partner_of[s.index]].decode_reference() for s in batch]
    return [s.reference for s in batch]


def _info(sample: BenchSample, seed: int, partners: dict[str, str]) -> dict[str, Any]:
    """The per-sample CSV's leading columns."""
    return {
        "key": sample.key,
        "index": sample.index,
        "seed": sample_seed(seed, sample.key),
        "category": sample.meta.get("category", ""),
        "prompt": sample.prompt,
        "partner": partners.get(sample.key),
    }


def _save_images(out: Path, run: str, samples: list[EvalSample]) -> None:
    from PIL import Image

    for sample in samples:
        path = image_path(out, run, sample.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample.composited).save(path)


def build_run_suites(
    runs: list[str],
    config: EvaluationConfig,
    group: ProcessGroup | None = None,
    *,
    backbones: Mapping[str, Any] | None = None,
    segmenter: Any = None,
) -> dict[str, MetricSuite]:
    """One metric suite per run, sharing the loaded backbones; metric progress bars are left to the runner."""
    group = group or ProcessGroup()
    config = dataclasses.replace(config, progress=False)
    if config.device in ("auto", "cuda"):
        config.device = str(group.device)
    first = build_suite(config, backbones=backbones, segmenter=segmenter)
    suites = {runs[0]: first}
    for run in runs[1:]:
        suites[run] = build_suite(config, backbones=first.backbones, segmenter=segmenter)
    return suites


__all__ = [
    "CONTROLS",
    "MAIN_RUN",
    "BadSample",
    "BenchmarkSettings",
    "ProcessGroup",
    "build_run_suites",
    "generate_batch",
    "plan_runs",
    "run_benchmark",
    "sample_seed",
]
