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
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from dreampainter.utils.logging import silence_known_noise

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a bare checkout too (a GPU machine without the package installed)
    sys.path.insert(0, str(ROOT))

VARIANTS = ("cached", "uncached")
DTYPES = ("bf16", "fp16", "fp32")
CLIP_VOCAB_SIZE = 49408
PROMPTS = (
    "a glass perfume bottle on a marble table, soft morning light",
    "a leather handbag on a wooden shelf in a bright boutique",
    "a pair of running shoes on wet asphalt at night, neon reflections",
    "a ceramic mug on a kitchen counter next to fresh croissants",
)


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shapes:
    """Every size the benchmark builds: SD1.5 + ViT-H-14 (:func:`sd15_shapes`) or a small copy (:func:`small_shapes`)."""

    unet: dict
    vae: dict
    text: dict
    vision: dict
    reference_size: int
    resampler: dict = field(default_factory=dict)  # resampler_heads / resampler_dim_head overrides
    default_resolution: int = 512


def sd15_shapes() -> Shapes:
    from dreampainter.models.unet_configs import sd15_inpainting_unet_config

    return Shapes(
        unet=sd15_inpainting_unet_config(),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
        # h94/IP-Adapter models/image_encoder: OpenCLIP ViT-H-14 as a CLIPVisionModelWithProjection.
        vision=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                    image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5),
        reference_size=224,
    )


def small_shapes() -> Shapes:
    """The same layouts (4 UNet / VAE levels, same block types, resampler depth 4), small widths."""
    from dreampainter.models.unet_configs import sd15_inpainting_unet_config

    return Shapes(
        unet={**sd15_inpainting_unet_config(), "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
              "sample_size": 8},
        vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, latent_channels=4, sample_size=64),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5),
        reference_size=32,
        resampler=dict(resampler_heads=2, resampler_dim_head=16),
        default_resolution=64,
    )


def adapter_config_for(shapes: Shapes, projection: str):
    """IP-Adapter SD1.5 (linear, 4 tokens over the 1024-d embedding) or Plus (resampler, 16 tokens over 1280-d tokens)."""
    from dreampainter.models.adapter import AdapterConfig

    if projection == "linear":
        return AdapterConfig(projection="linear", image_embed_dim=shapes.vision["projection_dim"], num_tokens=4)
    return AdapterConfig(projection="resampler", image_embed_dim=shapes.vision["hidden_size"], num_tokens=16,
                         **shapes.resampler)


def build_models(shapes: Shapes, projection: str) -> dict:
    """Random-weight UNet (adapter installed), VAE, text encoder, reference encoder on the current default device.

    Call under ``with torch.device(...)`` to build directly there (``"meta"``: shapes only, no memory).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreampainter.models.adapter import install_reference_adapter
    from dreampainter.models.reference_encoder import ReferenceEncoder

    unet = UNet2DConditionModel(**shapes.unet)
    base_parameters = sum(p.numel() for p in unet.parameters())
    install_reference_adapter(unet, adapter_config_for(shapes, projection))
    levels = len(shapes.vae["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, **shapes.vae,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, **shapes.text,
    ))
    reference_encoder = ReferenceEncoder(
        backend="transformers", model_config=dict(shapes.vision), image_size=shapes.reference_size
    )
    return {"unet": unet, "unet_base_parameters": base_parameters, "vae": vae, "text_encoder": text_encoder,
            "reference_encoder": reference_encoder}


def parameter_counts(models: dict) -> dict[str, int]:
    from dreampainter.models.adapter import adapter_parameters

    adapter = sum(p.numel() for p in adapter_parameters(models["unet"]))
    return {
        "unet": models["unet_base_parameters"],
        "adapter": adapter,
        "vae": sum(p.numel() for p in models["vae"].parameters()),
        "text_encoder": sum(p.numel() for p in models["text_encoder"].parameters()),
        "reference_encoder": sum(p.numel() for p in models["reference_encoder"].parameters()),
    }


# ----------------------------------------------------------------------------- set-up


def build_components(shapes: Shapes, projection: str, device, weight_dtype, tokenizer_dir: Path):
    """The trainer's stage-2 set-up: ``TrainingComponents`` with frozen cast encoders/UNet and fp32 adapter."""
    import torch
    from diffusers import DDPMScheduler

    from dreampainter.models.adapter import adapter_parameters, cast_frozen_unet
    from dreampainter.toy.models import build_clip_tokenizer
    from dreampainter.training.components import TrainingComponents

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: no 1.7B-parameter CPU init, no copy
        models = build_models(shapes, projection)
    counts = parameter_counts(models)
    unet = models["unet"]
    for name in ("vae", "text_encoder", "reference_encoder"):
        models[name].requires_grad_(False).to(device=device, dtype=weight_dtype).eval()
    unet.requires_grad_(False)
    trainable = adapter_parameters(unet)
    for param in trainable:
        param.requires_grad_(True)
    cast_frozen_unet(unet, weight_dtype)
    unet.train()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )
    parts = TrainingComponents(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=build_clip_tokenizer(tokenizer_dir),
        unet=unet, noise_scheduler=scheduler, scheduler_folder=tokenizer_dir,
        reference_encoder=models["reference_encoder"],
    )
    return parts, trainable, counts


