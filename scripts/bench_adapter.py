"""Benchmark: one training step of the full-size SD1.5-inpainting UNet, with vs without the reference adapter.

Random weights, 32x32 latents (256 px), batch 1, CPU, fp32. The same UNet object is used for both
(the plain step runs with the adapter detached), steps are interleaved, and the median ratio is printed.

    python scripts/bench_adapter.py --repeats 5 [--mode full|frozen]

``full``: every UNet parameter trains (stage 1 + adapter), ``frozen``: only the adapter trains (stage 2;
the plain step back-propagates to the input latents so both run the same backward through the UNet).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from dreampainter.models import (
    AdapterConfig,
    adapter_parameters,
    install_reference_adapter,
    without_reference_adapter,
)
from dreampainter.models.unet_configs import sd15_inpainting_unet_config
from dreampainter.utils.logging import silence_known_noise


def _step(unet, latents, timesteps, text, features=None) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one forward + backward."""
    kwargs = {} if features is None else {"added_cond_kwargs": {"image_embeds": features}}
    wall, cpu = time.perf_counter(), time.process_time()
    out = unet(latents, timesteps, encoder_hidden_states=text, **kwargs).sample
    out.float().square().mean().backward()
    elapsed = time.perf_counter() - wall, time.process_time() - cpu
    unet.zero_grad(set_to_none=True)
    latents.grad = None
    return elapsed


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", choices=["full", "frozen"], default="full")
    parser.add_argument("--projection", choices=["linear", "resampler"], default="linear")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    unet = UNet2DConditionModel(**sd15_inpainting_unet_config()).train()
    config = (
        AdapterConfig("linear", image_embed_dim=1024, num_tokens=4)
        if args.projection == "linear"
        else AdapterConfig("resampler", image_embed_dim=1280, num_tokens=16)
    )
    install_reference_adapter(unet, config)
    unet.requires_grad_(args.mode == "full")
    for param in adapter_parameters(unet):
        param.requires_grad_(True)
    latents = torch.randn(1, 9, 32, 32, requires_grad=args.mode == "frozen")
    timesteps = torch.tensor([500])
    text = torch.randn(1, 77, 768)
    features = torch.randn(1, 1024) if args.projection == "linear" else torch.randn(1, 257, 1280)

    def plain():
        with without_reference_adapter(unet):
            return _step(unet, latents, timesteps, text)

    def adapted():
        return _step(unet, latents, timesteps, text, features)

    plain(), adapted()  # warm-up
    ratios, cpu_ratios, plain_times, adapter_times = [], [], [], []
    for i in range(args.repeats):
        order = (plain, adapted) if i % 2 == 0 else (adapted, plain)
        times = {fn.__name__: fn() for fn in order}
        plain_times.append(times["plain"][0])
        adapter_times.append(times["adapted"][0])
        ratios.append(times["adapted"][0] / times["plain"][0])
        cpu_ratios.append(times["adapted"][1] / times["plain"][1])
        print(
            f"repeat {i}: plain {times['plain'][0]:.2f}s  adapter {times['adapted'][0]:.2f}s  "
            f"wall ratio {ratios[-1]:.3f}  cpu-time ratio {cpu_ratios[-1]:.3f}",
            flush=True,
        )
    n_adapter = sum(p.numel() for p in adapter_parameters(unet))
    n_unet = sum(p.numel() for p in unet.parameters()) - n_adapter
    print(
        f"mode={args.mode} projection={args.projection} threads={args.threads} UNet {n_unet / 1e6:.1f}M + adapter "
        f"{n_adapter / 1e6:.2f}M params | median plain {statistics.median(plain_times):.2f}s, adapter "
        f"{statistics.median(adapter_times):.2f}s | median ratio adapter/plain = {statistics.median(ratios):.3f} "
        f"(process CPU time: {statistics.median(cpu_ratios):.3f})"
    )


if __name__ == "__main__":
    main()
