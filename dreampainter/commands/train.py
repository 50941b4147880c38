"""``dreampainter train --config configs/X.yaml [key=value ...]``: one training stage (one process).

For several processes or machines use ``accelerate launch scripts/train.py --config ... [key=value ...]``.
"""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="OmegaConf YAML file (may name a 'base' file)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dot-list overrides, e.g. optim.lr=5e-5")


def run(args: argparse.Namespace) -> int:
    from dreampainter.training import load_config, train

    result = train(load_config(args.config, args.overrides))
    print(
        f"trained {result.global_step} steps in {result.seconds:.0f}s "
        f"(skipped steps {result.skipped_steps}, skipped samples {sum(result.skipped_samples.values())}); "
        f"pipeline: {result.pipeline_dir}"
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one stage (stage 1: inpainting, stage 2: reference adapter)")
    add_config_arguments(parser)
    parser.set_defaults(func=run)
