"""Stage-2 training throughput: DreamPainter (uncached, latent-cached) vs the IP-Adapter training loop.

The reference is the structure of IP-Adapter's ``tutorial_train.py`` applied to inpainting: a plain
per-sample ``Dataset`` (PIL open, torchvision transforms, ``CLIPImageProcessor``, tokenizer, random
dropout) over extracted files, and a loop that runs the VAE (photo and masked photo), the text encoder
and the image encoder on every step before the UNet. Ours is the trainer's step (streaming shard
loader, ``prepare_inputs``, ``diffusion_loss``) without and with ``data.cache``. All three train the
same adapter on the same frozen medium-size model and the same toy shards, with the same batch size.

Each variant runs in its own subprocess (so ``ru_maxrss`` is its peak memory), interleaved over
several repeats; the median samples/s of the timed steps (after warm-up, data loading included) is
reported with ratios to the reference. The latent cache is built once beforehand (timed separately).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_train.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from dreampainter.utils.logging import silence_known_noise

VARIANTS = ("reference", "uncached", "cached")
RESOLUTION = 64
REFERENCE_SIZE = 64


# ----------------------------------------------------------------------------- set-up (parent)


def build_vae(blocks: tuple[int, ...]):
    """Default (48, 96, 96): one encode ~0.6x the UNet's training pass in FLOPs, as SD1.5's VAE at 512 px."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=blocks, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=RESOLUTION, mid_block_add_attention=False,
    )


def build_image_encoder():
    """A CLIP vision tower at 64 px, ~0.2x the UNet's training pass in FLOPs (as ViT-H-14 is to SD1.5's)."""
    from dreampainter.models.reference_encoder import ReferenceEncoder

    model_config = dict(
        hidden_size=192, intermediate_size=768, num_hidden_layers=5, num_attention_heads=4,
        image_size=REFERENCE_SIZE, patch_size=8, projection_dim=64,
    )
    return ReferenceEncoder(backend="transformers", model_config=model_config, image_size=REFERENCE_SIZE)


def build_base(folder: Path, vae_blocks: tuple[int, ...], unet_heads: int) -> Path:
    """A medium random DreamPainter base (UNet (64, 128, 128), 3-block VAE, CLIP towers), no adapter.

    ``unet_heads`` attention heads per layer: 2 gives heads 32 and 64 wide, in the range of SD1.5's (40-160);
    the tiny test UNets' 8 heads (8 and 16 wide) have the same FLOPs but run ~1.4x slower on a CPU.
    """
    import torch

    from dreampainter.pipelines import DreamPainterPipeline
    from dreampainter.toy.models import (
        build_clip_tokenizer,
        build_tiny_scheduler,
        build_tiny_text_encoder,
        build_tiny_unet,
    )

    torch.manual_seed(0)
    pipe = DreamPainterPipeline(
        vae=build_vae(vae_blocks),
        text_encoder=build_tiny_text_encoder(hidden_size=64),
        tokenizer=build_clip_tokenizer(folder / "_tokenizer"),
        unet=build_tiny_unet(
            block_out_channels=(64, 128, 128), cross_attention_dim=64, sample_size=16, attention_head_dim=unet_heads
        ),
        scheduler=build_tiny_scheduler(),
        reference_encoder=build_image_encoder(),
    )
    pipe.save_pretrained(str(folder / "base"))
    return folder / "base"


