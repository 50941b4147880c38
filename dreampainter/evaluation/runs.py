"""The runs of a benchmark: the main run and its controls, and where each run's images are saved."""

from __future__ import annotations

from pathlib import Path

MAIN_RUN = "main"
RUN_DESCRIPTIONS = {
    MAIN_RUN: "the sample's own reference",
    "no_reference": "no reference (text only), same seeds",
    "shuffled_reference": "another sample's reference (fixed derangement), same seeds",
}


def image_path(out: Path, run: str, key: str) -> Path:
    """Where a run's composited result for ``key`` is saved (keys may contain ``/``)."""
    return out / "images" / run / f"{key}.png"
