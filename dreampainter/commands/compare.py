"""``dreampainter compare``: several systems on one benchmark split, one table (also ``accelerate launch scripts/compare.py``)."""

from __future__ import annotations

import argparse

from dreampainter.commands.common import add_device_arguments, device_and_dtype


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="run several systems on the same benchmark samples and compare them",
        description="Run every system of a systems file (DreamPainter pipelines, diffusers inpainting with or "
        "without an IP-Adapter, the reference-paste baseline, the input photo) on the same benchmark samples "
        "with the same per-sample seeds and settings, score them with the same metrics, and write "
        "comparison.md / comparison.json (paired statistics against a reference system) and a contact sheet. "
        "Under `accelerate launch scripts/compare.py` the samples are split across processes.",
    )
    parser.add_argument("--systems", required=True, help="systems YAML (see configs/compare_systems.yaml)")
    parser.add_argument(
        "--data", required=True, help="benchmark shards: folder, index.json, brace pattern or URLs"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--limit", type=int, help="compare on the first N samples of the benchmark only")
    parser.add_argument(
        "--reference-system",
        help="the system the paired statistics compare against (default: the file's, else the first)",
    )
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dreampainter.data.shards.sources import resolve_shards
    from dreampainter.evaluation.compare import load_compare_file, run_comparison
    from dreampainter.evaluation.runner import ProcessGroup

    overrides = [] if args.limit is None else [f"benchmark.limit={args.limit}"]
    compare = load_compare_file(args.systems, overrides, reference_system=args.reference_system)
    resolve_shards(args.data)  # a missing benchmark fails before any model loads
    group = ProcessGroup.from_accelerate()
    device, dtype = device_and_dtype(args.device, args.dtype, str(group.device))
    group.device = device
    report = run_comparison(compare, args.data, args.out, group=group, device=device, dtype=dtype)
    if report is not None:
        ran = report["counts"]
        print(
            f"compared {ran['systems_run']} of {ran['systems']} system(s) on {ran.get('evaluated', 0)} samples "
            f"on {ran['processes']} process(es); wrote {args.out}/comparison.md"
        )
    return 0
