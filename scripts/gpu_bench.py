"""One-command GPU benchmark of both backbones: stage-2 training samples/s and inference seconds per image.

For each backbone (``--backbones sd15 sdxl``) the script builds random-weight components with the real
shapes in code (nothing is downloaded; see ``bench_common.py``): SD1.5 = 9-channel SD1.5 inpainting UNet,
SD VAE, CLIP-L, ViT-H-14 and the IP-Adapter Plus resampler (16 tokens); SDXL = the 2.57B SDXL inpainting
UNet, SDXL VAE, CLIP-L + OpenCLIP bigG, ViT-H-14 and ip-adapter-plus_sdxl's resampler. Then:

* ``train``: the trainer's stage-2 step (``prepare_inputs`` + ``diffusion_loss``; UNet frozen in bf16, adapter
  float32, AdamW, autocast, gradient clipping), ``cached`` (the UNet pass on what ``cache-latents`` stores)
  and ``uncached`` (VAE x2, text encoder(s), vision tower, UNet), interleaved: samples/s and peak
  ``torch.cuda.max_memory_allocated`` per variant, batch 8 at 512 px (SD1.5) / batch 4 at 1024 px (SDXL);
* ``infer``: seconds per image at 512 px (SD1.5) / 1024 px (SDXL), 30 DDIM steps, fp16, one image per call,
  CUDA-synchronised, interleaved in rotating order after a warm-up:
  ``ours_two_branch`` (``DreamPainterPipeline``, s_text == s_ref: two UNet branches),
  ``ours_dual`` (s_text = 7.5, s_ref = 5: three branches) and ``diffusers_ip_adapter`` (diffusers'
  ``StableDiffusion(XL)InpaintPipeline`` + ``load_ip_adapter`` of our adapter written by
  ``export_ip_adapter``, CFG 7.5: two branches). Both pipelines share the same weights (the diffusers UNet's
  parameters are ours' base parameters) and the same vision tower, and both encode the reference image.
  The UNet calls and rows per call are counted, so each run's branch count is checked.

Sections (build / train / infer per backbone) run under a time limit and inside try/except: a failure (out of
memory, a time limit) is recorded in the JSON and the rest still runs. The JSON is rewritten after every
section, so a killed run leaves its partial results. ``--tiny`` runs the same code with small shapes, one
step and tiny images (the CPU test, ``tests/test_gpu_bench.py``).

    python scripts/gpu_bench.py                               # GPU; JSON to $OUT/gpu_bench.json or ./gpu_bench.json
    python scripts/gpu_bench.py --backbones sdxl --infer-repeats 3
    python scripts/gpu_bench.py --tiny --device cpu           # smoke test (tiny shapes, CPU)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:  # bench_common, when this file is loaded from elsewhere (tests)
    sys.path.insert(0, SCRIPTS)
from bench_common import (  # noqa: E402 - the shared pieces (shapes, set-up, step, timing)
    DTYPES,
    SHAPES,
    SMALL_SHAPES,
    Shapes,
    Step,
    build_components,
    environment,
    error_text,
    make_batch,
    make_cached_batch,
    resolve_device,
    run_variants,
    sync,
    torch_dtype,
    write_json,
)

from dreampainter.utils.logging import silence_known_noise  # noqa: E402

BACKBONES = ("sd15", "sdxl")
INFER_RUNS = ("ours_two_branch", "ours_dual", "diffusers_ip_adapter")
EXPECTED_ROWS = {"ours_two_branch": 2, "ours_dual": 3, "diffusers_ip_adapter": 2}
TRAIN_BATCH = {"sd15": 8, "sdxl": 4}
TEXT_SCALE, DUAL_REFERENCE_SCALE = 7.5, 5.0
PROMPT = "a glass perfume bottle on a marble table, soft morning light"


class SectionTimeout(BaseException):
    """A section ran past its time limit (a BaseException, so the per-run ``except Exception`` lets it through)."""


@contextmanager
def time_limit(seconds: float):
    """Raise :class:`SectionTimeout` after ``seconds`` (SIGALRM; on the main thread of a POSIX system only)."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"section time limit of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Clock:
    """The whole run's time budget and each section's limit."""

    def __init__(self, budget: float, section_limit: float, min_section: float = 5.0):
        self.started = time.perf_counter()
        self.budget, self.section_limit, self.min_section = budget, section_limit, min_section

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget - self.elapsed()

    def out_of_time(self) -> bool:
        return self.left() <= 0

    def limit(self) -> float | None:
        """Seconds for the next section, or None when the budget does not allow one."""
        left = self.left()
        return None if left < self.min_section else min(self.section_limit, left)


