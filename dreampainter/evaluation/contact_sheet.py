"""The contact sheet: the best and worst benchmark samples for one metric, with every run side by side.

One row per sample: input photo, product mask, reference, then the result of each run (main and
controls, read back from ``images/<run>/<key>.png``); the row caption gives the key and the value.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreampainter.evaluation.registry import MetricSuite
from dreampainter.evaluation.runs import MAIN_RUN, image_path
from dreampainter.utils.grid import image_grid

CONTACT_SHEET_FILE = "contact_sheet.png"
# The default metric, in order of preference: reference fidelity first, then the rest.
CONTACT_METRICS = ("clip_i", "dino", "bg_delta_e", "clip_t", "lpips", "psnr", "ssim", "expansion", "bg_emd")
TILE = 128


def choose_metric(suite: MetricSuite, wanted: str | None) -> tuple[str | None, str | None]:
    """``(metric, None)`` for a per-sample column with a known direction, else ``(None, reason)``."""
    directions = suite.higher_is_better()
    measured = {
        column for row in suite.per_sample().values() for column, v in row.items() if not math.isnan(v)
    }
    usable = [column for column in suite.columns() if column in directions and column in measured]
    if wanted is not None:
        if wanted in usable:
            return wanted, None
        return (
            None,
            f"contact_metric {wanted!r} was not measured per sample in the main run; measured: {usable}",
        )
    for column in (*CONTACT_METRICS, *usable):
        if column in usable:
            return column, None
    return None, "no per-sample metric with a direction was measured in the main run"


def pick_cases(values: dict[str, float], higher_is_better: bool, count: int) -> tuple[list[str], list[str]]:
    """The ``count`` best and ``count`` worst keys (no key in both; ties broken by key; NaN left out)."""
    ranked = sorted(
        (key for key, value in values.items() if not math.isnan(value)),
        key=lambda key: (-values[key] if higher_is_better else values[key], key),
    )
    best = ranked[: min(count, (len(ranked) + 1) // 2)]
    worst = ranked[len(best) :][-count:][::-1]
    return best, worst


def write_sample_sheet(
    path: str | os.PathLike,
    *,
    data: str,
    limit: int | None,
    index_of: dict[str, int],
    keys: list[str],
    captions: list[str],
    results: list[tuple[str, Path, str]],
) -> None:
    """One row per sample ``key``: photo, product mask, reference, then one tile per ``(label, folder, run)``
    of ``results`` (the image saved at ``images/<run>/<key>.png`` under ``folder``; grey when absent)."""
    from dreampainter.evaluation.bench_data import read_samples

    inputs = read_samples(data, [index_of[key] for key in keys], limit)
    rows = []
    for key in keys:
        sample = inputs[index_of[key]]
        tiles = [
            ("photo", sample.photo),
            ("product mask", Image.fromarray(np.asarray(sample.product_mask))),
            ("reference", sample.reference),
        ]
        for label, folder, run in results:
            result = image_path(Path(folder), run, key)
            tiles.append((label, Image.open(result) if result.exists() else None))
        rows.append(tiles)
    image_grid(rows, tile=TILE, captions=captions).save(path)


def write_contact_sheet(
    out: str | os.PathLike,
    *,
    data: str,
    suites: dict[str, MetricSuite],
    runs: list[str],
    metric: str | None,
    count: int,
    limit: int | None,
    images_saved: bool,
    index_of: dict[str, int],
) -> dict[str, Any]:
    """Write ``contact_sheet.png``; returns what it shows (or ``{"skipped": reason}``)."""
    if not images_saved:
        return {"skipped": "result images were not saved (save_images: false)"}
    suite = suites[MAIN_RUN]
    chosen, reason = choose_metric(suite, metric)
    if chosen is None:
        return {"skipped": reason}
    values = {key: row.get(chosen, math.nan) for key, row in suite.per_sample().items()}
    higher = suite.higher_is_better()[chosen]
    best, worst = pick_cases(values, higher, count)
    out = Path(out)
    rows = [(label, rank, key) for label, keys in (("best", best), ("worst", worst)) for rank, key in enumerate(keys, 1)]
    write_sample_sheet(
        out / CONTACT_SHEET_FILE,
        data=data,
        limit=limit,
        index_of=index_of,
        keys=[key for _, _, key in rows],
        captions=[f"{label} {rank}: {key}  {chosen} = {values[key]:.4g}" for label, rank, key in rows],
        results=[(run, out, run) for run in runs],
    )
    return {
        "file": CONTACT_SHEET_FILE,
        "metric": chosen,
        "higher_is_better": higher,
        "best": [{"key": key, "value": values[key]} for key in best],
        "worst": [{"key": key, "value": values[key]} for key in worst],
    }


__all__ = ["CONTACT_SHEET_FILE", "choose_metric", "pick_cases", "write_contact_sheet", "write_sample_sheet"]
