"""``dreampainter evaluate``: score a saved pipeline on benchmark shards (also ``accelerate launch scripts/evaluate.py``)."""

from __future__ import annotations

import argparse
import sys

from dreampainter.commands.common import add_device_arguments, device_and_dtype


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="generate for every benchmark sample and compute the metrics",
        description="Generate a result for every benchmark sample with fixed per-sample seeds (and the "
        "no-reference / shuffled-reference controls), compute the metrics, and write metrics.json, "
        "per_sample.csv, a contact sheet and the result images. Under `accelerate launch "
        "scripts/evaluate.py` the samples are split across processes with the same results.",
    )
    parser.add_argument("--pipeline", required=True, help="a pipeline folder written by save_pretrained")
    parser.add_argument(
        "--data", required=True, help="benchmark shards: folder, index.json, brace pattern or URLs"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--config", help="YAML with an `evaluation` section (metrics, backbones) and a `benchmark` section"
    )
    parser.add_argument("--metrics", help="comma-separated metric names (default: from the config)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples of the benchmark")
    parser.add_argument(
        "--controls", help="comma-separated: no_reference, shuffled_reference, or none (default: both)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: config, else 30)")
    parser.add_argument("--seed", type=int, help="base seed; each sample's seed derives from it and its key")
    parser.add_argument("--batch-size", type=int, help="images per pipeline call (default: config, else 4)")
    parser.add_argument("--contact-metric", help="per-sample metric for the best/worst contact sheet")
    parser.add_argument(
        "--no-images", action="store_true", help="do not save result images (no contact sheet)"
    )
    add_device_arguments(parser)
    parser.set_defaults(func=run)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# command-line flag -> the benchmark setting it overrides
SETTING_FLAGS = {
    "limit": "--limit",
    "num_inference_steps": "--steps",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "contact_metric": "--contact-metric",
    "controls": "--controls",
    "save_images": "--no-images",
}


def load_evaluate_config(args: argparse.Namespace):
    """The (EvaluationConfig, BenchmarkSettings) from ``--config`` with the command-line overrides."""
    import dataclasses

    from dreampainter.errors import InvalidInputError
    from dreampainter.evaluation.runner import load_evaluation_file
    from dreampainter.utils.config import ConfigValueError

    evaluation, settings = load_evaluation_file(args.config)
    if args.metrics is not None:
        evaluation.metrics = _split(args.metrics)
    given = {
        "limit": args.limit,
        "num_inference_steps": args.steps,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "contact_metric": args.contact_metric,
    }
    changes = {key: value for key, value in given.items() if value is not None}
    if args.controls is not None:
        controls = _split(args.controls)
        changes["controls"] = [] if controls == ["none"] else controls
    if args.no_images:
        changes["save_images"] = False
    try:
        return evaluation, dataclasses.replace(settings, **changes)
    except ConfigValueError as error:
        raise InvalidInputError(f"{SETTING_FLAGS.get(error.key, error.key)}: {error.problem}") from None


def run(args: argparse.Namespace) -> int:
    from dreampainter.data.shards.sources import resolve_shards
    from dreampainter.evaluation.runner import (
        CONTROLS,
        MAIN_RUN,
        ProcessGroup,
        build_run_suites,
        check_pipeline_folder,
        load_pipeline,
        run_benchmark,
    )

    evaluation, settings = load_evaluate_config(args)
    resolve_shards(args.data)  # a missing benchmark fails before any model loads
    check_pipeline_folder(args.pipeline)
    group = ProcessGroup.from_accelerate()
    device, dtype = device_and_dtype(args.device, args.dtype, str(group.device))
    group.device = device
    suites = build_run_suites([MAIN_RUN, *[c for c in CONTROLS if c in settings.controls]], evaluation, group)
    if group.is_main:
        for name, reason in suites[MAIN_RUN].skipped.items():
            print(f"warning: metric {name} skipped: {reason}", file=sys.stderr)
    pipe = load_pipeline(args.pipeline, device, dtype)
    report = run_benchmark(
        pipe,
        args.data,
        args.out,
        evaluation,
        settings,
        group=group,
        suites=suites,
        pipeline_name=args.pipeline,
    )
    if report is not None:
        counts = report["counts"]
        print(
            f"evaluated {counts['evaluated']} of {counts['listed']} samples ({counts['bad']} bad) "
            f"in {counts['runs']} run(s) on {counts['processes']} process(es); wrote {args.out}/metrics.json"
        )
        for row in report["runs"]:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in row["values"].items() if isinstance(v, float))
            print(f"  {row['run']}: {shown}")
    return 0
