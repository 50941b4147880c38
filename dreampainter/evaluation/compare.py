"""Compare several systems on one benchmark split: every system runs on the same samples with the same
per-sample seeds and settings through the runner (:func:`run_benchmark`, main run only) and the same
metrics; the comparison is one table (``comparison.md`` / ``comparison.json``), paired statistics of each
system against a reference system, and one contact sheet with a column per system.

```python
compare = load_compare_file("configs/compare_systems.yaml")
report = run_comparison(compare, "toy/bench", "outputs/compare")      # comparison.json as a dict
```

Each system's own report (``metrics.json``, ``per_sample.csv``, images) is written to
``<out>/systems/<name>/`` exactly as ``dreampainter evaluate`` writes it. A system that fails to load is
reported and skipped; a metric that cannot be computed leaves its cells empty with the reason.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from dreampainter.errors import DreamPainterError, InvalidInputError, require_file
from dreampainter.evaluation.bench_data import iter_benchmark
from dreampainter.evaluation.bench_settings import BenchmarkSettings
from dreampainter.evaluation.contact_sheet import choose_metric, pick_cases, write_sample_sheet
from dreampainter.evaluation.paired_stats import paired_comparison
from dreampainter.evaluation.registry import EvaluationConfig, MetricSuite, json_ready
from dreampainter.evaluation.runner import ProcessGroup, build_run_suites, run_benchmark
from dreampainter.evaluation.runs import MAIN_RUN
from dreampainter.evaluation.systems import (
    SystemEntry,
    SystemKind,
    check_system_files,
    check_system_name,
    load_system,
)
from dreampainter.utils import atomic_write_text
from dreampainter.utils.config import ConfigValueError, check_int, check_number, config_to_dict, load_config

COMPARISON_FORMAT = "dreampainter-comparison"
COMPARISON_VERSION = 1
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
COMPARISON_SHEET = "comparison_sheet.png"
SYSTEMS_FOLDER = "systems"
# Aggregates whose direction no metric declares per value.
EXTRA_DIRECTIONS = {"expansion_mean": False}
# Sanity rows: shown, never ranked (copy_input trivially wins FID and reference fidelity on toy data).
UNRANKED_KINDS = (SystemKind.copy_input,)


@dataclass
class ComparisonSettings:
    """The ``comparison`` section: the paired statistics' reference system and bootstrap."""

    reference_system: str | None = None  # None: the first system that loads
    bootstrap_resamples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self.bootstrap_resamples, "bootstrap_resamples", 1)
        check_int(self.seed, "seed")
        check_number(self.confidence, "confidence")
        if not 0 < self.confidence < 1:
            raise ConfigValueError("confidence", f"must be between 0 and 1, got {self.confidence}")


@dataclass
class CompareFile:
    """A systems file: the metrics (``evaluation``), the shared generation settings (``benchmark``; its
    ``controls`` are not run), the ``comparison`` settings and the ``systems`` by name, in table order."""

    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    benchmark: BenchmarkSettings = field(default_factory=BenchmarkSettings)
    comparison: ComparisonSettings = field(default_factory=ComparisonSettings)
    systems: dict[str, SystemEntry] = field(default_factory=dict)


def _duplicate_names(path: Path) -> None:
    """YAML keeps the last of two equal keys silently in some loaders; name the duplicate system instead."""
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return  # the config loader reports syntax errors
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if key.value == "systems" and isinstance(value, yaml.MappingNode):
            seen: dict[str, int] = {}
            for name, _ in value.value:
                line = name.start_mark.line + 1
                if name.value in seen:
                    raise InvalidInputError(
                        f"{path}: systems.{name.value}: two systems have this name (lines {seen[name.value]} and {line})"
                    )
                seen[name.value] = line


def load_compare_file(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), reference_system: str | None = None
) -> CompareFile:
    """Read and check a systems file: unknown keys, bad kinds, duplicate names, missing folders and files
    are one error line naming the file and key (nothing is loaded)."""
    require_file(path, "systems file", "see configs/compare_systems.yaml and docs/evaluation.md")
    path = Path(path)
    _duplicate_names(path)
    compare = load_config(CompareFile, path, overrides)
    if not compare.systems:
        raise InvalidInputError(f"{path}: systems: no systems given")
    for name, entry in compare.systems.items():
        try:
            check_system_name(name)
            check_system_files(entry)
        except DreamPainterError as error:
            key = next(
                (k for k in ("pipeline", "ip_adapter", "image_encoder") if _mentions(error, entry, k)), ""
            )
            raise type(error)(f"{path}: systems.{name}{'.' + key if key else ''}: {error}") from None
    if reference_system is not None:
        compare.comparison.reference_system = reference_system
    wanted = compare.comparison.reference_system
    if wanted is not None and wanted not in compare.systems:
        raise InvalidInputError(
            f"{path}: comparison.reference_system: no system named {wanted!r} (systems: {', '.join(compare.systems)})"
        )
    compare.benchmark = dataclasses.replace(compare.benchmark, controls=[])
    return compare


