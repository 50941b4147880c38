"""Benchmark: the cost of the two in-context forms, per denoising step and per image, on random-weight UNets.

* (a) spatial canvas: reference and target side by side in one latent canvas (twice as wide), every
  step runs the UNet on the canvas (the reference half's mask channel = "keep");
* (b) reference pass (what ``reference_mode: in_context`` implements, ``models/in_context.py``): the UNet
  runs once on the reference (t = 0), then every step runs on the target alone, each self-attention
  appending the reference's keys / values;
* text only: the plain UNet on the target (no reference), the floor;
* decoupled: the same UNet with the decoupled adapter (``reference_mode: decoupled``, a linear projection
  to 4 tokens; 16 resampler tokens would cost a little more), the reference as CLIP features (the CLIP
  image encoder's own cost, once per image, is not included).

One image = ``--steps`` steps of a two-branch guided call (batch 2: unconditional + with reference; in
(b) the unconditional row attends to nothing extra). Timings are medians over rounds in which the forms
run interleaved, so a busy machine slows them alike; the ratios are the result.

    python scripts/bench_in_context_forms.py --unet demo --latent 8 --steps 10
    python scripts/bench_in_context_forms.py --unet sd15 --latent 32 --steps 30 --rounds 3
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from dreampainter.models import AdapterConfig, in_context_reference, install_reference_adapter, set_rows
from dreampainter.models.unet_configs import sd15_inpainting_unet_config

# The CPU demo's UNet (dreampainter.toy.base_model.build_demo_unet): two levels, 32 / 64 channels.
DEMO_UNET = dict(
    in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)  # fmt: skip


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unet", choices=("demo", "sd15"), default="demo")
    parser.add_argument("--latent", type=int, default=8, help="target latent side (8: the demo's 32 px)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="text tokens")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = DEMO_UNET if args.unet == "demo" else sd15_inpainting_unet_config()
    unet = UNet2DConditionModel(**config).eval()
    decoupled = copy.deepcopy(unet)
    install_reference_adapter(unet, AdapterConfig(reference_mode="in_context"))
    install_reference_adapter(decoupled, AdapterConfig(image_embed_dim=1024))
    features = torch.randn(2, 1024)
    side, width = args.latent, unet.config.cross_attention_dim
    text = torch.randn(2, args.tokens, width)
    t = torch.tensor(500)
    target = torch.randn(2, 9, side, side)
    canvas = torch.randn(2, 9, side, 2 * side)
    reference = torch.randn(1, 4, side, side)

    def canvas_step() -> None:
        unet(canvas, t, encoder_hidden_states=text)

    def text_step() -> None:
        unet(target, t, encoder_hidden_states=text)

    def decoupled_step() -> None:
        decoupled(target, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": features})

    times: dict[str, list[float]] = {
        "text only": [], "decoupled": [], "(a) canvas": [], "(b) appended": [], "(b) reference pass": []
    }
    for round_index in range(args.rounds + 1):  # round 0 warms up
        measured = {"text only": _timed(text_step), "decoupled": _timed(decoupled_step), "(a) canvas": _timed(canvas_step)}
        start = time.perf_counter()
        with in_context_reference(unet, reference, torch.tensor([-1, 0])):
            measured["(b) reference pass"] = time.perf_counter() - start
            set_rows(unet, torch.tensor([-1, 0]))
            measured["(b) appended"] = _timed(text_step)
        if round_index:
            for name, value in measured.items():
                times[name].append(value)
    step = {name: statistics.median(values) for name, values in times.items()}
    per_image = {
        "text only": args.steps * step["text only"],
        "decoupled": args.steps * step["decoupled"],
        "(a) canvas": args.steps * step["(a) canvas"],
        "(b) appended": step["(b) reference pass"] + args.steps * step["(b) appended"],
    }
    print(f"UNet {args.unet}, target latents {side}x{side}, {args.steps} steps, batch 2, {torch.get_num_threads()} threads")
    print("| form | s / step | s / image | x text only | x decoupled |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in ("text only", "decoupled", "(a) canvas", "(b) appended"):
        print(
            f"| {name} | {step[name]:.4f} | {per_image[name]:.3f} | {per_image[name] / per_image['text only']:.2f} | "
            f"{per_image[name] / per_image['decoupled']:.2f} |"
        )
    print(f"(b) reference pass, once per image: {step['(b) reference pass']:.4f} s")


if __name__ == "__main__":
    main()
