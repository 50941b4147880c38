"""The benchmark report: ``metrics.json`` (every run, skipped metrics, config, counts, bad samples)
and ``per_sample.csv`` (one row per run and sample)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from dreampainter.evaluation.bench_data import BadSample
from dreampainter.evaluation.contact_sheet import write_contact_sheet
from dreampainter.evaluation.registry import EvaluationConfig, MetricSuite, json_ready
from dreampainter.evaluation.runs import RUN_DESCRIPTIONS
from dreampainter.utils import atomic_path, atomic_write_text

REPORT_FORMAT = "dreampainter-evaluation"
REPORT_VERSION = 1
METRICS_FILE = "metrics.json"
PER_SAMPLE_FILE = "per_sample.csv"
# Values read relative to the controls: how much closer to the true reference the main run is.
REFERENCE_FIDELITY = ("clip_i", "dino", "bg_delta_e", "bg_hist_chi2", "bg_emd")
INFO_COLUMNS = ("run", "key", "seed", "reference_of", "category", "prompt")


def relative_to_controls(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{control: {value: main - control}}`` for the reference-fidelity values both runs measured."""
    by_run = {row["run"]: row["values"] for row in rows}
    main = by_run.get("main", {})
    relative: dict[str, dict[str, float]] = {}
    for run, values in by_run.items():
        if run == "main":
            continue
        relative[run] = {
            name: main[name] - values[name]
            for name in REFERENCE_FIDELITY
            if name in main and name in values and not math.isnan(main[name]) and not math.isnan(values[name])
        }
    return relative


def _reference_of(run: str, info: dict[str, Any]) -> str:
    """Whose reference the run showed for this sample (empty: none)."""
    return {"main": info["key"], "shuffled_reference": info.get("partner") or ""}.get(run, "")


def write_per_sample_csv(
    path: Path, suites: dict[str, MetricSuite], runs: list[str], infos: list[dict]
) -> list[str]:
    """One row per (run, sample): key, seed, whose reference was shown, category and prompt, then every
    metric column (empty where not measurable)."""
    columns = list(dict.fromkeys(column for run in runs for column in suites[run].columns()))
    lines: list[list[Any]] = []
    for run in runs:
        values = suites[run].per_sample()
        for info in infos:
            row = values.get(info["key"], {})
            lines.append(
                [run, info["key"], info["seed"], _reference_of(run, info), info["category"], info["prompt"]]
                + [
                    "" if column not in row or math.isnan(row[column]) else repr(float(row[column]))
                    for column in columns
                ]
            )
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow([*INFO_COLUMNS, *columns])
        writer.writerows(lines)
    return columns


def write_report(
    out: str | os.PathLike,
    *,
    suites: dict[str, MetricSuite],
    runs: list[str],
    skipped_runs: dict[str, str],
    infos: list[dict[str, Any]],
    bad: list[BadSample],
    listed: int,
    index_of: dict[str, int],
    data: str,
    config: EvaluationConfig,
    settings: Any,
    world_size: int,
    timings: dict[str, Any],
    pipeline: str | None = None,
) -> dict[str, Any]:
    """Compute every run's aggregates and write ``metrics.json``, ``per_sample.csv`` and the contact sheet."""

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        computed = suites[run].compute()
        rows.append(
            {
                "run": run,
                "reference": RUN_DESCRIPTIONS[run],
                "samples": len(infos),
                "values": computed["values"],
                "skipped": computed["skipped"],
            }
        )
    write_per_sample_csv(out / PER_SAMPLE_FILE, suites, runs, infos)
    contact = write_contact_sheet(
        out,
        data=data,
        suites=suites,
        runs=runs,
        metric=settings.contact_metric,
        count=settings.contact_count,
        limit=settings.limit,
        images_saved=settings.save_images,
        index_of=index_of,
    )
    report = {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "pipeline": pipeline,
        "data": data,
        "runs": rows,
        "skipped_runs": dict(skipped_runs),
        "relative_to_controls": relative_to_controls(rows),
        "counts": {
            "listed": listed,
            "evaluated": len(infos),
            "bad": len(bad),
            "processes": world_size,
            "runs": len(runs),
        },
        "bad_samples": [b.as_dict() for b in bad],
        "contact_sheet": contact,
        "config": {"evaluation": dataclasses.asdict(config), "benchmark": settings.as_dict()},
        "timing": timings,
        "files": {
            "per_sample": PER_SAMPLE_FILE,
            "images": "images/<run>/<key>.png" if settings.save_images else None,
        },
    }
    report = json_ready(report)
    atomic_write_text(out / METRICS_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return report


__all__ = ["METRICS_FILE", "PER_SAMPLE_FILE", "relative_to_controls", "write_per_sample_csv", "write_report"]
