"""Benchmark: DreamEcom loader vs a plain per-sample PIL + torchvision-transforms loader.

Both read the same synthetic 512 px shards (JPEG photo + PNG mask + JPEG reference + JSON) in one
process (``num_workers=0``, one torch thread: the cost per loader worker) and do the same
per-sample work: decode the three images, resize + random crop + flip photo and mask together,
binarise the mask, build the masked image, resize + crop + normalise the reference for CLIP, parse
the JSON, collate. Repeats are interleaved and medians reported, since the machine may be shared;
rates are given per CPU-second of this process (robust to other load) and per wall-second. A
decode-only row (tar read + PIL decode of the three images, nothing else) calibrates the machine.

    .venv/bin/python scripts/bench_data.py [--samples 192] [--repeats 5] [--size 512]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from dreampainter.data.loading.augment import CLIP_MEAN, CLIP_STD
from dreampainter.data.loading.loader import build_dataloader
from dreampainter.utils.logging import silence_known_noise


def _scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A photo-like scene (wall, floor, a shaded product, grain), its product mask and the background."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.4, 0.7)
    wall, floor = rng.uniform(60, 220, 3), rng.uniform(40, 200, 3)
    background = np.where(
        (y < horizon)[..., None], wall * (0.8 + 0.2 * x[..., None]), floor * (1.1 - 0.3 * y[..., None])
    )
    background += 12 * np.sin(40 * x + 25 * y)[..., None] * rng.uniform(0.2, 1.0)
    cx, cy, rx, ry = (
        rng.uniform(0.35, 0.65),
        rng.uniform(0.45, 0.6),
        rng.uniform(0.1, 0.25),
        rng.uniform(0.15, 0.3),
    )
    inside = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 < 1
    shade = 0.6 + 0.4 * np.clip(1 - ((x - cx + rx / 3) / rx) ** 2, 0, 1)
    photo = np.where(inside[..., None], rng.uniform(30, 250, 3) * shade[..., None], background)
    grain = rng.normal(0, 6, photo.shape)
    as_u8 = lambda array: np.clip(array + grain, 0, 255).astype(np.uint8)  # noqa: E731
    return as_u8(photo), (inside * 255).astype(np.uint8), as_u8(background)


def write_bench_shards(folder: Path, samples: int, size: int, per_shard: int = 64) -> list[str]:
    """Synthetic DreamEcom shards at ``size`` px; returns the shard paths."""
    rng = np.random.default_rng(0)
    paths = []
    for shard in range((samples + per_shard - 1) // per_shard):
        path = folder / f"bench-{shard:04d}.tar"
        with tarfile.open(path, "w") as archive:
            for i in range(shard * per_shard, min(samples, (shard + 1) * per_shard)):
                photo, mask, reference = _scene(rng, size)
                members = {}
                for suffix, array, fmt in (
                    ("jpg", photo, "JPEG"),
                    ("mask.png", mask, "PNG"),
                    ("ref.jpg", reference, "JPEG"),
                ):
                    buffer = io.BytesIO()
                    Image.fromarray(array).save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
                    members[suffix] = buffer.getvalue()
                members["json"] = json.dumps(
                    {"prompt": f"a product on a table, sample {i}", "category": "jar"}
                ).encode()
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"sample{i:06d}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


class PlainTransform:
    """The common training-script way: PIL decode, torchvision transforms, mask via PIL."""

    def __init__(self, size: int, reference_size: int) -> None:
        self.size = size
        self.resize = T.Resize(size, interpolation=T.InterpolationMode.BILINEAR)
        self.resize_mask = T.Resize(size, interpolation=T.InterpolationMode.NEAREST)
        self.to_pixels = T.Compose([T.ToTensor(), T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])])
        self.reference = T.Compose(
            [
                T.Resize(reference_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(reference_size),
                T.ToTensor(),
                T.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def __call__(self, sample: dict) -> dict:
        photo = self.resize(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        mask = self.resize_mask(Image.open(io.BytesIO(sample["mask.png"])).convert("L"))
        top, left, height, width = T.RandomCrop.get_params(photo, (self.size, self.size))
        photo, mask = TF.crop(photo, top, left, height, width), TF.crop(mask, top, left, height, width)
        if torch.rand(1) < 0.5:
            photo, mask = TF.hflip(photo), TF.hflip(mask)
        pixel_values = self.to_pixels(photo)
        product = (TF.to_tensor(mask) > 0.5).float()
        inpaint = 1 - product
        reference = self.reference(Image.open(io.BytesIO(sample["ref.jpg"])).convert("RGB"))
        meta = json.loads(sample["json"])
        return {
            "pixel_values": pixel_values,
            "mask": inpaint,
            "masked_pixel_values": pixel_values * (1 - inpaint),
            "product_mask": product,
            "reference_pixel_values": reference,
            "prompt": meta["prompt"],
            "drop_text": bool(torch.rand(1) < 0.05),
            "key": sample["__key__"],
        }


def run_ours(folder: Path, size: int, batch_size: int) -> int:
    config = {"resolution": size, "reference_mode": "crop", "epoch_mode": "exact", "drop_last": False}
    loader = build_dataloader(folder, config, batch_size=batch_size, num_workers=0)
    return sum(len(batch["key"]) for batch in loader)


def run_plain(paths: list[str], size: int, batch_size: int) -> int:
    dataset = wds.WebDataset(paths, shardshuffle=False, empty_check=False).shuffle(1000)
    loader = DataLoader(dataset.map(PlainTransform(size, 224)), batch_size=batch_size, num_workers=0)
    return sum(len(batch["key"]) for batch in loader)


def run_decode_only(paths: list[str]) -> int:
    """Calibration: only read the tar and decode the three images with PIL (no transforms, no tensors)."""
    count = 0
    for sample in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        for suffix, mode in (("jpg", "RGB"), ("mask.png", "L"), ("ref.jpg", "RGB")):
            Image.open(io.BytesIO(sample[suffix])).convert(mode)
        count += 1
    return count


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)  # what one DataLoader worker gets
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        paths = write_bench_shards(folder, args.samples, args.size)
        mb = sum(Path(p).stat().st_size for p in paths) / 2**20
        print(
            f"wrote {args.samples} samples at {args.size} px ({mb:.1f} MiB) in {time.perf_counter() - start:.1f} s"
        )
        runs = {
            "ours": lambda: run_ours(folder, args.size, args.batch_size),
            "plain": lambda: run_plain(paths, args.size, args.batch_size),
            "decode-only": lambda: run_decode_only(paths),
        }
        for run in runs.values():  # warm-up
            run()
        cpu: dict[str, list[float]] = {name: [] for name in runs}
        wall: dict[str, list[float]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name, run in runs.items():
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                count = run()
                cpu[name].append(count / (time.process_time() - cpu_start))
                wall[name].append(count / (time.perf_counter() - wall_start))
            print(
                f"repeat {repeat}: samples per CPU-second "
                + "  ".join(f"{name} {cpu[name][-1]:.0f}" for name in runs)
                + " | per wall-second "
                + "  ".join(f"{name} {wall[name][-1]:.0f}" for name in runs)
            )
    print(
        f"\nmedians over {args.repeats} interleaved repeats, {args.size} px, one process, one torch thread:"
    )
    print("  loader            samples/CPU-s   samples/wall-s")
    for name in runs:
        print(f"  {name:<16}  {statistics.median(cpu[name]):>13.0f}   {statistics.median(wall[name]):>14.0f}")
    for label, rates in (("CPU time", cpu), ("wall time", wall)):
        ratios = [o / p for o, p in zip(rates["ours"], rates["plain"])]
        print(
            f"speed-up ours / plain ({label}): median of per-repeat ratios {statistics.median(ratios):.2f}x"
        )


if __name__ == "__main__":
    main()
