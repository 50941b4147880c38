"""The benchmark runner: generate a result for every benchmark sample, score them, write the report.

```python
pipe = DreamPainterPipeline.from_pretrained(folder).to(device)
report = run_benchmark(pipe, "bench/", "eval_out/", EvaluationConfig.from_dict(cfg.evaluation),
                       BenchmarkSettings(num_inference_steps=30, seed=0))
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
- **Systems**: ``pipe`` may also be a :class:`BenchmarkSystem` (``evaluation/systems.py``: diffusers
  pipelines, the reference-paste baseline, the input photo) that makes results for a batch the same way;
  ``evaluation/compare.py`` runs several of them on the same samples and seeds.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dreampainter.evaluation.batch import EvalBatch, EvalSample
from dreampainter.evaluation.bench_data import (
    BadSample,
    BenchSample,
    EncodedEntry,
    read_benchmark_share,
    read_encoded,
    shuffled_partners,
)
from dreampainter.evaluation.bench_settings import (
    CONTROLS,
    BenchmarkSettings,
    check_pipeline_folder,
    load_evaluation_file,
    load_pipeline,
)
from dreampainter.evaluation.registry import EvaluationConfig, MetricSuite, build_suite
from dreampainter.evaluation.report import write_report
from dreampainter.evaluation.runs import MAIN_RUN, image_path
from dreampainter.pipelines.settings import GenerationSettings


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
            from dreampainter.utils import use_cpu

            state = PartialState(cpu=use_cpu())  # without a GPU, launched processes use gloo on the CPU
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
    settings: GenerationSettings,
) -> Generated:
    """Generate ``samples`` (one image each, per-sample seeds); ``references`` None for text only.

    The pipeline is asked for its raw output at the input size (``paste_product=False``) and the
    product is pasted back here with the pipeline's own feathered compositing, so one generation
    gives both the image the product metrics need and the final result.
    """
    output = pipe(
        prompt=[s.prompt for s in samples],
        image=[s.photo for s in samples],
        product_mask=[s.product_mask for s in samples],
        reference_image=references,
        generator=sample_generators(samples, settings.seed),
        **settings.pipeline_kwargs(),
        paste_product=False,
        output_type="np",
    )
    return paste_products([np.asarray(image, dtype=np.float32) for image in output.images], samples, settings)


def sample_generators(samples: list[BenchSample], seed: int) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with :func:`sample_seed`."""
    return [torch.Generator().manual_seed(sample_seed(seed, s.key)) for s in samples]


def paste_products(raw: list[np.ndarray], samples: list[BenchSample], settings: GenerationSettings) -> Generated:
    """Raw results (float HxWx3 at the photos' sizes) and the same with each photo's product pasted back
    (the pipeline's feathered compositing, ``settings.feather_radius``)."""
    from dreampainter.pipelines.image_processing import composite, feathered_alpha

    composited = [
        composite(
            image,
            np.asarray(s.photo, dtype=np.float32) / 255.0,
            feathered_alpha(s.product_mask, settings.feather_radius),
        )
        for image, s in zip(raw, samples)
    ]
    return Generated(raw, composited)


class BenchmarkSystem:
    """Something other than a DreamPainter pipeline that the runner can evaluate (see
    ``evaluation/systems.py``): ``generate`` makes one result per sample like :func:`generate_batch`."""

    uses_reference: bool = True  # False: the runner passes ``references=None`` (text only)

    def generate(
        self, samples: list[BenchSample], references: list[Any] | None, settings: GenerationSettings
    ) -> Generated:
        raise NotImplementedError


