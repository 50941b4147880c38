"""``dreampainter demo``: the CPU demo (toy data -> tiny model -> two stages -> evaluation), offline."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    from dreampainter.toy.demo import DemoSettings, run_demo

    settings = DemoSettings.quick(args.out) if args.quick else DemoSettings(out_dir=Path(args.out))
    settings.seed = settings.generation.seed = args.seed
    settings.overrides = list(args.overrides)
    if args.compare_reference_modes:
        from dreampainter.toy.compare_modes import compare_reference_modes

        compare_reference_modes(settings, timing_rounds=1 if args.quick else 5)
        return 0
    run_demo(settings)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the CPU demo end to end on toy data (offline, ~10 min)")
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, training and generation (default 0)")
    parser.add_argument("--quick", action="store_true", help="a shortened run (seconds; for tests)")
    parser.add_argument(
        "--compare-reference-modes", action="store_true",
        help="stage 2 once per reference mode (decoupled, in_context with LoRA or the whole UNet, both) on the same "
        "data, base and stage 1; writes reference_modes.md / .json / _grid.png (~4x the demo's stage 2)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="training config overrides for both stages")
    parser.set_defaults(func=run)
