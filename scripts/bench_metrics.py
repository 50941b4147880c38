"""Per-sample cost of the weight-free metrics at 512x512, ours vs the reference way, interleaved.

- region SSIM: ours (bounding box + window radius, scipy) vs scikit-image's full-image SSIM map
  averaged over the region (same value);
- region PSNR: ours vs scikit-image on the region's pixels;
- background colour / expansion: absolute cost only (no reference implementation).

Usage: python scripts/bench_metrics.py [--size 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from dreampainter.utils.logging import silence_known_noise


def scene(size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    photo = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    product = ((yy - size / 2) / (size / 5)) ** 2 + ((xx - size / 2) / (size / 6)) ** 2 <= 1
    raw = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    raw[product] = np.clip(photo[product].astype(int) + rng.integers(-9, 10, (product.sum(), 3)), 0, 255)
    return photo, product, raw


def timed(fn, repeats: int) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeats):
        value = fn()
    return (time.perf_counter() - start) / repeats, value


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from dreampainter.evaluation.batch import EvalBatch
    from dreampainter.evaluation.colour import BackgroundColourMetric
    from dreampainter.evaluation.expansion import ExpansionMetric, KnownSceneSegmenter
    from dreampainter.evaluation.product import keep_region, psnr_in_region, ssim_in_region

    photo, product, raw = scene(args.size)

    def skimage_ssim():
        kept = keep_region(raw, photo, product)
        _, full = structural_similarity(
            photo,
            kept,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            full=True,
        )
        return full.mean(axis=-1)[product].mean()

    rows = []
    ours_total, theirs_total = 0.0, 0.0
    for _ in range(2):  # interleaved rounds
        t_ours, v_ours = timed(lambda: ssim_in_region(raw, photo, product), args.repeats)
        t_ref, v_ref = timed(skimage_ssim, args.repeats)
        ours_total += t_ours
        theirs_total += t_ref
    rows.append(("region SSIM", ours_total / 2, theirs_total / 2, abs(v_ours - v_ref)))
    t_ours, v_ours = timed(lambda: psnr_in_region(raw, photo, product), args.repeats)
    t_ref, v_ref = timed(
        lambda: peak_signal_noise_ratio(photo[product], raw[product], data_range=255), args.repeats
    )
    rows.append(("region PSNR", t_ours, t_ref, abs(v_ours - v_ref)))
    print(f"{args.size}x{args.size}, product {product.mean():.1%} of the image")
    print(f"{'metric':<14}{'ours ms':>10}{'reference ms':>14}{'ratio':>8}{'|diff|':>10}")
    for name, ours, ref, diff in rows:
        print(f"{name:<14}{ours * 1e3:>10.1f}{ref * 1e3:>14.1f}{ref / ours:>8.2f}{diff:>10.1e}")

    mask = product.astype(np.uint8) * 255
    composited = np.where(product[..., None], photo, raw)
    batch = EvalBatch.from_lists(["k"], [raw], [composited], [photo], [mask], [photo])
    for name, metric in (
        ("colour", BackgroundColourMetric()),
        ("expansion", ExpansionMetric(KnownSceneSegmenter())),
    ):
        seconds, _ = timed(lambda metric=metric: metric.update(batch), args.repeats)
        print(f"{name:<14}{seconds * 1e3:>10.1f} ms per sample")


if __name__ == "__main__":
    main()