def make_batch(batch_size: int, resolution: int, reference_size: int) -> dict:
    """A loader-format batch (see dreampainter.data.loading.loader): photo, centred product box, reference, prompts."""
    import torch

    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch_size, 3, resolution, resolution, generator=generator) * 2 - 1
    mask = torch.ones(batch_size, 1, resolution, resolution)
    quarter = resolution // 4
    mask[:, :, quarter : resolution - quarter, quarter : resolution - quarter] = 0  # 0 = product, kept
    return {
        "pixel_values": pixels,
        "mask": mask,
        "masked_pixel_values": pixels * (1 - mask),
        "reference_pixel_values": torch.randn(batch_size, 3, reference_size, reference_size, generator=generator),
        "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)],
        "drop_text": torch.zeros(batch_size, dtype=torch.bool),
        "drop_reference": torch.zeros(batch_size, dtype=torch.bool),
        "key": [f"{i:06d}" for i in range(batch_size)],
    }


def make_cached_batch(batch: dict, parts, device, empty_embeds) -> dict:
    """What the latent-cache loader yields for ``batch``: encode_batch's float32 rows on the host, flags, empty prompt."""
    from dreampainter.training.cache import encode_batch

    encoded = encode_batch(batch, parts, parts.unet.reference_adapter_config, device)
    cached = {name: tensor.float().cpu() for name, tensor in encoded.items()}
    cached.update(
        drop_text=batch["drop_text"], drop_reference=batch["drop_reference"],
        empty_text_embeds=empty_embeds.map(lambda t: t.float().cpu()), key=list(batch["key"]),
    )
    return cached


class Step:
    """The trainer's stage-2 step (dreampainter.training.trainer.train), without accelerate."""

    def __init__(self, parts, trainable, device, weight_dtype, max_grad_norm: float = 1.0):
        import torch

        from dreampainter.training.step import empty_text

        self.parts, self.trainable, self.device, self.weight_dtype = parts, trainable, device, weight_dtype
        self.max_grad_norm = max_grad_norm
        self.empty_embeds = empty_text(parts)
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=weight_dtype == torch.float16)
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, batch: dict) -> float:
        import torch

        from dreampainter.training.inputs import prepare_inputs
        from dreampainter.training.step import diffusion_loss

        inputs = prepare_inputs(batch, self.parts, self.empty_embeds, 2, self.device)
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32):
            loss = diffusion_loss(self.parts.unet, self.parts.noise_scheduler, inputs, self.generator)
        # The trainer's finite check reads the loss every step (a host sync before the backward pass). Unlike
        # the trainer, a non-finite step is not skipped, so every timed step does the same work.
        value = float(loss.detach())
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return value


