"""Shared pieces of the GPU benchmarks (``bench_train_sd15.py``, ``gpu_bench.py``): random-weight components
with the real shapes built in code (nothing is downloaded), the trainer's stage-2 set-up and step, timing.

Shapes: SD1.5 (:func:`sd15_shapes`) and SDXL (:func:`sdxl_shapes`) inpainting, each with a ViT-H-14 vision
tower as the reference encoder, and small copies of both (:func:`small_shapes`, :func:`small_sdxl_shapes`)
with the same layouts for CPU tests. Build under ``with torch.device(...)`` to initialise directly there
(``"meta"``: shapes only, no memory).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runs from a bare checkout too (a GPU machine without the package installed)
    sys.path.insert(0, str(ROOT))

# The real encoders' configs: CLIP-L text, OpenCLIP bigG text, ViT-H-14 vision (h94/IP-Adapter
# models/image_encoder; both backbones' Plus adapters use it), the SD / SDXL VAE layout.
from dreampainter.models.unet_configs import BIGG_TEXT, CLIP_L_TEXT, SD_VAE  # noqa: E402
from dreampainter.models.unet_configs import VIT_H14_VISION as VIT_H14  # noqa: E402

VARIANTS = ("cached", "uncached")
DTYPES = ("bf16", "fp16", "fp32")
CLIP_VOCAB_SIZE = 49408
PROMPTS = (
    "a glass perfume bottle on a marble table, soft morning light",
    "a leather handbag on a wooden shelf in a bright boutique",
    "a pair of running shoes on wet asphalt at night, neon reflections",
    "a ceramic mug on a kitchen counter next to fresh croissants",
)


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ----------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Shapes:
    """Every size a benchmark builds: the UNet, VAE, text encoder(s), the reference encoder's vision tower,
    and the IP-Adapter Plus resampler's sizes (``resampler``: ``AdapterConfig`` overrides)."""

    unet: dict
    vae: dict
    text: dict
    vision: dict
    reference_size: int
    resampler: dict = field(default_factory=dict)  # resampler_dim / _heads / _dim_head overrides
    default_resolution: int = 512
    text_2: dict | None = None  # SDXL's second text encoder (a CLIPTextModelWithProjection)
    backbone: str = "sd15"
    description: str = ""



def sd15_shapes() -> Shapes:
    from dreampainter.models.unet_configs import sd15_inpainting_unet_config

    return Shapes(
        unet=sd15_inpainting_unet_config(), vae=dict(SD_VAE), text=dict(CLIP_L_TEXT), vision=dict(VIT_H14),
        reference_size=224, description="SD1.5 inpainting UNet + SD VAE + CLIP-L + ViT-H-14",
    )


def sdxl_shapes() -> Shapes:
    """SDXL inpainting: the 2.57B UNet, SDXL's VAE (SD's layout, scaling 0.13025, fp16 upcast), CLIP-L and
    OpenCLIP bigG text encoders, ViT-H-14; adapter as ip-adapter-plus_sdxl_vit-h (resampler 1280 wide, 20 heads)."""
    from dreampainter.models.unet_configs import sdxl_inpainting_unet_config

    return Shapes(
        unet=sdxl_inpainting_unet_config(),
        vae=dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True),
        text=dict(CLIP_L_TEXT),
        text_2=dict(BIGG_TEXT),
        vision=dict(VIT_H14),
        reference_size=224,
        resampler=dict(resampler_dim=1280, resampler_heads=20, resampler_dim_head=64),
        default_resolution=1024,
        backbone="sdxl",
        description="SDXL inpainting UNet + SDXL VAE + CLIP-L + OpenCLIP bigG + ViT-H-14",
    )


SMALL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=8, projection_dim=24, hidden_act="gelu", layer_norm_eps=1e-5)
SMALL_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32)
SMALL_VAE = dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1, latent_channels=4, sample_size=64)


