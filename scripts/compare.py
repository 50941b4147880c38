"""Entry point for ``accelerate launch scripts/compare.py --systems FILE --data SHARDS --out DIR [...]``.

Every process generates its share of the benchmark (by sample index) for each system; the main process
merges the metric states and writes the comparison. Same arguments as ``dreampainter compare``.
"""

import sys

from dreampainter.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
