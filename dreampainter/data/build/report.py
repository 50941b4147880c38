"""``build_report.json``, the printed table and the contact sheets of kept and dropped samples."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dreampainter.data.build.config import OutputConfig
from dreampainter.data.build.filters import REASONS
from dreampainter.data.build.inputs import BuildInput, read_files
from dreampainter.data.decode import load_image, load_mask
from dreampainter.data.shards.format import EncodedSample
from dreampainter.data.shards.tar import iter_tar_samples
from dreampainter.errors import DreamPainterError
from dreampainter.utils.grid import image_grid
from dreampainter.utils.io import atomic_path, atomic_write_json

KEPT_SHEET = "contact_kept.png"
DROPPED_SHEET = "contact_dropped.png"


@dataclass
class BuildReport:
    """What a build did: inputs, kept, drops per reason, seconds per stage (summed over ranks)."""

    source: str
    num_inputs: int
    num_kept: int
    dropped: dict[str, int]
    seconds: dict[str, float]
    num_processes: int
    num_shards: int
    duplicates: dict[str, str] = field(default_factory=dict)  # key -> the earlier input it repeats
    dropped_keys: list[list[str]] = field(default_factory=list)  # [key, reason] in input order

    @property
    def samples_per_second(self) -> float:
        """Inputs per second of processing time (one process; multiply by processes for wall rate)."""
        total = sum(self.seconds.values())
        return self.num_inputs / total if total > 0 else 0.0

    @classmethod
    def from_records(
        cls,
        source: str,
        scans: list[dict[str, Any]],
        chunks: list[dict[str, Any]],
        duplicates: dict[str, str],
        num_processes: int,
    ) -> BuildReport:
        seconds = {"scan": sum(scan["seconds"] for scan in scans)}
        for chunk in chunks:
            for stage, value in chunk["seconds"].items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        dropped_keys = [entry for chunk in chunks for entry in chunk["dropped"]]
        counts = {reason: 0 for reason in REASONS}
        for _, reason in dropped_keys:
            counts[reason] = counts.get(reason, 0) + 1
        return cls(
            source=source,
            num_inputs=sum(chunk["num_inputs"] for chunk in chunks),
            num_kept=sum(len(chunk["kept"]) for chunk in chunks),
            dropped=counts,
            seconds=seconds,
            num_processes=num_processes,
            num_shards=sum(len(chunk["shards"]) for chunk in chunks),
            duplicates=duplicates,
            dropped_keys=dropped_keys,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples_per_second"] = round(self.samples_per_second, 3)
        return data

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    def table(self) -> str:
        """The printed summary: counts, drops per reason, time per stage, samples/s."""
        lines = [f"{'inputs':<24}{self.num_inputs:>10}", f"{'kept':<24}{self.num_kept:>10}"]
        lines += [f"{'dropped: ' + reason:<24}{count:>10}" for reason, count in self.dropped.items() if count]
        total = sum(self.seconds.values()) or 1.0
        lines += [
            f"{'time: ' + stage:<24}{value:>9.1f}s {100 * value / total:5.1f}%"
            for stage, value in self.seconds.items()
        ]
        lines.append(f"{'samples/s (per process)':<24}{self.samples_per_second:>10.2f}")
        lines.append(f"{'shards':<24}{self.num_shards:>10}   processes: {self.num_processes}")
        return "\n".join(lines)


def _kept_rows(out_dir: Path, chunks: list[dict[str, Any]], wanted: set[str]) -> list[tuple[list, str]]:
    rows = []
    for chunk in chunks:
        for shard in chunk["shards"]:
            if not wanted & set(chunk["kept"]):
                continue
            for key, members in iter_tar_samples(str(out_dir / shard["name"])):
                if key in wanted:
                    sample = EncodedSample.from_members(key, members)
                    tiles = [("photo", load_image(sample.photo)), ("mask", Image.fromarray(load_mask(sample.mask))),
                             ("reference", load_image(sample.reference))]  # fmt: skip
                    rows.append((tiles, f"{key}: {sample.meta.get('prompt', '')}"[:90]))
    return rows


def _photo_or_none(files: dict[str, bytes | None]) -> Image.Image | None:
    try:
        return load_image(files["photo"]) if files.get("photo") else None
    except DreamPainterError:
        return None


def write_contact_sheets(
    out_dir: Path, items: list[BuildInput], chunks: list[dict[str, Any]], output: OutputConfig, progress: bool = False
) -> list[Path]:
    """``contact_kept.png`` (photo | mask | reference, prompt) and ``contact_dropped.png`` (per reason)."""
    rng = np.random.default_rng(output.seed)
    written = []
    kept = [key for chunk in chunks for key in chunk["kept"]]
    if kept and output.contact_sheet_samples:
        chosen = set(rng.choice(kept, size=min(len(kept), output.contact_sheet_samples), replace=False).tolist())
        rows = _kept_rows(out_dir, chunks, chosen)
        with atomic_path(out_dir / KEPT_SHEET, suffix=".png") as temporary:
            image_grid([tiles for tiles, _ in rows], captions=[caption for _, caption in rows]).save(temporary, "PNG")
        written.append(out_dir / KEPT_SHEET)
    by_reason: dict[str, list[str]] = {}
    for chunk in chunks:
        for key, reason in chunk["dropped"]:
            if len(by_reason.setdefault(reason, [])) < output.contact_sheet_drops_per_reason:
                by_reason[reason].append(key)
    if by_reason:
        order = {reason: index for index, reason in enumerate(REASONS)}
        by_reason = dict(sorted(by_reason.items(), key=lambda entry: order.get(entry[0], len(order))))
        lookup = {item.key: item for item in items}
        files = read_files([lookup[key] for keys in by_reason.values() for key in keys])
        rows = [[(key, _photo_or_none(files.get(key, {}))) for key in keys] for keys in by_reason.values()]
        with atomic_path(out_dir / DROPPED_SHEET, suffix=".png") as temporary:
            image_grid(rows, captions=list(by_reason)).save(temporary, "PNG")
        written.append(out_dir / DROPPED_SHEET)
    return written