def small_shapes() -> Shapes:
    """SD1.5's layouts (4 UNet / VAE levels, same block types, resampler depth 4), small widths."""
    from dreampainter.models.unet_configs import sd15_inpainting_unet_config

    return Shapes(
        unet={**sd15_inpainting_unet_config(), "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32,
              "sample_size": 8},
        vae=dict(SMALL_VAE), text=dict(SMALL_TEXT), vision=dict(SMALL_VISION), reference_size=32,
        resampler=dict(resampler_heads=1, resampler_dim_head=64),  # diffusers reads dim_head 64 only
        default_resolution=64,
        description="small SD1.5-layout shapes",
    )


def small_sdxl_shapes() -> Shapes:
    """SDXL's layouts (3 UNet levels, no attention at the top, transformer depths growing, text_time
    micro-conditioning, two text encoders), small widths."""
    from dreampainter.models.unet_configs import sdxl_inpainting_unet_config

    return Shapes(
        unet={**sdxl_inpainting_unet_config(), "block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 2),
              "attention_head_dim": (2, 2, 4), "cross_attention_dim": 64, "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 6 * 8 + 32, "sample_size": 8},
        vae=dict(SMALL_VAE, scaling_factor=0.13025, force_upcast=True),
        text=dict(SMALL_TEXT),
        text_2=dict(SMALL_TEXT, hidden_act="gelu"),
        vision=dict(SMALL_VISION),
        reference_size=32,
        resampler=dict(resampler_dim=32, resampler_heads=1, resampler_dim_head=64),
        default_resolution=64,
        backbone="sdxl",
        description="small SDXL-layout shapes",
    )


SHAPES = {"sd15": sd15_shapes, "sdxl": sdxl_shapes}
SMALL_SHAPES = {"sd15": small_shapes, "sdxl": small_sdxl_shapes}


def adapter_config_for(shapes: Shapes, projection: str):
    """IP-Adapter (linear, 4 tokens over the 1024-d embedding) or Plus (resampler, 16 tokens over 1280-d tokens)."""
    from dreampainter.models.adapter import AdapterConfig

    if projection == "linear":
        return AdapterConfig(projection="linear", image_embed_dim=shapes.vision["projection_dim"], num_tokens=4)
    return AdapterConfig(projection="resampler", image_embed_dim=shapes.vision["hidden_size"], num_tokens=16,
                         **shapes.resampler)


def build_text_encoder(text: dict, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=77, bos_token_id=49406,
                            eos_token_id=49407, pad_token_id=49407, **text)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_models(shapes: Shapes, projection: str | None) -> dict:
    """Random-weight UNet (adapter installed unless ``projection`` is None), VAE, text encoder(s), reference
    encoder on the current default device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from dreampainter.models.adapter import install_reference_adapter
    from dreampainter.models.reference_encoder import ReferenceEncoder

    unet = UNet2DConditionModel(**shapes.unet)
    base_parameters = sum(p.numel() for p in unet.parameters())
    if projection is not None:
        install_reference_adapter(unet, adapter_config_for(shapes, projection))
    levels = len(shapes.vae["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, **shapes.vae,
    )
    reference_encoder = ReferenceEncoder(
        backend="transformers", model_config=dict(shapes.vision), image_size=shapes.reference_size
    )
    models = {"unet": unet, "unet_base_parameters": base_parameters, "vae": vae,
              "text_encoder": build_text_encoder(shapes.text), "reference_encoder": reference_encoder}
    if shapes.text_2 is not None:
        models["text_encoder_2"] = build_text_encoder(shapes.text_2, with_projection=True)
    return models


def parameter_counts(models: dict) -> dict[str, int]:
    from dreampainter.models.adapter import adapter_parameters

    adapter = sum(p.numel() for p in adapter_parameters(models["unet"]))
    counts = {"unet": models["unet_base_parameters"], "adapter": adapter}
    for name in ("vae", "text_encoder", "text_encoder_2", "reference_encoder"):
        if models.get(name) is not None:
            counts[name] = sum(p.numel() for p in models[name].parameters())
    return counts


# ----------------------------------------------------------------------------- set-up


def training_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon",
    )


def build_components(shapes: Shapes, projection: str, device, weight_dtype, tokenizer_dir: Path):
    """The trainer's stage-2 set-up: ``TrainingComponents`` with frozen cast encoders/UNet and fp32 adapter."""
    import torch

    from dreampainter.models.adapter import adapter_parameters, cast_frozen_unet
    from dreampainter.toy.models import build_clip_tokenizer
    from dreampainter.training.components import TrainingComponents

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: no multi-billion-parameter CPU init, no copy
        models = build_models(shapes, projection)
    counts = parameter_counts(models)
    unet = models["unet"]
    for name in ("vae", "text_encoder", "text_encoder_2", "reference_encoder"):
        if name in models:
            models[name].requires_grad_(False).to(device=device, dtype=weight_dtype).eval()
    unet.requires_grad_(False)
    trainable = adapter_parameters(unet)
    for param in trainable:
        param.requires_grad_(True)
    cast_frozen_unet(unet, weight_dtype)
    unet.train()
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    parts = TrainingComponents(
        vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
        unet=unet, noise_scheduler=training_scheduler(), scheduler_folder=tokenizer_dir,
        reference_encoder=models["reference_encoder"], text_encoder_2=models.get("text_encoder_2"),
        tokenizer_2=tokenizer if "text_encoder_2" in models else None,
        backbone_name="sdxl" if shapes.text_2 is not None else "sd",
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
        "original_size": torch.tensor([[resolution, resolution]] * batch_size),  # SDXL's micro-conditioning
        "crop_top_left": torch.zeros(batch_size, 2, dtype=torch.long),
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


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variant(step: Step, batch: dict, batch_size: int, warmup: int, steps: int, device) -> dict:
    """One run: ``warmup`` untimed steps, then ``steps`` timed ones; peak memory over the whole run."""
    import torch

    cuda = device.type == "cuda"
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if cuda else None
    losses = [step(batch) for _ in range(warmup)]
    sync(device)
    step_seconds = []
    started = time.perf_counter()
    for _ in range(steps):
        begin = time.perf_counter()
        losses.append(step(batch))
        sync(device)
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


def error_text(error: BaseException) -> str:
    message = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {message}"


def run_variants(results: dict, step: Step, batches: dict, *, batch_size: int, warmup: int, steps: int,
                 repeats: int, device, out_of_time: Callable[[], bool], after_run: Callable[[], None]) -> set[str]:
    """Cached and uncached runs interleaved over ``repeats`` (alternating which goes first) into
    ``results["variants"]``; a failing variant (e.g. out of memory) is recorded and not run again. Returns
    the failed variants; ``results["repeats_done"]`` counts the complete repeats."""
    import torch

    failed: set[str] = set()
    results.setdefault("variants", {v: {"runs": []} for v in VARIANTS})
    results["repeats_done"] = 0
    for repeat in range(repeats):
        order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]  # neither variant always runs first
        for variant in order:
            if variant in failed:
                continue
            if out_of_time():
                print(f"time budget reached: stopping after {repeat} repeat(s)", flush=True)
                return failed
            try:
                run = time_variant(step, batches[variant], batch_size, warmup, steps, device)
            except Exception as error:  # noqa: BLE001 - record it, keep the other variant's figures
                import traceback

                traceback.print_exc()
                failed.add(variant)
                run = {"error": error_text(error)}
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
            summarise(results)
            after_run()
        results["repeats_done"] = repeat + 1
    return failed


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


def resolve_device(name: str, hint: str):
    """``torch.device`` for ``--device``; exits with one clear line when CUDA is asked for and missing."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {name}: no CUDA device is visible (torch {torch.__version__}, "
                 f"torch.cuda.is_available() is False); run on a GPU machine, or use {hint}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # train.allow_tf32 defaults to true
        torch.backends.cudnn.allow_tf32 = True
    return device


def write_json(results: dict, path: Path) -> None:
    from dreampainter.utils import atomic_write_json

    atomic_write_json(path, results, indent=1)
