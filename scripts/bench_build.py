"""Benchmark: ``data build`` on the offline studio path (studio masks + fill references + given prompts).

Writes ``--samples`` studio packshots at ``--size`` px (a toy product on a plain backdrop with a slight
gradient and sensor noise, JPEG q95) with ``prompts.jsonl``, then runs the whole build (scan with
pHash and blur, masks, cleanup, references, prompts, encode, shards, report, contact sheets) in this
process on one CPU thread, and prints samples per CPU-second and per wall-second and the share of
time per stage (from ``build_report.json``).

    .venv/bin/python scripts/bench_build.py [--samples 24] [--size 1024] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from dreampainter.data.build.config import BuildConfig  # noqa: E402
from dreampainter.data.build.pipeline import build_dataset  # noqa: E402
from dreampainter.toy.product import FAMILY_ASPECT, build_product, render_product  # noqa: E402
from dreampainter.toy.scene import pixel_grid  # noqa: E402
from dreampainter.utils.config import load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKDROPS = ([245, 245, 245], [228, 231, 236], [250, 240, 225], [40, 40, 45])


def studio_photo(seed: int, size: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    family = list(FAMILY_ASPECT)[seed % len(FAMILY_ASPECT)]
    height = rng.uniform(0.4, 0.7) * size
    width = min(rng.uniform(*FAMILY_ASPECT[family]) * height, 0.8 * size)
    backdrop = np.array(BACKDROPS[int(rng.integers(len(BACKDROPS)))], float)
    colour = rng.uniform(20, 235, 3)
    while np.abs(colour - backdrop).max() < 60:
        colour = rng.uniform(20, 235, 3)
    parts = build_product(family, rng, size / 2, 0.85 * size, width, height, colour, np.array([0.3, 0.6, 0.74]))
    x, y = pixel_grid(size)
    paint, coverage = render_product(parts, x, y)
    plain = backdrop * (1 - 0.06 * y / size)[..., None] + rng.normal(0, 1.5, (size, size, 3))
    return np.clip(np.round(plain * (1 - coverage[..., None]) + paint), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=24)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="build config overrides")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        (root / "photos").mkdir(parents=True)
        records = []
        for seed in range(args.samples):
            Image.fromarray(studio_photo(seed, args.size)).save(root / "photos" / f"p{seed:04d}.jpg", quality=95)
            records.append(json.dumps({"key": f"p{seed:04d}", "prompt": f"product {seed} on a marble counter"}))
        (root / "prompts.jsonl").write_text("\n".join(records) + "\n")
        config = load_config(BuildConfig, REPO / "configs" / "build_studio.yaml", args.overrides)
        cpu, wall = time.process_time(), time.perf_counter()
        report = build_dataset(root, config, Path(tmp) / "out", progress=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert report is not None
    print(report.table())
    total = sum(report.seconds.values())
    print(f"\n{args.samples} photos at {args.size} px, kept {report.num_kept}")
    print(f"samples / CPU-s: {args.samples / cpu:.2f}   samples / wall-s: {args.samples / wall:.2f}")
    print("share of time per stage: " + ", ".join(
        f"{stage} {100 * value / total:.0f}%" for stage, value in report.seconds.items() if value / total >= 0.005
    ))  # fmt: skip


if __name__ == "__main__":
    main()
