"""The ``dreampainter`` console script: parses arguments, then calls the library.

Each sub-command lives in ``dreampainter/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func`` (called with the parsed namespace).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dreampainter.errors import DreamPainterError
from dreampainter.utils.logging import silence_known_noise

# Modules under dreampainter.commands, in the order their commands are listed in --help.
COMMAND_MODULES = ["demo", "data", "train", "cache", "generate", "evaluate", "compare", "assemble", "studio"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dreampainter",
        description="Product-background inpainting controlled by a text prompt and a reference image.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"dreampainter.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    silence_known_noise()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except DreamPainterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
