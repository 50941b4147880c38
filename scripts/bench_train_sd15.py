"""SD1.5-size stage-2 training step on a GPU: latent-cached vs uncached, samples/s and peak memory.

Random weights with the real shapes, built in code (nothing is downloaded): the 9-channel SD1.5
inpainting UNet, SD's VAE, a CLIP-L text encoder and a ViT-H-14 vision tower (as our ReferenceEncoder).
The stage-2 setting is the trainer's: UNet frozen and cast to ``--dtype`` (``cast_frozen_unet``),
reference adapter installed with float32 parameters, AdamW on the adapter, autocast, gradient clipping.

Two variants run the trainer's own step (``prepare_inputs`` + ``diffusion_loss``) on the same batch,
interleaved over ``--repeats``:

* ``cached``: the UNet training pass on precomputed latent distributions, text states and reference
  features (what ``data.cache`` runs; the cached batch is the one ``cache-latents`` would store);
* ``uncached``: VAE encode of the photo and the masked photo, text encoder, vision tower, then the UNet,
  every step (the structure of IP-Adapter's ``tutorial_train.py``, and our trainer without a cache).

Data loading is not timed (the batch is already in host memory); host-to-device copies are. Each step
ends with a host read of the loss (the trainer's finite check), so steps are timed CUDA-synchronised.
Peak memory is ``torch.cuda.max_memory_allocated`` per run (reset before each); both variants keep all
components on the GPU, as the trainer does, so "resident" (allocated when the run starts) is the same.

    python scripts/bench_train_sd15.py                       # GPU; JSON to $OUT/ or ./bench_train_sd15.json
    python scripts/bench_train_sd15.py --projection resampler --gradient-checkpointing
    python scripts/bench_train_sd15.py --device cpu --small --steps 1 --warmup 0 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:  # bench_common, when this file is loaded from elsewhere (tests)
    sys.path.insert(0, SCRIPTS)
from bench_common import (  # noqa: E402 - the shared pieces (shapes, set-up, step, timing)
    DTYPES,
    VARIANTS,
    Shapes,
    Step,
    adapter_config_for,
    build_components,
    build_models,
    environment,
    make_batch,
    make_cached_batch,
    parameter_counts,
    resolve_device,
    run_variants,
    sd15_shapes,
    small_shapes,
    summarise,
    time_variant,
    torch_dtype,
    write_json,
)

from dreampainter.utils.logging import silence_known_noise  # noqa: E402

__all__ = [
    "Shapes", "Step", "adapter_config_for", "build_components", "build_models", "make_batch", "make_cached_batch",
    "parameter_counts", "sd15_shapes", "small_shapes", "summarise", "time_variant",
]


# ----------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    env, cfg = results["environment"], results["config"]
    gib = lambda value: "n/a" if value is None else f"{value:.1f}"  # noqa: E731
    lines = [
        f"{env['device_name']}, torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}; "
        f"{'small shapes' if cfg['small'] else 'SD1.5 inpainting UNet + SD VAE + CLIP-L + ViT-H-14'}, "
        f"{cfg['dtype']}, batch {cfg['batch_size']} at {cfg['resolution']} px, adapter {cfg['projection']}, "
        f"gradient checkpointing {'on' if cfg['gradient_checkpointing'] else 'off'}; "
        f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps x {results['repeats_done']} repeats, interleaved.",
        "",
        "| variant | samples/s (median, min-max) | s/step | peak allocated GiB | resident GiB |",
        "|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        entry = results["variants"][variant]
        if "samples_per_s" not in entry:
            error = next((f"failed: {r['error']}" for r in entry["runs"] if "error" in r), "not run (time budget)")
            lines.append(f"| {variant} | {error} | | | |")
            continue
        lines.append(
            f"| {variant} | {entry['samples_per_s']:.2f} ({entry['samples_per_s_min']:.2f}-{entry['samples_per_s_max']:.2f})"
            f" | {entry['step_s_median']:.3f} | {gib(entry['peak_allocated_gib'])} | {gib(entry['resident_gib'])} |"
        )
    ratio = results.get("cached_over_uncached")
    lines.append("")
    lines.append(f"cached / uncached samples/s: {ratio:.2f}x" if ratio else "cached / uncached: n/a")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    out_dir = os.environ.get("OUT")
    default_out = Path(out_dir) / "bench_train_sd15.json" if out_dir else Path("bench_train_sd15.json")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --small for a smoke test)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="frozen weights and autocast (default bf16)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None, help="pixels, a multiple of 64 (default 512; 64 with --small)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per variant, interleaved")
    parser.add_argument("--projection", choices=("linear", "resampler"), default="linear",
                        help="linear (IP-Adapter, 4 tokens) or resampler (IP-Adapter Plus, 16 tokens)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--small", action="store_true", help="shrink every component (same code path) for CPU tests")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds: start no new run past this (partial results are still written)")
    parser.add_argument("--out", type=Path, default=default_out, help=f"JSON result (default {default_out})")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 64):
        parser.error(f"--resolution must be a positive multiple of 64 (VAE x8, UNet x8), got {args.resolution}")
    return args


def main(argv=None) -> int:
    silence_known_noise()
    args = parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device, "--device cpu --small")
    weight_dtype = torch_dtype(args.dtype)
    shapes = small_shapes() if args.small else sd15_shapes()
    resolution = args.resolution or shapes.default_resolution

    results: dict = {
        "benchmark": "bench_train_sd15",
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "resolution": resolution},
        "environment": environment(device),
        "variants": {v: {"runs": []} for v in VARIANTS},
        "repeats_done": 0,
        "complete": False,
    }
    print(f"{results['environment']['device_name']}: building {'small' if args.small else 'SD1.5-size'} "
          f"components ({args.dtype}, adapter {args.projection})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer's files
        return _run(args, results, device, weight_dtype, shapes, resolution, started, Path(tmp))


def _run(args, results: dict, device, weight_dtype, shapes: Shapes, resolution: int, started: float, tmp: Path) -> int:
    import torch

    parts, trainable, counts = build_components(shapes, args.projection, device, weight_dtype, tmp)
    if args.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
    results["parameters"] = counts
    print("parameters (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in counts.items()), flush=True)
    step = Step(parts, trainable, device, weight_dtype)
    batch = make_batch(args.batch_size, resolution, shapes.reference_size)
    batches = {"uncached": batch, "cached": make_cached_batch(batch, parts, device, step.empty_embeds)}
    results["setup_seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        results["weights_resident_gib"] = torch.cuda.memory_allocated(device) / 2**30
    print(f"set-up {results['setup_seconds']:.1f} s", flush=True)

    def checkpoint() -> None:
        results["total_seconds"] = time.perf_counter() - started
        write_json(results, args.out)

    failed = run_variants(
        results, step, batches, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
        repeats=args.repeats, device=device, after_run=checkpoint,
        out_of_time=lambda: time.perf_counter() - started > args.time_budget,
    )
    results["complete"] = results["repeats_done"] == args.repeats and not failed
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["total_seconds"] = time.perf_counter() - started
    summarise(results)
    results["markdown"] = markdown(results)
    write_json(results, args.out)
    print("\n" + results["markdown"])
    print(f"\nwrote {args.out} (total {results['total_seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