def flop_shares(base: Path) -> dict[str, dict[str, float]]:
    """GFLOPs per sample of each encoder relative to the UNet's stage-2 training pass: this model vs SD1.5."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from dreampainter.models.reference_encoder import ReferenceEncoder
    from dreampainter.models.unet_configs import sd15_inpainting_unet_config

    def gflops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e9

    def shares(unet, latent, context, vae, pixels, text, vision, reference):
        unet.requires_grad_(False)
        x = torch.randn(1, 9, latent, latent, requires_grad=True)
        train = gflops(lambda: unet(x, torch.tensor([10]), encoder_hidden_states=torch.randn(1, 77, context)).sample.sum().backward())
        with torch.no_grad():
            return {
                "unet_train": train,
                "vae_encode": gflops(lambda: vae.encode(torch.randn(1, 3, pixels, pixels))) / train,
                "text_encoder": gflops(lambda: text(torch.zeros(1, 77, dtype=torch.long))) / train,
                "image_encoder": gflops(lambda: vision(torch.randn(1, 3, reference, reference))) / train,
            }

    ours = shares(
        UNet2DConditionModel.from_pretrained(str(base / "unet")), RESOLUTION // 4, 64,
        AutoencoderKL.from_pretrained(str(base / "vae")), RESOLUTION,
        CLIPTextModel.from_pretrained(str(base / "text_encoder")),
        ReferenceEncoder.from_pretrained(str(base / "reference_encoder")), REFERENCE_SIZE,
    )
    with torch.device("meta"):  # shapes only: no memory, no weights
        sd15 = shares(
            UNet2DConditionModel(**sd15_inpainting_unet_config()), 64, 768,
            AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                          block_out_channels=(128, 256, 512, 512), layers_per_block=2), 512,
            CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12)),
            CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                                           num_hidden_layers=32, num_attention_heads=16,
                                                           image_size=224, patch_size=14, projection_dim=1024)),
            224,
        )
    return {"this model": ours, "SD1.5 + ViT-H-14": sd15}


def extract_files(shards: Path, out: Path) -> Path:
    """The reference loop's data: one file per image and a JSON list (as tutorial_train.py reads)."""
    out.mkdir(parents=True, exist_ok=True)
    items: dict[str, dict] = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, suffix = member.name.partition(".")
                data = archive.extractfile(member).read()
                item = items.setdefault(key, {})
                if suffix == "json":
                    item["text"] = json.loads(data)["prompt"]
                    continue
                (out / member.name).write_bytes(data)
                role = "mask_file" if suffix == "mask.png" else "ref_file" if suffix.startswith("ref.") else "image_file"
                item[role] = member.name
    (out / "data.json").write_text(json.dumps([items[key] for key in sorted(items)]))
    return out / "data.json"


def write_config(workdir: Path, base: Path, shards: Path, batch_size: int) -> Path:
    import yaml

    config = {
        "run": {"output_dir": str(workdir / "unused_run"), "seed": 0, "stage": 2},
        "model": {"pretrained": str(base), "adapter": {"projection": "linear", "num_tokens": 4}},
        "data": {
            "train": str(shards), "num_workers": 0,
            "loader": {"resolution": RESOLUTION, "reference_size": REFERENCE_SIZE, "shuffle_buffer": 64},
        },
        "optim": {"lr": 1e-4},
        "train": {"batch_size": batch_size},
        "logging": {"report_to": "none"},
        "validation": {"num_samples": 0},
    }
    path = workdir / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ----------------------------------------------------------------------------- the variants (child)


