"""``dreampainter cache-latents --config X.yaml --out DIR [key=value ...]``: precompute a latent cache.

Encodes the training shards once (VAE posteriors, latent masks, text embeddings, reference
features) so that a run with ``data.cache=DIR`` trains steps that run only the UNet. Under
``accelerate launch`` every process caches its own shards into the same folder.
"""

from __future__ import annotations

import argparse

from dreampainter.commands.common import DTYPES
from dreampainter.commands.train import add_config_arguments


def run(args: argparse.Namespace) -> int:
    from dreampainter.training import load_config
    from dreampainter.training.cache import cache_latents

    index = cache_latents(
        load_config(args.config, args.overrides), args.out, dtype=args.dtype, chunk_size=args.chunk_size,
        batch_size=args.batch_size,
    )
    if index.exists():  # only the main process writes (and reports) the index
        import json

        data = json.loads(index.read_text())
        skipped = sum(data["skipped"].values())
        print(f"cached {data['num_samples']} samples (skipped {skipped}) in {index.parent}; train with data.cache={index.parent}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "cache-latents", help="precompute VAE latents, text embeddings and reference features for training"
    )
    add_config_arguments(parser)
    parser.add_argument("--out", required=True, help="the cache folder to create")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES,
        help="storage type (float32: the cached loss equals the uncached one; 16-bit halves the size)",
    )
    parser.add_argument("--chunk-size", type=int, default=256, help="samples per safetensors chunk")
    parser.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default: train.batch_size)")
    parser.set_defaults(func=run)
