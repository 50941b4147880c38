"""``dreampainter data``: build or write shards from a catalogue, validate shards, generate toy data."""

from __future__ import annotations

import argparse

from dreampainter.errors import DreamPainterError


def _write_shards(args: argparse.Namespace) -> int:
    from dreampainter.data.shards.writer import write_shards_from_manifest

    index, report = write_shards_from_manifest(
        args.manifest,
        args.out,
        workers=args.workers,
        on_error=args.on_error,
        reencode=args.reencode,
        max_side=args.max_side,
        jpeg_quality=args.jpeg_quality,
        max_samples_per_shard=args.samples_per_shard,
        max_bytes=args.max_bytes,
        prefix=args.prefix,
        progress=not args.quiet,
        overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote {index.num_samples} samples in {len(index.shards)} shards to {args.out}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from dreampainter.data.build.config import BuildConfig
    from dreampainter.data.build.pipeline import build_dataset
    from dreampainter.utils.config import load_config

    config = load_config(BuildConfig, args.config, args.overrides)
    report = build_dataset(args.input, config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if report is not None:  # rank 0 (or the only process)
        print(report.table())
        print(f"wrote {report.num_kept} samples in {report.num_shards} shards to {args.out}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from dreampainter.data.shards.validate import validate_shards

    report = validate_shards(args.shards, progress=not args.quiet, workers=args.workers)
    print(report.summary(max_listed=args.max_listed))
    return 0 if report.ok else 1


def _index(args: argparse.Namespace) -> int:
    from dreampainter.data.shards.writer import index_shards

    index = index_shards(args.folder, pattern=args.pattern, overwrite=args.overwrite, progress=not args.quiet)
    print(f"indexed {len(index.shards)} shards, {index.num_samples} samples in {args.folder}")
    return 0


def _toy(args: argparse.Namespace) -> int:
    try:
        from dreampainter.toy.data import write_toy_dataset
    except ImportError as error:
        raise DreamPainterError(f"the toy data generator is not available ({error})") from None
    result = write_toy_dataset(
        args.out,
        num=args.num,
        seed=args.seed,
        resolution=args.resolution,
        workers=args.workers,
    )
    print(f"wrote {args.num} toy samples (seed {args.seed}, {args.resolution} px) to {args.out}")
    if isinstance(result, dict):  # split name -> ShardIndex
        for split, index in result.items():
            print(f"  {split}: {index.num_samples} samples in {len(index.shards)} shards")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="write, validate and generate DreamEcom shards")
    commands = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    write = commands.add_parser(
        "write-shards",
        help="build tar shards + index.json from a JSONL/CSV manifest or a catalogue folder",
        description="Build DreamEcom shards from a manifest (.jsonl/.csv) or a folder layout; see docs/data_format.md.",
    )
    write.add_argument("manifest", metavar="MANIFEST_OR_FOLDER")
    write.add_argument("--out", required=True, help="output folder for the shards and index.json")
    write.add_argument("--workers", type=int, default=1, help="worker processes reading and checking rows")
    write.add_argument("--samples-per-shard", type=int, default=1000, help="maximum samples per shard")
    write.add_argument("--max-bytes", type=int, default=None, help="maximum shard size in bytes")
    write.add_argument("--prefix", default="shard", help="shard file name prefix (<prefix>-000000.tar)")
    write.add_argument(
        "--on-error", choices=("skip", "fail"), default="skip", help="what to do with bad rows"
    )
    write.add_argument("--reencode", action="store_true", help="re-encode photos and references as JPEG")
    write.add_argument(
        "--max-side", type=int, default=None, help="downscale images whose longer side exceeds PX"
    )
    write.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when re-encoding")
    write.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    write.add_argument("--quiet", action="store_true", help="no progress bar")
    write.set_defaults(func=_write_shards)

    build = commands.add_parser(
        "build",
        help="build validated shards from a shop's photos (masks, references, prompts, filters)",
        description="Photos (folder, JSONL/CSV manifest or shards) -> masks -> references -> prompts -> "
        "filters -> shards + index.json + build_report.json; see docs/data_building.md. Resumable; "
        "runs on every rank under torchrun / accelerate launch.",
    )
    build.add_argument("--input", required=True, help="photo folder, manifest (.jsonl/.csv) or shard folder")
    build.add_argument("--config", required=True, help="build config (e.g. configs/build_studio.yaml)")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    build.add_argument("--overwrite", action="store_true", help="start again, replacing what --out holds")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=_build)

    validate = commands.add_parser(
        "validate",
        help="check every sample and the index of a shard set",
        description="Check every sample and index.json; exit status 1 when anything is bad.",
    )
    validate.add_argument(
        "shards", metavar="FOLDER_OR_INDEX", help="shard folder, its index.json, or one .tar"
    )
    validate.add_argument("--workers", type=int, default=1, help="shards read in parallel processes")
    validate.add_argument("--max-listed", type=int, default=50, help="bad samples listed in the summary")
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.set_defaults(func=_validate)

    index = commands.add_parser(
        "index",
        help="write index.json for shards made by other tools (ShardWriter, tar)",
        description="Count the samples of each shard and hash it, then write index.json beside them.",
    )
    index.add_argument("folder", metavar="FOLDER")
    index.add_argument("--pattern", default="*.tar", help="shard file names to index (glob)")
    index.add_argument("--overwrite", action="store_true", help="replace an existing index.json")
    index.add_argument("--quiet", action="store_true", help="no progress bar")
    index.set_defaults(func=_index)

    toy = commands.add_parser("toy", help="generate the procedural toy DreamEcom dataset")
    toy.add_argument("--out", required=True, help="output folder")
    toy.add_argument("--num", type=int, required=True, help="number of samples")
    toy.add_argument("--seed", type=int, required=True, help="random seed")
    toy.add_argument("--resolution", type=int, default=128, help="image side in pixels")
    toy.add_argument("--workers", type=int, default=1, help="worker processes")
    toy.set_defaults(func=_toy)
