"""Entry point for ``accelerate launch scripts/train.py --config configs/X.yaml [key=value ...]``."""

import sys

from dreampainter.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