# ----------------------------------------------------------------------------- inference


def inference_scheduler():
    """DDIM with SD's training betas (the same scheduler config for both pipelines, one instance each)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def inference_inputs(size: int):
    """A product photo (a box in the middle), its product mask (255 = product) and a reference image."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = np.full((size, size, 3), 235, np.uint8)
    mask = np.zeros((size, size), np.uint8)
    top, bottom, left, right = size // 4, 3 * size // 4, 3 * size // 8, 5 * size // 8
    photo[top:bottom, left:right] = rng.integers(0, 256, (bottom - top, right - left, 3), dtype=np.uint8)
    mask[top:bottom, left:right] = 255
    reference = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    return Image.fromarray(photo), mask, reference


def diffusers_unet_sharing(unet, config: dict):
    """A plain diffusers UNet whose parameters *are* ``unet``'s base parameters (no copy, no init): built on
    the meta device, then the base tensors are assigned."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        theirs = UNet2DConditionModel(**config)
    keys = set(theirs.state_dict())
    theirs.load_state_dict({k: v for k, v in unet.state_dict().items() if k in keys}, strict=True, assign=True)
    left = [name for name, tensor in [*theirs.named_parameters(), *theirs.named_buffers()] if tensor.is_meta]
    if left:
        raise RuntimeError(f"diffusers UNet: tensors not assigned: {left[:5]}")
    return theirs.requires_grad_(False).eval()


def build_pipelines(shapes: Shapes, parts, dtype, device, folder: Path):
    """(ours, theirs): DreamPainterPipeline and diffusers' inpainting pipeline + load_ip_adapter, in ``dtype``."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline
    from transformers import CLIPImageProcessor

    from dreampainter.models import export_ip_adapter
    from dreampainter.pipelines import DreamPainterPipeline

    unet = parts.unet
    unet.requires_grad_(False).eval()
    unet.to(device=device, dtype=dtype)  # the frozen bf16 UNet and the float32 adapter, both to fp16
    for module in parts.frozen_encoders():
        module.to(device=device, dtype=dtype)
    path = export_ip_adapter(unet, folder / "ip_adapter.safetensors")
    encoder = parts.reference_encoder
    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    xl = dict(text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2) if shapes.text_2 else {}
    ours = DreamPainterPipeline(**common, **xl, unet=unet, scheduler=inference_scheduler(), reference_encoder=encoder)
    size = shapes.reference_size
    image_side = dict(
        image_encoder=encoder.model,  # the same vision tower: both pipelines encode the reference image
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
    )
    theirs_unet = diffusers_unet_sharing(unet, shapes.unet)
    if shapes.text_2:
        theirs = StableDiffusionXLInpaintPipeline(
            **common, **xl, unet=theirs_unet, scheduler=inference_scheduler(), **image_side,
            requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
        )
    else:
        theirs = StableDiffusionInpaintPipeline(
            **common, unet=theirs_unet, scheduler=inference_scheduler(), **image_side, safety_checker=None,
            requires_safety_checker=False,
        )
    theirs.load_ip_adapter(str(folder), subfolder="", weight_name=path.name, image_encoder_folder=None)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def inference_runs(ours, theirs, size: int, steps: int, device) -> dict:
    """Name -> a function that generates one image (a fresh generator per call: every run does the same work)."""
    import torch
    from PIL import Image

    photo, product_mask, reference = inference_inputs(size)
    inpaint_mask = Image.fromarray(255 - product_mask)  # diffusers: white = repaint

    def generator():
        return torch.Generator(device=device).manual_seed(0)

    def ours_run(reference_scale: float):
        return lambda: ours(
            PROMPT, photo, product_mask, reference_image=reference, text_guidance_scale=TEXT_SCALE,
            reference_guidance_scale=reference_scale, num_inference_steps=steps, height=size, width=size,
            generator=generator(),
        )

    def diffusers_run():
        theirs(
            PROMPT, image=photo, mask_image=inpaint_mask, ip_adapter_image=reference, height=size, width=size,
            guidance_scale=TEXT_SCALE, strength=1.0, num_inference_steps=steps, generator=generator(),
        )  # strength 1.0: every step runs (the SDXL pipeline's default 0.9999 would drop one)

    return {"ours_two_branch": ours_run(TEXT_SCALE), "ours_dual": ours_run(DUAL_REFERENCE_SCALE),
            "diffusers_ip_adapter": diffusers_run}


