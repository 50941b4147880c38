"""Static GPU memory per training configuration, from the real model shapes (nothing is downloaded).

For each config (SD1.5 and SDXL: stage 1 full, stage 1 LoRA, stage 2) and each way to run it (one GPU or
DDP; DeepSpeed ZeRO-2 over N GPUs) prints the trainable parameters and the memory every GPU holds before
activations: weights, gradients, optimizer state, EMA. See dreampainter/training/memory.py for the model.

    python scripts/memory_estimate.py                   # the table in docs/training.md
    python scripts/memory_estimate.py --gpus 4 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dreampainter.models.unet_configs import sd15_inpainting_unet_config, sdxl_inpainting_unet_config  # noqa: E402
from dreampainter.training.config import load_config  # noqa: E402
from dreampainter.training.memory import estimate_memory  # noqa: E402
from dreampainter.utils.logging import silence_known_noise  # noqa: E402

BACKBONES = {"sd15": ("sd", sd15_inpainting_unet_config), "sdxl": ("sdxl", sdxl_inpainting_unet_config)}
RUNS = (  # (label, config file stem, overrides)
    ("stage 1, full UNet", "stage1", []),
    ("stage 1, LoRA", "stage1", ["model.unet_training=lora"]),
    ("stage 2, adapter (UNet frozen)", "stage2", []),
)


def rows(gpus: int, configs: Path) -> list[dict]:
    out = []
    for name, (backbone, unet_config) in BACKBONES.items():
        for label, stem, overrides in RUNS:
            path = configs / f"{name}_{stem}.yaml"
            config = load_config(path, overrides)
            for zero2 in (False, True):
                estimate = estimate_memory(config, unet_config(), backbone, gpus if zero2 else 1, zero2)
                out.append({"backbone": name, "run": label, "config": path.name, "overrides": overrides,
                            "mixed_precision": str(config.train.mixed_precision),
                            "ema": bool(config.train.ema.enabled), **estimate.to_dict()})  # fmt: skip
    return out


def table(results: list[dict]) -> str:
    lines = [
        "| backbone | run | sharding | trainable params | weights | gradients | optimizer | EMA | total / GPU |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        sharding = f"ZeRO-2 x {r['num_gpus']}" if r["zero2"] else "DDP"
        lines.append(
            f"| {r['backbone']} | {r['run']} | {sharding} | {r['trainable_parameters'] / 1e6:,.1f} M "
            f"| {r['weights_gib']:.1f} | {r['gradients_gib']:.1f} | {r['optimizer_gib']:.1f} | {r['ema_gib']:.1f} "
            f"| **{r['total_gib']:.1f} GiB** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the ZeRO-2 rows shard over (default 8)")
    parser.add_argument("--configs", type=Path, default=ROOT / "configs", help="folder of the *_stage*.yaml files")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.gpus < 1:
        parser.error("--gpus must be >= 1")
    silence_known_noise()
    results = rows(args.gpus, args.configs)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
