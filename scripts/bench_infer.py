"""Benchmark: seconds per image, DreamPainterPipeline vs diffusers' StableDiffusionInpaintPipeline + load_ip_adapter.

Both pipelines share the same non-trivial random-weight components (VAE, text encoder, CLIP vision tower,
base UNet weights); diffusers gets our adapter through ``export_ip_adapter`` + ``load_ip_adapter``. Same
image, prompt, steps and scheduler; runs are interleaved (rotating order) and median ratios printed:

* ``ours-2``: text + reference in one two-branch CFG (s_text == s_ref), the same UNet work as diffusers;
  target <= 1.03x diffusers.
* ``ours-3``: dual guidance (s_text != s_ref, three branches); target <= 1.55x the diffusers two-branch run.
* ``ours-3-sched``: dual guidance with a reference guidance schedule (``--interval``, ``--every``: the third
  branch on some steps only, two branches on the others); target <= 1.12x diffusers-2.

    python scripts/bench_infer.py --repeats 5 --steps 10 --size 256 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPImageProcessor

from dreampainter.models import (
    AdapterConfig,
    ReferenceEncoder,
    export_ip_adapter,
    install_reference_adapter,
)
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.pipelines.image_processing import place_cutout
from dreampainter.toy.models import build_clip_tokenizer, build_tiny_scheduler, build_tiny_text_encoder
from dreampainter.utils.logging import silence_known_noise

WIDTH = 256  # cross-attention / text width of the benchmark components


def build_unet(seed: int) -> UNet2DConditionModel:
    """An SD1.5-shaped 9-channel inpainting UNet at a quarter of the width (about 55M parameters)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=9,
        out_channels=4,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=8,
    ).eval()


def build_vae(seed: int) -> AutoencoderKL:
    """A light SD-shaped VAE: 8x down-sampling, 4 latent channels."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
    ).eval()


def build_encoder(seed: int) -> ReferenceEncoder:
    """A CLIP ViT vision tower (224 px, patch 32, 4 layers of width 256, embedding 256)."""
    torch.manual_seed(seed)
    config = dict(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=256,
    )
    return ReferenceEncoder(backend="transformers", model_config=config, image_size=224)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine CPU time is the stable figure."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size / 8)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--interval", type=float, nargs=2, default=(0.7, 1.0), help="ours-3-sched's interval (default 0.7 1)"
    )
    parser.add_argument("--every", type=int, default=1, help="ours-3-sched's every (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_infer_"))

    encoder = build_encoder(seed=2)
    text_encoder = build_tiny_text_encoder(seed=1, hidden_size=WIDTH, num_layers=4)
    tokenizer = build_clip_tokenizer(work / "tokenizer")
    vae = build_vae(seed=3)
    ours_unet = build_unet(seed=0)
    install_reference_adapter(
        ours_unet, AdapterConfig("linear", image_embed_dim=encoder.image_embed_dim, num_tokens=4)
    )
    torch.manual_seed(4)
    with torch.no_grad():  # a trained-looking adapter, not the copy-of-to_k initialisation
        for name, param in ours_unet.named_parameters():
            if "_ref" in name or "encoder_hid_proj" in name:
                param.add_(0.02 * torch.randn_like(param))
    export_ip_adapter(ours_unet, work / "ip_adapter.safetensors")

    ours = DreamPainterPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=ours_unet,
        scheduler=build_tiny_scheduler(),
        reference_encoder=encoder,
    )
    theirs = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=build_unet(seed=0),
        scheduler=build_tiny_scheduler(),
        safety_checker=None,
        requires_safety_checker=False,
        feature_extractor=CLIPImageProcessor(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        image_encoder=encoder.model,  # the same CLIP vision tower, so both pipelines encode the reference
    )
    theirs.load_ip_adapter(
        str(work), subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None
    )
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)

    rng = np.random.default_rng(0)
    cutout = np.zeros((64, 64, 4), np.uint8)
    cutout[8:56, 16:48] = (40, 120, 60, 255)
    photo, product_mask = place_cutout(Image.fromarray(cutout), (args.size, args.size), scale=0.5)
    reference = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    prompt, steps = "a bottle on a marble table", args.steps

    def ours_run(reference_guidance_scale: float, **schedule):
        """Ours; text and reference scales equal -> two branches, different -> three."""
        ours(
            prompt,
            photo,
            product_mask,
            reference_image=reference,
            text_guidance_scale=7.5,
            reference_guidance_scale=reference_guidance_scale,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
            **schedule,
        )

    def diffusers_2():
        theirs(
            prompt,
            image=photo,
            mask_image=Image.fromarray(255 - product_mask),
            ip_adapter_image=reference,
            height=args.size,
            width=args.size,
            guidance_scale=7.5,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(0),
        )

    schedule = dict(reference_guidance_interval=args.interval, reference_guidance_every=args.every)
    runs = {
        "ours-2": lambda: ours_run(7.5),
        "ours-3": lambda: ours_run(5.0),
        "ours-3-sched": lambda: ours_run(5.0, **schedule),
        "diffusers-2": diffusers_2,
    }
    rows = {}
    for name, fn in runs.items():  # warm-up, and count the UNet rows each step runs
        seen = []
        unet = ours_unet if name.startswith("ours") else theirs.unet
        handle = unet.register_forward_pre_hook(
            lambda module, inputs, seen=seen: seen.append(inputs[0].shape[0])
        )
        fn()
        handle.remove()
        rows[name] = seen[0] if len(set(seen)) == 1 else seen
    print(
        f"UNet rows per step: {rows}  (one batched UNet call per step: {len(seen)} calls for {steps} steps)"
    )
    print(f"ours-3-sched: interval={args.interval} every={args.every}")

    wall = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            seconds, cpu_seconds = timed(runs[name])
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        print(
            f"repeat {repeat}: " + "  ".join(f"{n} {wall[n][-1]:.2f}s (cpu {cpu[n][-1]:.2f}s)" for n in names)
        )

    params = sum(p.numel() for p in theirs.unet.parameters()) / 1e6
    print(f"size={args.size} steps={steps} threads={args.threads} UNet {params:.1f}M params")
    for label, times in (("wall", wall), ("cpu", cpu)):
        medians = ", ".join(f"{name} {statistics.median(values):.2f}" for name, values in times.items())
        ratio_2 = statistics.median(a / b for a, b in zip(times["ours-2"], times["diffusers-2"]))
        ratio_3 = statistics.median(a / b for a, b in zip(times["ours-3"], times["diffusers-2"]))
        ratio_s = statistics.median(a / b for a, b in zip(times["ours-3-sched"], times["diffusers-2"]))
        ratio_s2 = statistics.median(a / b for a, b in zip(times["ours-3-sched"], times["ours-2"]))
        print(f"[{label}] median s/image: {medians}")
        print(f"[{label}] median ratio ours-2 / diffusers-2 = {ratio_2:.3f} (target <= 1.03)")
        print(f"[{label}] median ratio ours-3 / diffusers-2 = {ratio_3:.3f} (target <= 1.55)")
        print(f"[{label}] median ratio ours-3-sched / diffusers-2 = {ratio_s:.3f} (target <= 1.12)")
        print(f"[{label}] median ratio ours-3-sched / ours-2 = {ratio_s2:.3f}")


if __name__ == "__main__":
    main()