def count_unet_rows(unet, seen: list):
    """A hook that records the batch rows of every UNet call."""

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        seen.append(int(sample.shape[0]))

    return unet.register_forward_pre_hook(hook, with_kwargs=True)


def time_inference(runs: dict, unets: dict, *, warmup: int, repeats: int, device, clock: Clock, record: dict,
                   after_run) -> None:
    """``warmup`` untimed calls of each, then ``repeats`` rounds in rotating order; per call: seconds, peak
    memory, UNet calls and rows per call."""
    import torch

    cuda = device.type == "cuda"
    entries = record.setdefault("runs", {name: {"seconds": [], "peak_allocated_gib_runs": []} for name in runs})
    names = list(runs)

    def call(name: str, timed: bool) -> None:
        seen: list[int] = []
        handle = count_unet_rows(unets[name], seen)
        try:
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            begin = time.perf_counter()
            runs[name]()
            sync(device)
            seconds = time.perf_counter() - begin
        finally:
            handle.remove()
        entry = entries[name]
        entry["unet_calls"], entry["unet_rows_per_call"] = len(seen), sorted(set(seen))
        if timed:
            entry["seconds"].append(seconds)
            if cuda:
                entry["peak_allocated_gib_runs"].append(torch.cuda.max_memory_allocated(device) / 2**30)
            print(f"  {name:22s} {seconds:8.3f} s/image  ({len(seen)} UNet calls x {sorted(set(seen))} rows)",
                  flush=True)
        else:
            print(f"  {name:22s} warm-up {seconds:.3f} s", flush=True)

    for name in names:
        for _ in range(warmup):
            if clock.out_of_time():
                return
            call(name, timed=False)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            if clock.out_of_time():
                print("time budget reached: stopping inference", flush=True)
                return
            call(name, timed=True)
        record["repeats_done"] = repeat + 1
        summarise_inference(record)
        after_run()


def summarise_inference(record: dict) -> None:
    runs = record.get("runs", {})
    for entry in runs.values():
        if entry["seconds"]:
            entry["s_per_image"] = statistics.median(entry["seconds"])
            peaks = entry["peak_allocated_gib_runs"]
            entry["peak_allocated_gib"] = max(peaks) if peaks else None
    ratios = {}
    base = runs.get("diffusers_ip_adapter", {}).get("seconds", [])
    for name in ("ours_two_branch", "ours_dual"):
        ours = runs.get(name, {}).get("seconds", [])
        pairs = list(zip(ours, base))
        if pairs:  # per round (the two ran next to each other), then the median
            ratios[f"{name}/diffusers_ip_adapter"] = statistics.median(a / b for a, b in pairs)
    record["ratios"] = ratios


# ----------------------------------------------------------------------------- one backbone