# ----------------------------------------------------------------------------- timing


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(step: Step, batch: dict, batch_size: int, warmup: int, steps: int, device) -> dict:
    """One run: ``warmup`` untimed steps, then ``steps`` timed ones; peak memory over the whole run."""
    import torch

    cuda = device.type == "cuda"
    _sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if cuda else None
    losses = [step(batch) for _ in range(warmup)]
    _sync(device)
    step_seconds = []
    started = time.perf_counter()
    for _ in range(steps):
        begin = time.perf_counter()
        losses.append(step(batch))
        _sync(device)
        step_seconds.append(time.perf_counter() - begin)
    seconds = time.perf_counter() - started
    return {
        "samples_per_s": steps * batch_size / seconds,
        "seconds": seconds,
        "step_seconds": step_seconds,
        "resident_bytes": resident,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
        "final_loss": losses[-1],
        "finite_losses": all(math.isfinite(v) for v in losses),
    }


def summarise(results: dict) -> None:
    """Per-variant medians and the cached/uncached ratio (per repeat, then the median) into ``results``."""
    runs = {v: [r for r in results["variants"][v]["runs"] if "error" not in r] for v in VARIANTS}
    for variant in VARIANTS:
        entry, done = results["variants"][variant], runs[variant]
        if not done:
            continue
        rates = [r["samples_per_s"] for r in done]
        entry["samples_per_s"] = statistics.median(rates)
        entry["samples_per_s_min"], entry["samples_per_s_max"] = min(rates), max(rates)
        entry["step_s_median"] = statistics.median(s for r in done for s in r["step_seconds"])
        peaks = [r["peak_allocated_bytes"] for r in done if r["peak_allocated_bytes"] is not None]
        entry["peak_allocated_gib"] = max(peaks) / 2**30 if peaks else None
        resident = [r["resident_bytes"] for r in done if r["resident_bytes"] is not None]
        entry["resident_gib"] = max(resident) / 2**30 if resident else None
    uncached = {r["repeat"]: r["samples_per_s"] for r in runs["uncached"]}
    pairs = [(r["samples_per_s"], uncached[r["repeat"]]) for r in runs["cached"] if r["repeat"] in uncached]
    results["cached_over_uncached"] = statistics.median(c / u for c, u in pairs) if pairs else None


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


def environment(device) -> dict:
    import diffusers
    import torch
    import transformers

    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "device_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_json(results: dict, path: Path) -> None:
    from dreampainter.utils import atomic_write_json

    atomic_write_json(path, results, indent=1)


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
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: no CUDA device is visible (torch {torch.__version__}, "
                 f"torch.cuda.is_available() is False); run on a GPU machine, or use --device cpu --small")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # train.allow_tf32 defaults to true
        torch.backends.cudnn.allow_tf32 = True
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
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

    failed: set[str] = set()
    for repeat in range(args.repeats):
        order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]  # neither variant always runs first
        for variant in order:
            if variant in failed:
                continue
            if time.perf_counter() - started > args.time_budget:
                print(f"time budget {args.time_budget:.0f} s reached: stopping after {repeat} repeat(s)", flush=True)
                break
            try:
                run = time_variant(step, batches[variant], args.batch_size, args.warmup, args.steps, device)
            except Exception as error:  # noqa: BLE001 - record it, keep the other variant's figures
                traceback.print_exc()
                failed.add(variant)
                run = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"}
                step.optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            run["repeat"] = repeat
            results["variants"][variant]["runs"].append(run)
            if "error" not in run:
                peak = run["peak_allocated_bytes"]
                print(f"repeat {repeat + 1} {variant:8s} {run['samples_per_s']:8.2f} samples/s  "
                      f"{statistics.median(run['step_seconds']):.3f} s/step  loss {run['final_loss']:.4f}"
                      + (f"  peak {peak / 2**30:.1f} GiB" if peak is not None else ""), flush=True)
            results["total_seconds"] = time.perf_counter() - started
            summarise(results)
            write_json(results, args.out)
        else:
            results["repeats_done"] = repeat + 1
            continue
        break
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