def plan_batches(good: list[tuple[int, str, tuple[int, int]]], batch_size: int) -> list[list[int]]:
    """Global batches of sample indices: equally sized photos together (one size per pipeline call),
    in listing order. Batch ``j`` goes to process ``j % world_size``, so every sample is generated in
    the same batch whatever the number of processes, and the results are bitwise the same."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, _, size in good:
        groups.setdefault(tuple(size), []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


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
        if not _uses_reference(pipe):
            skipped[control] = "the pipeline has no reference encoder and adapter: the main run is text only"
        elif control == "shuffled_reference" and len(good_keys) < 2:
            skipped[control] = f"needs at least 2 evaluable samples, got {len(good_keys)}"
        else:
            runs.append(control)
    return runs, skipped


@dataclass
class BenchmarkPlan:
    """What this process does: the benchmark's good samples ``(index, key, size)`` and bad ones, the
    runs to make (and the controls that cannot be made, with the reason), this process's batches of
    sample indices, and the shuffled-reference partners."""

    good: list[tuple[int, str, tuple[int, int]]]
    bad: list[BadSample]
    listed: int
    runs: list[str]
    skipped_runs: dict[str, str]
    batches: list[list[int]]
    partners: dict[str, str]

    @property
    def index_of(self) -> dict[str, int]:
        return {key: index for index, key, _ in self.good}


def plan_benchmark(
    pipe: Any, data: str | os.PathLike, settings: BenchmarkSettings, group: ProcessGroup
) -> tuple[BenchmarkPlan, dict[int, EncodedEntry]]:
    """Check this process's share of the samples, agree on the good ones with the other processes,
    and fetch the encoded samples this process generates (plus its shuffled partners' references)."""
    share = read_benchmark_share(data, group.rank, group.world_size, settings.limit)
    listing = [(index, entry.key, share.sizes[index]) for index, entry in share.good.items()]
    found = group.gather((listing, share.bad))
    good = sorted(entry for part, _ in found for entry in part)
    bad = sorted((b for _, part in found for b in part), key=lambda b: (b.shard, _order(b.index)))
    good_keys = [key for _, key, _ in good]
    runs, skipped_runs = plan_runs(pipe, settings.controls, good_keys)
    plan = BenchmarkPlan(
        good=good,
        bad=bad,
        listed=len(share.keys),
        runs=runs,
        skipped_runs=skipped_runs,
        batches=plan_batches(good, settings.batch_size)[group.rank :: group.world_size],
        partners=shuffled_partners(good_keys, settings.seed) if "shuffled_reference" in runs else {},
    )
    index_of = plan.index_of
    mine = {index for batch in plan.batches for index in batch}
    needed = mine | {
        index_of[plan.partners[key]] for index, key, _ in good if index in mine and plan.partners
    }
    encoded = {index: entry for index, entry in share.good.items() if index in needed}
    encoded.update(read_encoded(data, needed - set(encoded), settings.limit))
    return plan, encoded


def generate_and_score(
    pipe: Any,
    plan: BenchmarkPlan,
    encoded: dict[int, EncodedEntry],
    suites: dict[str, MetricSuite],
    settings: BenchmarkSettings,
    out: Path,
    *,
    score_chunk: int = 32,
    show: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Generate this process's batches for every run and feed the results to the run's suite.

    Returns the per-sample info rows (key, seed, category, prompt, ...) and the seconds spent.
    """
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    index_of = plan.index_of
    total = sum(len(batch) for batch in plan.batches) * len(plan.runs)
    generate_bar = tqdm(total=total, desc="generate", unit="img", disable=not show)
    score_bar = tqdm(total=total, desc="features", unit="img", disable=not show)
    scorers = {run: _Scorer(suites[run], max(1, score_chunk), score_bar) for run in plan.runs}
    with_reference = _uses_reference(pipe)
    infos: list[dict[str, Any]] = []
    generate_seconds = 0.0
    for batch_indices in plan.batches:
        batch = [encoded[index].decode() for index in batch_indices]
        infos += [_info(sample, settings.seed, plan.partners) for sample in batch]
        for run in plan.runs:
            if run == "no_reference" or not with_reference:
                references = None
            elif run == "shuffled_reference":
                references = [encoded[index_of[plan.partners[s.key]]].decode_reference() for s in batch]
            else:
                references = [s.reference for s in batch]
            start = time.perf_counter()
            if isinstance(pipe, BenchmarkSystem):
                generated = pipe.generate(batch, references, settings)
            else:
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
    return infos, {"generate_s": generate_seconds, "score_s": sum(s.seconds for s in scorers.values())}


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

    group = group or ProcessGroup(device=getattr(pipe, "device", torch.device("cpu")))
    config = config or EvaluationConfig()
    settings = settings or BenchmarkSettings()
    out = Path(out)
    started = time.perf_counter()

    plan, encoded = plan_benchmark(pipe, data, settings, group)
    suites = dict(suites or {})
    missing = [run for run in plan.runs if run not in suites]
    if missing:
        shared = next(iter(suites.values())).backbones if suites else backbones
        suites.update(build_run_suites(missing, config, group, backbones=shared, segmenter=segmenter))
    infos, seconds = generate_and_score(
        pipe,
        plan,
        encoded,
        suites,
        settings,
        out,
        score_chunk=config.batch_size,
        show=progress and group.is_main,
    )

    states = {run: group.gather(suites[run].state_dict()) for run in plan.runs}  # collective calls
    infos = sorted((info for part in group.gather(infos) for info in part), key=lambda info: info["key"])
    timings = group.gather(seconds)
    report = None
    if group.is_main:
        for run in plan.runs:
            suites[run].merge_state([state for rank, state in enumerate(states[run]) if rank != group.rank])
        report = write_report(
            out,
            suites=suites,
            runs=plan.runs,
            skipped_runs=plan.skipped_runs,
            infos=infos,
            bad=plan.bad,
            listed=plan.listed,
            index_of=plan.index_of,
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


def _uses_reference(pipe: Any) -> bool:
    if isinstance(pipe, BenchmarkSystem):
        return pipe.uses_reference
    return has_reference(pipe)


def has_reference(pipe: Any) -> bool:
    """Whether a DreamPainter pipeline has a reference encoder and adapter (else it runs text only)."""
    return getattr(pipe, "reference_encoder", None) is not None and bool(
        getattr(pipe, "has_reference_adapter", False)
    )


def _order(index: int | None) -> float:
    return math.inf if index is None else index


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
    "check_pipeline_folder",
    "load_evaluation_file",
    "load_pipeline",
    "MAIN_RUN",
    "BadSample",
    "BenchmarkSettings",
    "BenchmarkSystem",
    "Generated",
    "ProcessGroup",
    "BenchmarkPlan",
    "build_run_suites",
    "generate_and_score",
    "generate_batch",
    "has_reference",
    "paste_products",
    "plan_batches",
    "plan_benchmark",
    "plan_runs",
    "run_benchmark",
    "sample_generators",
    "sample_seed",
]