def bench_backbone(name: str, args, device, clock: Clock, record: dict, save) -> None:
    """Build, train, infer for one backbone; every section's outcome (figures or error) goes into ``record``."""
    import torch

    shapes = (SMALL_SHAPES if args.tiny else SHAPES)[name]()
    train_dtype, infer_dtype = torch_dtype(args.train_dtype), torch_dtype(args.infer_dtype)
    train_resolution = args.train_resolution or shapes.default_resolution
    infer_resolution = args.infer_resolution or shapes.default_resolution
    batch_size = args.train_batch_size or (2 if args.tiny else TRAIN_BATCH[name])
    record.update(shapes=shapes.description, sections={})
    record["train"] = {"batch_size": batch_size, "resolution": train_resolution, "unet_dtype": args.train_dtype,
                       "adapter_dtype": "fp32", "projection": args.projection, "warmup": args.train_warmup,
                       "steps": args.train_steps, "repeats": args.train_repeats,
                       "gradient_checkpointing": args.gradient_checkpointing}
    record["infer"] = {"resolution": infer_resolution, "steps": args.infer_steps, "dtype": args.infer_dtype,
                       "warmup": args.infer_warmup, "repeats": args.infer_repeats, "scheduler": "DDIM",
                       "text_guidance_scale": TEXT_SCALE, "dual_reference_guidance_scale": DUAL_REFERENCE_SCALE}
    state: dict = {}

    def section(label: str, fn) -> bool:
        limit = clock.limit()
        if limit is None:
            record["sections"][label] = "skipped: time budget"
            print(f"[{name}] {label}: skipped (time budget)", flush=True)
            save()
            return False
        print(f"[{name}] {label} (limit {limit:.0f} s)", flush=True)
        began = time.perf_counter()
        try:
            with time_limit(limit):
                fn()
            outcome, ok = "ok", True
        except (Exception, SectionTimeout) as error:  # noqa: BLE001 - record it, run the other sections
            import traceback

            traceback.print_exc()
            outcome, ok = f"failed: {error_text(error)}", False
            if device.type == "cuda":
                torch.cuda.empty_cache()
        record["sections"][label] = outcome
        record.setdefault("section_seconds", {})[label] = time.perf_counter() - began
        save()
        return ok

    def build() -> None:
        folder = Path(state["tmp"])
        parts, trainable, counts = build_components(shapes, args.projection, device, train_dtype, folder)
        state.update(parts=parts, trainable=trainable)
        record["parameters"] = counts
        record["parameters_total_billions"] = sum(counts.values()) / 1e9
        if device.type == "cuda":
            record["weights_resident_gib"] = torch.cuda.memory_allocated(device) / 2**30
        print(f"[{name}] parameters (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in counts.items()), flush=True)

    def train() -> None:
        parts = state["parts"]
        if args.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
        step = Step(parts, state["trainable"], device, train_dtype)
        state["step"] = step
        batch = make_batch(batch_size, train_resolution, shapes.reference_size)
        batches = {"uncached": batch, "cached": make_cached_batch(batch, parts, device, step.empty_embeds)}

        def run() -> set[str]:
            return run_variants(
                record["train"], step, batches, batch_size=batch_size, warmup=args.train_warmup,
                steps=args.train_steps, repeats=args.train_repeats, device=device, out_of_time=clock.out_of_time,
                after_run=save,
            )

        failed = run()
        if failed and out_of_memory(record["train"]) and not parts.unet.is_gradient_checkpointing:
            # Out of memory (the SDXL batch at 1024 px is the largest): keep that attempt's record, measure again
            # with gradient checkpointing, as a user would train.
            print(f"[{name}] train: out of memory; again with gradient checkpointing", flush=True)
            record["train"]["without_gradient_checkpointing"] = {"variants": record["train"].pop("variants")}
            record["train"]["gradient_checkpointing"] = True
            parts.unet.enable_gradient_checkpointing()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            failed = run()
        if failed:
            raise RuntimeError(f"training variant(s) failed: {sorted(failed)} (see train.variants)")

    def infer() -> None:
        parts = state["parts"]
        step = state.pop("step", None)
        if step is not None:  # free the optimizer's state and the gradients before inference
            step.optimizer.zero_grad(set_to_none=True)
            del step
        state.pop("trainable", None)
        if parts.unet.is_gradient_checkpointing:
            parts.unet.disable_gradient_checkpointing()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ours, theirs = build_pipelines(shapes, parts, infer_dtype, device, Path(state["tmp"]))
        state.update(ours=ours, theirs=theirs)
        runs = inference_runs(ours, theirs, infer_resolution, args.infer_steps, device)
        unets = {"ours_two_branch": ours.unet, "ours_dual": ours.unet, "diffusers_ip_adapter": theirs.unet}
        time_inference(runs, unets, warmup=args.infer_warmup, repeats=args.infer_repeats, device=device,
                       clock=clock, record=record["infer"], after_run=save)
        summarise_inference(record["infer"])
        check_branches(record["infer"], args.infer_steps)

    with tempfile.TemporaryDirectory(prefix=f"gpu_bench_{name}_") as tmp:
        state["tmp"] = tmp
        try:
            if section("build", build):
                section("train", train)
                section("infer", infer)
            else:
                record["sections"].setdefault("train", "skipped: build failed")
                record["sections"].setdefault("infer", "skipped: build failed")
        finally:
            state.clear()  # drop every model before the next backbone
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    save()


def out_of_memory(train: dict) -> bool:
    """Whether a training variant failed for want of device memory."""
    errors = [run.get("error", "") for entry in train.get("variants", {}).values() for run in entry["runs"]]
    return any(error.startswith("OutOfMemoryError") or "out of memory" in error for error in errors)


def check_branches(record: dict, steps: int) -> None:
    """Each run must have called the UNet once per step with the expected rows (two or three branches)."""
    wrong = []
    for name, entry in record.get("runs", {}).items():
        if "unet_calls" in entry and (entry["unet_calls"] != steps or entry["unet_rows_per_call"] != [EXPECTED_ROWS[name]]):
            wrong.append(f"{name}: {entry['unet_calls']} calls x {entry['unet_rows_per_call']} rows")
    record["branches_as_expected"] = not wrong
    if wrong:
        raise RuntimeError(f"UNet calls differ from {steps} x the expected rows: {'; '.join(wrong)}")


# ----------------------------------------------------------------------------- report


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = [
        f"{env['device_name']}, torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}"
        f"{' (tiny shapes: a smoke check, not performance figures)' if results['config']['tiny'] else ''}.",
        "",
        "Stage-2 training (UNet frozen, adapter fp32, AdamW, autocast):",
        "",
        "| backbone | batch x px | UNet dtype | cached samples/s | uncached samples/s | cached / uncached "
        "| peak GiB cached | peak GiB uncached |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, record in results["backbones"].items():
        train = record.get("train", {})
        variants = train.get("variants", {})
        cached, uncached = variants.get("cached", {}), variants.get("uncached", {})
        status = record.get("sections", {}).get("train", "not run")
        if status != "ok" and not cached.get("samples_per_s") and not uncached.get("samples_per_s"):
            lines.append(f"| {name} | {train.get('batch_size')} x {train.get('resolution')} | "
                         f"{train.get('unet_dtype')} | {status} | | | | |")
            continue
        lines.append(
            f"| {name} | {train['batch_size']} x {train['resolution']} | {train['unet_dtype']} "
            f"| {fmt(cached.get('samples_per_s'))} | {fmt(uncached.get('samples_per_s'))} "
            f"| {fmt(train.get('cached_over_uncached'))} | {fmt(cached.get('peak_allocated_gib'), '.1f')} "
            f"| {fmt(uncached.get('peak_allocated_gib'), '.1f')} |"
        )
    lines += [
        "",
        "Inference, seconds per image (median), one image per call:",
        "",
        "| backbone | px | steps | dtype | ours two-branch | ours dual | diffusers + load_ip_adapter "
        "| two-branch / diffusers | dual / diffusers |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for name, record in results["backbones"].items():
        infer = record.get("infer", {})
        runs, ratios = infer.get("runs", {}), infer.get("ratios", {})
        status = record.get("sections", {}).get("infer", "not run")
        if not any(run.get("s_per_image") for run in runs.values()):
            lines.append(f"| {name} | {infer.get('resolution')} | {infer.get('steps')} | {infer.get('dtype')} "
                         f"| {status} | | | | |")
            continue
        seconds = [fmt(runs.get(run, {}).get("s_per_image"), ".3f") for run in INFER_RUNS]
        lines.append(
            f"| {name} | {infer['resolution']} | {infer['steps']} | {infer['dtype']} | {' | '.join(seconds)} "
            f"| {fmt(ratios.get('ours_two_branch/diffusers_ip_adapter'), '.3f')} "
            f"| {fmt(ratios.get('ours_dual/diffusers_ip_adapter'), '.3f')} |"
        )
    failures = [f"{name} {label}: {outcome}" for name, record in results["backbones"].items()
                for label, outcome in record.get("sections", {}).items() if outcome != "ok"]
    if failures:
        lines += ["", "Not complete: " + "; ".join(failures)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver


def parse_args(argv=None) -> argparse.Namespace:
    out_dir = os.environ.get("OUT")
    default_out = Path(out_dir) / "gpu_bench.json" if out_dir else Path("gpu_bench.json")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="small shapes, 1 step, 64 px (the same code path; for CPU tests)")
    parser.add_argument("--projection", choices=("linear", "resampler"), default="resampler",
                        help="the adapter: resampler (IP-Adapter Plus, 16 tokens; default) or linear (4 tokens)")
    parser.add_argument("--train-dtype", choices=DTYPES, default="bf16", help="frozen UNet/encoders and autocast")
    parser.add_argument("--train-batch-size", type=int, default=None, help="default 8 (SD1.5), 4 (SDXL), 2 (--tiny)")
    parser.add_argument("--train-resolution", type=int, default=None, help="pixels (default native: 512 / 1024)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps per run (default 8; 1 --tiny)")
    parser.add_argument("--train-warmup", type=int, default=None, help="untimed steps per run (default 2; 0 --tiny)")
    parser.add_argument("--train-repeats", type=int, default=None, help="runs per variant (default 2; 1 --tiny)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--infer-dtype", choices=DTYPES, default="fp16", help="every component (default fp16)")
    parser.add_argument("--infer-resolution", type=int, default=None, help="pixels (default native: 512 / 1024)")
    parser.add_argument("--infer-steps", type=int, default=None, help="denoising steps (default 30; 1 --tiny)")
    parser.add_argument("--infer-warmup", type=int, default=None, help="untimed calls each (default 1; 0 --tiny)")
    parser.add_argument("--infer-repeats", type=int, default=None, help="timed rounds (default 2; 1 --tiny)")
    parser.add_argument("--time-budget", type=float, default=420.0,
                        help="seconds for the whole run: no section starts past it (default 420)")
    parser.add_argument("--section-timeout", type=float, default=240.0, help="seconds per section (default 240)")
    parser.add_argument("--out", type=Path, default=default_out, help=f"JSON result (default {default_out})")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(train_steps=(1, 8), train_warmup=(0, 2), train_repeats=(1, 2), infer_steps=(1, 30),
                    infer_warmup=(0, 1), infer_repeats=(1, 2))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    for name in ("train_steps", "train_repeats", "infer_steps", "infer_repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("train_warmup", "infer_warmup"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.train_batch_size is not None and args.train_batch_size < 1:
        parser.error(f"--train-batch-size must be >= 1, got {args.train_batch_size}")
    for name in ("train_resolution", "infer_resolution"):
        value = getattr(args, name)
        if value is not None and (value < 64 or value % 64):
            parser.error(f"--{name.replace('_', '-')} must be a positive multiple of 64, got {value}")
    return args


def main(argv=None) -> int:
    silence_known_noise()
    args = parse_args(argv)
    clock = Clock(args.time_budget, args.section_timeout)
    device = resolve_device(args.device, "--device cpu --tiny")
    results: dict = {
        "benchmark": "gpu_bench",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(device),
        "backbones": {},
        "complete": False,
    }

    def save() -> None:
        results["total_seconds"] = clock.elapsed()
        write_json(results, args.out)

    print(f"{results['environment']['device_name']}: backbones {' '.join(args.backbones)}"
          f"{' (tiny shapes)' if args.tiny else ''}; budget {args.time_budget:.0f} s", flush=True)
    for name in args.backbones:
        record = results["backbones"].setdefault(name, {})
        bench_backbone(name, args, device, clock, record, save)
    results["complete"] = all(
        outcome == "ok" for record in results["backbones"].values() for outcome in record["sections"].values()
    )
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["markdown"] = markdown(results)
    save()
    print("\n" + results["markdown"])
    print(f"\nwrote {args.out} (total {results['total_seconds']:.0f} s)")
    return 0 if results["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
