"""``dreampainter demo``: the CPU demo (toy data -> tiny model -> two stages -> evaluation), offline."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from dreampainter.toy.demo import DemoSettings, run_demo

    settings = DemoSettings.quick(args.out) if args.quick else DemoSettings(out_dir=Path(args.out))
    settings.seed = settings.generation.seed = args.seed
    settings.overrides = list(args.overrides)
    run_demo(settings)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the CPU demo end to end on toy data (offline, ~10 min)")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, training and generation (default 0)")
    parser.add_argument("--quick", action="store_true", help="a shortened run (seconds; for tests)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides for both stages")
    parser.set_defaults(func=run)
