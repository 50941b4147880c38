"""Entry point for ``accelerate launch scripts/evaluate.py --pipeline DIR --data SHARDS --out DIR [...]``.

Every process generates its share of the benchmark (by sample index); the main process merges the
metric states and writes the report. Same arguments as ``dreampainter evaluate``.
"""

import sys

from dreampainter.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