def _mentions(error: BaseException, entry: SystemEntry, key: str) -> bool:
    value = getattr(entry, key)
    return bool(value) and str(Path(value)) in str(error)


def run_comparison(
    compare: CompareFile,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    group: ProcessGroup | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    backbones: dict[str, Any] | None = None,
    segmenter: Any = None,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Run every system of ``compare`` on ``data``; write the comparison to ``out``.

    Returns the ``comparison.json`` content on the main process (None on the others).
    """
    group = group or ProcessGroup(device=torch.device(device or "cpu"))
    device = device or group.device
    out = Path(out)
    started = time.perf_counter()
    evaluation = compare.evaluation
    shared = build_run_suites([MAIN_RUN], evaluation, group, backbones=backbones, segmenter=segmenter)[
        MAIN_RUN
    ]
    if group.is_main:
        for name, reason in shared.skipped.items():
            print(f"warning: metric {name} skipped: {reason}", file=sys.stderr)
    results: dict[str, dict[str, Any]] = {}
    suites: dict[str, MetricSuite] = {}
    used = False  # the first system that loads gets the suite built above, the others fresh ones
    for name, entry in compare.systems.items():
        error = None
        try:
            system = load_system(entry, device, dtype)
        except Exception as failure:  # noqa: BLE001 - any loading failure skips this system only
            system, error = None, f"{type(failure).__name__}: {failure}".replace("\n", " ")
        failed = next((e for e in group.gather(error) if e), None)  # every process skips it alike
        if failed is not None:
            if group.is_main:
                print(f"warning: system {name} failed to load and is skipped: {failed}", file=sys.stderr)
            results[name] = {"status": "failed", "error": failed}
            continue
        suite = shared if not used else build_run_suites(
            [MAIN_RUN], evaluation, group, backbones=shared.backbones, segmenter=segmenter
        )[MAIN_RUN]  # fmt: skip
        used = True
        if group.is_main and progress:
            print(f"system {name} ({entry.kind})", file=sys.stderr)
        report = run_benchmark(
            system,
            data,
            out / SYSTEMS_FOLDER / name,
            evaluation,
            entry.settings(compare.benchmark),
            group=group,
            suites={MAIN_RUN: suite},
            progress=progress,
            pipeline_name=entry.pipeline or str(entry.kind),
        )
        del system
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if report is not None:
            suites[name] = suite
            results[name] = {"status": "ok", "report": report}
    comparison = None
    if group.is_main:
        comparison = write_comparison(out, compare, results, suites, data=os.fspath(data), world_size=group.world_size,
                                      wall_s=time.perf_counter() - started)  # fmt: skip
    group.barrier()
    return comparison


# ---------------------------------------------------------------------------- the comparison


def _directions(suites: dict[str, MetricSuite]) -> dict[str, bool]:
    directions = dict(EXTRA_DIRECTIONS)
    for suite in suites.values():
        directions.update(suite.higher_is_better())
    return directions


def best_systems(rows: list[dict[str, Any]], metric: str, higher: bool) -> list[str]:
    """The ranked systems with the best finite value of ``metric`` (ties: all of them)."""
    values = {
        row["name"]: row["values"][metric]
        for row in rows
        if row["ranked"]
        and isinstance(row["values"].get(metric), (int, float))
        and math.isfinite(row["values"][metric])
    }
    if not values:
        return []
    best = max(values.values()) if higher else min(values.values())
    return [name for name, value in values.items() if value == best]


def paired_statistics(
    suites: dict[str, MetricSuite], reference: str, directions: dict[str, bool], settings: ComparisonSettings
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{system: {column: stats}}`` of every other system against ``reference``, per per-sample column."""
    base = suites[reference].per_sample()
    columns = [c for c in suites[reference].columns() if c in directions]
    paired: dict[str, dict[str, dict[str, Any]]] = {}
    for name, suite in suites.items():
        if name == reference:
            continue
        rows = suite.per_sample()
        paired[name] = {}
        for column in columns:
            if column not in suite.columns():
                continue
            result = paired_comparison(
                {k: r.get(column, math.nan) for k, r in rows.items()},
                {k: r.get(column, math.nan) for k, r in base.items()},
                resamples=settings.bootstrap_resamples,
                confidence=settings.confidence,
                seed=settings.seed,
            ).as_dict()
            higher = directions[column]
            result["higher_is_better"] = higher
            result["better"], result["worse"] = (
                (result["above"], result["below"]) if higher else (result["below"], result["above"])
            )
            paired[name][column] = result
    return paired


def _listing(data: str, limit: int | None) -> dict[str, int]:
    index_of: dict[str, int] = {}
    for index, _, key, _, shard_error in iter_benchmark(data, limit):
        if shard_error is None:
            index_of.setdefault(key, index)
    return index_of


def _sheet(
    out: Path, data: str, settings: BenchmarkSettings, suites: dict[str, MetricSuite], reference: str
) -> dict[str, Any]:
    """The contact sheet: the reference system's best and worst samples, one column per system."""
    if not settings.save_images:
        return {"skipped": "result images were not saved (save_images: false)"}
    chosen, reason = choose_metric(suites[reference], settings.contact_metric)
    if chosen is None:
        return {"skipped": reason}
    per_system = {name: suite.per_sample() for name, suite in suites.items()}
    values = {key: row.get(chosen, math.nan) for key, row in per_system[reference].items()}
    higher = suites[reference].higher_is_better()[chosen]
    best, worst = pick_cases(values, higher, settings.contact_count)
    keys = [*best, *worst]
    labels = [f"best {i}" for i in range(1, len(best) + 1)] + [f"worst {i}" for i in range(1, len(worst) + 1)]

    def caption(label: str, key: str) -> str:
        shown = ", ".join(
            f"{name} {per_system[name].get(key, {}).get(chosen, math.nan):.3g}" for name in suites
        )
        return f"{label} of {reference}: {key}  {chosen}: {shown}"

    write_sample_sheet(
        out / COMPARISON_SHEET,
        data=data,
        limit=settings.limit,
        index_of=_listing(data, settings.limit),
        keys=keys,
        captions=[caption(label, key) for label, key in zip(labels, keys)],
        results=[(name, out / SYSTEMS_FOLDER / name, MAIN_RUN) for name in suites],
    )
    return {
        "file": COMPARISON_SHEET,
        "metric": chosen,
        "higher_is_better": higher,
        "chosen_by": reference,
        "keys": keys,
    }


def write_comparison(
    out: Path,
    compare: CompareFile,
    results: dict[str, dict[str, Any]],
    suites: dict[str, MetricSuite],
    *,
    data: str,
    world_size: int,
    wall_s: float,
) -> dict[str, Any]:
    """Write ``comparison.json``, ``comparison.md`` and the contact sheet; returns the JSON content."""
    out.mkdir(parents=True, exist_ok=True)
    directions = _directions(suites)
    rows: list[dict[str, Any]] = []
    for name, entry in compare.systems.items():
        result = results[name]
        row: dict[str, Any] = {
            "name": name,
            "kind": str(entry.kind),
            "ranked": entry.kind not in UNRANKED_KINDS,
        }
        row["source"] = {k: v for k, v in config_to_dict(entry).items() if v is not None and k != "kind"}
        if result["status"] == "failed":
            rows.append({**row, "status": "failed", "error": result["error"], "values": {}, "skipped": {}})
            continue
        main = next(r for r in result["report"]["runs"] if r["run"] == MAIN_RUN)
        rows.append({
            **row, "status": "ok", "samples": main["samples"], "values": main["values"], "skipped": main["skipped"],
            "report": f"{SYSTEMS_FOLDER}/{name}/metrics.json", "counts": result["report"]["counts"],
        })  # fmt: skip
    metrics = list(dict.fromkeys(metric for row in rows for metric in row["values"]))
    table = [
        {"name": metric, "higher_is_better": directions.get(metric)}
        | ({"best": best_systems(rows, metric, directions[metric])} if metric in directions else {})
        for metric in metrics
    ]
    loaded = [row["name"] for row in rows if row["status"] == "ok"]
    reference = compare.comparison.reference_system or (loaded[0] if loaded else None)
    if reference in suites:
        paired: dict[str, Any] = paired_statistics(suites, reference, directions, compare.comparison)
        sheet = _sheet(out, data, compare.benchmark, suites, reference)
    else:
        why = f"the reference system {reference} did not load" if reference else "no system loaded"
        paired, sheet = {"skipped": why}, {"skipped": why}
    counts = next((row["counts"] for row in rows if row["status"] == "ok"), {})
    comparison = json_ready({
        "format": COMPARISON_FORMAT,
        "version": COMPARISON_VERSION,
        "data": data,
        "reference_system": reference,
        "systems": rows,
        "metrics": table,
        "paired": paired,
        "paired_settings": dataclasses.asdict(compare.comparison) | {"reference_system": reference},
        "contact_sheet": sheet,
        "counts": {**counts, "systems": len(rows), "systems_run": len(loaded), "processes": world_size},
        "config": {"evaluation": dataclasses.asdict(compare.evaluation), "benchmark": compare.benchmark.as_dict()},
        "timing": {"wall_s": wall_s},
    })  # fmt: skip
    atomic_write_text(out / COMPARISON_JSON, json.dumps(comparison, indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / COMPARISON_MD, comparison_markdown(comparison))
    return comparison


# ---------------------------------------------------------------------------- markdown


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _arrow(higher: bool | None) -> str:
    return {True: " ↑", False: " ↓"}.get(higher, "")


def comparison_markdown(comparison: dict[str, Any]) -> str:
    """``comparison.md``: the table (direction marked, best in bold), what was skipped, the paired statistics."""
    rows, metrics = comparison["systems"], comparison["metrics"]
    counts, benchmark = comparison["counts"], comparison["config"]["benchmark"]
    lines = [
        f"# Comparison on `{comparison['data']}`",
        "",
        f"{counts.get('evaluated', 0)} samples ({counts.get('listed', 0)} listed, {counts.get('bad', 0)} bad), "
        f"{benchmark['num_inference_steps']} steps, seed {benchmark['seed']}, {counts['processes']} process(es). "
        "↑ higher is better, ↓ lower is better; best in **bold** "
        f"({', '.join(k.value for k in UNRANKED_KINDS)} is a sanity row and is not ranked). "
        "An empty cell was not computed (see below).",
        "",
        "| system | kind | "
        + " | ".join(f"`{m['name']}`{_arrow(m['higher_is_better'])}" for m in metrics)
        + " |",
        "| --- | --- | " + " | ".join("---:" for _ in metrics) + " |",
    ]
    for row in rows:
        if row["status"] != "ok":
            continue
        cells = []
        for metric in metrics:
            text = _number(row["values"].get(metric["name"]))
            cells.append(f"**{text}**" if text and row["name"] in metric.get("best", []) else text)
        lines.append(f"| {row['name']} | {row['kind']} | " + " | ".join(cells) + " |")
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        lines += ["", "Systems that failed to load (skipped):", ""]
        lines += [f"- `{row['name']}` ({row['kind']}): {row['error']}" for row in failed]
    skipped: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        for metric, reason in row.get("skipped", {}).items():
            skipped.setdefault((metric, reason), []).append(row["name"])
    if skipped:
        lines += ["", "Metrics not computed (empty cells):", ""]
        lines += [
            f"- `{metric}` ({', '.join(names)}): {reason}" for (metric, reason), names in skipped.items()
        ]
    lines += ["", f"## Paired statistics against `{comparison['reference_system']}`", ""]
    paired, settings = comparison["paired"], comparison["paired_settings"]
    if "skipped" in paired:
        lines.append(f"Not computed: {paired['skipped']}.")
    else:
        confidence = round(100 * settings["confidence"])
        lines += [
            f"Per sample: difference = system − {comparison['reference_system']} over the samples both measured; "
            f"mean difference with its paired bootstrap {confidence}% interval ({settings['bootstrap_resamples']} "
            "resamples of samples, percentile), samples where the system is better / worse / tied, and the exact "
            "two-sided sign-test p-value (ties left out).",
            "",
            f"| system | metric | n | mean difference | {confidence}% interval | better / worse / tied | sign-test p |",
            "| --- | --- | ---: | ---: | --- | --- | ---: |",
        ]
        for name, columns in paired.items():
            for column, stats in columns.items():
                interval = f"[{_number(stats['ci_low'])}, {_number(stats['ci_high'])}]"
                lines.append(
                    f"| {name} | `{column}`{_arrow(stats['higher_is_better'])} | {stats['n']} | "
                    f"{_number(stats['mean_difference'])} | {interval} | "
                    f"{stats['better']} / {stats['worse']} / {stats['ties']} | {stats['sign_test_p']:.3g} |"
                )
    sheet = comparison["contact_sheet"]
    lines += ["", "## Contact sheet", ""]
    if "file" in sheet:
        lines.append(
            f"`{sheet['file']}`: the best and worst samples of `{sheet['chosen_by']}` by `{sheet['metric']}`; "
            "photo, product mask, reference, then one column per system."
        )
    else:
        lines.append(f"Not written: {sheet['skipped']}.")
    return "\n".join(lines) + "\n"


__all__ = [
    "COMPARISON_JSON",
    "COMPARISON_MD",
    "COMPARISON_SHEET",
    "CompareFile",
    "ComparisonSettings",
    "best_systems",
    "comparison_markdown",
    "load_compare_file",
    "paired_statistics",
    "run_comparison",
    "write_comparison",
]