class TutorialDataset:
    """tutorial_train.py's MyDataset, for inpainting: photo, mask, reference, prompt, random dropout."""

    def __init__(self, json_file: Path, tokenizer, size: int, p_text=0.05, p_image=0.05, p_both=0.05):
        from torchvision import transforms
        from transformers import CLIPImageProcessor

        self.root = json_file.parent
        self.data = json.loads(json_file.read_text())
        self.tokenizer, self.p_text, self.p_image, self.p_both = tokenizer, p_text, p_image, p_both
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ])
        self.mask_transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.NEAREST),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
        ])
        self.clip_image_processor = CLIPImageProcessor(
            size={"shortest_edge": REFERENCE_SIZE}, crop_size={"height": REFERENCE_SIZE, "width": REFERENCE_SIZE}
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        import random

        from PIL import Image

        item = self.data[index]
        text = item["text"]
        image = self.transform(Image.open(self.root / item["image_file"]).convert("RGB"))
        product = (self.mask_transform(Image.open(self.root / item["mask_file"]).convert("L")) > 0.5).float()
        reference = Image.open(self.root / item["ref_file"]).convert("RGB")
        clip_image = self.clip_image_processor(images=reference, return_tensors="pt").pixel_values
        drop_image_embed = 0
        draw = random.random()
        if draw < self.p_image:
            drop_image_embed = 1
        elif draw < self.p_image + self.p_text:
            text = ""
        elif draw < self.p_image + self.p_text + self.p_both:
            text, drop_image_embed = "", 1
        ids = self.tokenizer(
            text, max_length=self.tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids
        return {
            "image": image, "mask": 1 - product, "masked_image": image * product, "text_input_ids": ids,
            "clip_image": clip_image, "drop_image_embed": drop_image_embed,
        }


def tutorial_collate(items: list[dict]) -> dict:
    import torch

    return {
        "images": torch.stack([i["image"] for i in items]),
        "masks": torch.stack([i["mask"] for i in items]),
        "masked_images": torch.stack([i["masked_image"] for i in items]),
        "text_input_ids": torch.cat([i["text_input_ids"] for i in items]),
        "clip_images": torch.cat([i["clip_image"] for i in items]),
        "drop_image_embeds": [i["drop_image_embed"] for i in items],
    }


def reference_step_fn(parts, accelerator, unet, optimizer, trainable, workdir: Path, batch_size: int):
    """The tutorial loop body: every encoder runs inside the step."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    dataset = TutorialDataset(workdir / "files" / "data.json", parts.tokenizer, RESOLUTION)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=tutorial_collate, num_workers=0,
                        drop_last=True)
    vae, text_encoder, image_encoder, scheduler = parts.vae, parts.text_encoder, parts.reference_encoder, parts.noise_scheduler
    device = accelerator.device

    def step(batch) -> torch.Tensor:
        with accelerator.accumulate(unet):
            with torch.no_grad():
                latents = vae.encode(batch["images"].to(device)).latent_dist.sample() * vae.config.scaling_factor
                masked = vae.encode(batch["masked_images"].to(device)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            bsz = latents.shape[0]
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device).long()
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            with torch.no_grad():
                image_embeds = image_encoder(batch["clip_images"].to(device)).image_embeds
            image_embeds = torch.stack([
                torch.zeros_like(embed) if drop else embed
                for embed, drop in zip(image_embeds, batch["drop_image_embeds"])
            ])
            with torch.no_grad():
                encoder_hidden_states = text_encoder(batch["text_input_ids"].to(device))[0]
            mask = F.interpolate(batch["masks"].to(device), size=latents.shape[-2:])
            noise_pred = unet(
                torch.cat([noisy_latents, mask, masked], dim=1), timesteps, encoder_hidden_states,
                added_cond_kwargs={"image_embeds": image_embeds},
            ).sample
            loss = F.mse_loss(noise_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return loss

    return loader, step


def ours_step_fn(parts, accelerator, unet, optimizer, trainable, config, cached: bool, batch_size: int):
    """The trainer's step (dreampainter.training.trainer), with the streaming loader or the latent cache."""
    import torch

    from dreampainter.data.loading.loader import build_dataloader
    from dreampainter.training.cache import open_latent_cache
    from dreampainter.training.inputs import prepare_inputs
    from dreampainter.training.step import diffusion_loss, empty_text

    loader_config = config.data.loader
    if cached:
        loader = open_latent_cache(config, parts, loader_config).dataloader(loader_config, batch_size=batch_size)
    else:
        loader = build_dataloader(config.data.train, loader_config, batch_size=batch_size, num_workers=0)
    empty = empty_text(parts)
    generator = torch.Generator().manual_seed(0)
    device = accelerator.device

    def step(batch) -> torch.Tensor:
        with accelerator.accumulate(unet):
            inputs = prepare_inputs(batch, parts, empty, 2, device)
            with accelerator.autocast():
                loss = diffusion_loss(unet, parts.noise_scheduler, inputs, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    return loader, step


def run_variant(variant: str, workdir: Path, batch_size: int, warmup: int, steps: int) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from dreampainter.training import load_config
    from dreampainter.training.components import load_components
    from dreampainter.training.setup import build_optimizer, mark_trainable

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    overrides = [f"data.cache={workdir / 'cache'}"] if variant == "cached" else []
    config = load_config(workdir / "bench.yaml", overrides)
    accelerator = Accelerator()
    set_seed(0)
    parts = load_components(config)
    trainable = mark_trainable(config, parts)
    for module in (parts.vae, parts.text_encoder, parts.reference_encoder):
        module.to(accelerator.device).eval()
    unet = parts.unet.to(accelerator.device)
    optimizer = build_optimizer(config, trainable, accelerator.device)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if variant == "reference":
        loader, step = reference_step_fn(parts, accelerator, unet, optimizer, trainable, workdir, batch_size)
    else:
        loader, step = ours_step_fn(parts, accelerator, unet, optimizer, trainable, config, variant == "cached", batch_size)

    rss_before = _current_rss_mb()
    done, started, cpu_started, losses = 0, None, None, []
    while done < warmup + steps:
        for batch in loader:
            if done == warmup:
                if accelerator.device.type == "cuda":
                    torch.cuda.synchronize()
                started, cpu_started = time.perf_counter(), time.process_time()
            losses.append(float(step(batch).detach()))
            done += 1
            if done == warmup + steps:
                break
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "samples_per_s": steps * batch_size / seconds,
        "samples_per_cpu_s": steps * batch_size / cpu_seconds,
        "peak_rss_mb": peak,
        "loop_rss_mb": peak - rss_before,
        "final_loss": losses[-1],
    }


def _current_rss_mb() -> float:
    """Resident memory now (Linux /proc), to tell the training loop's memory from the imports' and model's."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------- driver


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--samples", type=int, default=120, help="toy samples to write (90 percent train)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the data/model here (default: a temp dir)")
    parser.add_argument("--vae-blocks", type=int, nargs=3, default=[48, 96, 96],
                        help="VAE block widths (default: FLOP shares as SD1.5's); a new --workdir per value")
    parser.add_argument("--unet-heads", type=int, default=2,
                        help="attention heads per UNet layer (default 2: 32/64 wide, as SD1.5's 40-160); a new --workdir per value")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.worker:
        result = run_variant(args.worker, args.workdir, args.batch_size, args.warmup, args.steps)
        print("RESULT " + json.dumps(result), flush=True)
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        prepare(workdir, args)
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
        for repeat in range(args.repeats):
            order = VARIANTS[repeat % 3 :] + VARIANTS[: repeat % 3]  # rotate: no variant always runs first
            for variant in order:
                command = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir),
                           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
                result = json.loads(lines[-1][len("RESULT "):])
                results[variant].append(result)
                print(f"repeat {repeat + 1} {variant:9s} {result['samples_per_s']:7.2f} samples/s "
                      f"({result['samples_per_cpu_s']:.2f} per CPU-s)  peak RSS {result['peak_rss_mb']:.0f} MB "
                      f"(loop +{result['loop_rss_mb']:.0f} MB)", flush=True)
        report(results)


def prepare(workdir: Path, args) -> None:
    from dreampainter.toy.data import write_toy_dataset
    from dreampainter.training import load_config
    from dreampainter.training.cache import cache_latents

    started = time.perf_counter()
    if not (workdir / "toy" / "train" / "index.json").exists():
        write_toy_dataset(workdir / "toy", num=args.samples, seed=0, resolution=RESOLUTION, samples_per_shard=32,
                          progress=False)
    shards = workdir / "toy" / "train"
    if not (workdir / "base").exists():
        build_base(workdir, tuple(args.vae_blocks), args.unet_heads)
    if not (workdir / "files" / "data.json").exists():
        extract_files(shards, workdir / "files")
    config_path = write_config(workdir, workdir / "base", shards, args.batch_size)
    for name, share in flop_shares(workdir / "base").items():
        print(f"{name:18s} UNet training pass {share['unet_train']:8.2f} GFLOP/sample; per sample relative to it: "
              f"VAE encode {share['vae_encode']:.2f} (x2: photo, masked photo), text encoder "
              f"{share['text_encoder']:.3f}, image encoder {share['image_encoder']:.2f}")
    print(f"set-up (toy shards, medium base model, extracted files): {time.perf_counter() - started:.1f} s")
    if not (workdir / "cache" / "index.json").exists():
        started = time.perf_counter()
        index = cache_latents(load_config(config_path), workdir / "cache", progress=False)
        count = json.loads(index.read_text())["num_samples"]
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in (workdir / "cache").iterdir()) / 2**20
        print(f"latent cache: {count} samples in {seconds:.1f} s ({count / seconds:.1f} samples/s, {size:.1f} MiB)")


def report(results: dict[str, list[dict]]) -> None:
    """Medians; ratios are per repeat (runs next to each other in time) then the median, for wall and CPU time."""
    reference = results["reference"]
    print("\nvariant     samples/s (median, min-max)   vs reference: wall (min-max)   CPU time   "
          "peak RSS MB (loop +MB)")
    for variant, runs in results.items():
        rates = [r["samples_per_s"] for r in runs]
        wall = [r["samples_per_s"] / ref["samples_per_s"] for r, ref in zip(runs, reference)]
        cpu = [r["samples_per_cpu_s"] / ref["samples_per_cpu_s"] for r, ref in zip(runs, reference)]
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        loop = statistics.median(r["loop_rss_mb"] for r in runs)
        print(f"{variant:10s}  {statistics.median(rates):6.2f} ({min(rates):.2f}-{max(rates):.2f})"
              f"           {statistics.median(wall):5.2f}x ({min(wall):.2f}-{max(wall):.2f})"
              f"         {statistics.median(cpu):5.2f}x     {rss:6.0f} (+{loop:.0f})")


if __name__ == "__main__":
    main()
