"""``dreampainter generate``: product photo + prompt (+ reference) -> new backgrounds, from a saved pipeline."""

from __future__ import annotations

import argparse

from dreampainter.commands.common import add_device_arguments, device_and_dtype
from dreampainter.errors import InvalidInputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="paint a new background around a product (one image, or a JSONL batch)",
        description="Paint a new background around a product from a prompt and an optional reference image. "
        "Saves the results and a side-by-side grid (input, mask, reference, results).",
    )
    parser.add_argument("--pipeline", required=True, help="a pipeline folder written by save_pretrained")
    source = parser.add_argument_group("one job (or use --batch)")
    source.add_argument(
        "--image", help="product photo: RGB with --mask, or an RGBA cut-out whose alpha is the product"
    )
    source.add_argument("--mask", help="product mask (white = product; 0/1, 0/255 or soft edges)")
    source.add_argument("--prompt", help="the background to paint")
    source.add_argument("--reference", help="background reference image (optional: text only without it)")
    source.add_argument("--negative-prompt", help="what to avoid")
    source.add_argument("--prompt-2", help="SDXL: the second text encoder's prompt (default: --prompt)")
    source.add_argument(
        "--negative-prompt-2", help="SDXL: the second text encoder's negative prompt (default: --negative-prompt)"
    )
    parser.add_argument(
        "--batch",
        help="JSONL file, one job a line: image, prompt, and optionally mask, reference, name, and any "
        "generation setting by its pipeline name (num_inference_steps, seed, text_guidance_scale, "
        "reference_guidance_scale, reference_guidance_interval, reference_guidance_every, reference_scale, "
        "negative_prompt, prompt_2, negative_prompt_2, resolution, feather_radius, "
        "product_dilation, num, paste_product, max_pixels); the flags below are the defaults",
    )
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--text-guidance", type=float, default=7.5, help="text guidance scale s_text (default 7.5)"
    )
    parser.add_argument(
        "--reference-guidance",
        type=float,
        default=None,
        help="reference guidance scale s_ref (default: = s_text, plain two-branch guidance)",
    )
    parser.add_argument(
        "--reference-guidance-interval",
        type=float,
        nargs=2,
        metavar=("START", "END"),
        default=None,
        help="run the branch measuring the reference (s_text != s_ref) only in these fractions of the steps, "
        "e.g. 0 0.5; outside it the reference is guided at s_text (default: all steps)",
    )
    parser.add_argument(
        "--reference-guidance-every",
        type=int,
        default=1,
        help="run that branch every k-th step, reusing its last delta between (default 1: every step)",
    )
    parser.add_argument(
        "--reference-scale",
        type=float,
        default=None,
        help="attention-level reference weight (default: as saved in the pipeline)",
    )
    parser.add_argument("--num", type=int, default=1, help="images per job (default 1)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="process at about RESOLUTION^2 pixels (default: the input size); results keep the input size",
    )
    parser.add_argument(
        "--feather", type=float, default=2.0, help="feather radius in pixels when pasting the product back"
    )
    parser.add_argument(
        "--no-paste", action="store_true", help="do not paste the product's pixels back from the input"
    )
    parser.add_argument(
        "--product-dilation", type=int, default=0, help="grow the product mask by this many pixels"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=None, help="refuse input images above this many pixels"
    )
    add_device_arguments(parser, auto="cuda when available")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (or an image path for one job: PATH, PATH_<k> for --num > 1, PATH_grid.png)",
    )
    parser.set_defaults(func=run)


# JobSettings field -> the command-line flag that sets it (errors name the flag)
SETTING_FLAGS = {
    "num_inference_steps": "--steps",
    "seed": "--seed",
    "text_guidance_scale": "--text-guidance",
    "reference_guidance_scale": "--reference-guidance",
    "reference_scale": "--reference-scale",
    "reference_guidance_interval": "--reference-guidance-interval",
    "reference_guidance_every": "--reference-guidance-every",
    "negative_prompt": "--negative-prompt",
    "negative_prompt_2": "--negative-prompt-2",
    "num": "--num",
    "resolution": "--resolution",
    "feather_radius": "--feather",
    "paste_product": "--no-paste",
    "product_dilation": "--product-dilation",
    "max_pixels": "--max-pixels",
}


def _settings(args: argparse.Namespace):
    """The :class:`JobSettings` the flags give (the defaults of every job); errors name the flag."""
    from dreampainter.pipelines.jobs import JobSettings
    from dreampainter.utils.config import ConfigValueError

    try:
        return JobSettings(
            num_inference_steps=args.steps,
            seed=args.seed,
            text_guidance_scale=args.text_guidance,
            reference_guidance_scale=args.reference_guidance,
            reference_scale=args.reference_scale,
            reference_guidance_interval=args.reference_guidance_interval,
            reference_guidance_every=args.reference_guidance_every,
            negative_prompt=args.negative_prompt,
            negative_prompt_2=args.negative_prompt_2,
            num=args.num,
            resolution=args.resolution,
            feather_radius=args.feather,
            paste_product=not args.no_paste,
            product_dilation=args.product_dilation,
            max_pixels=args.max_pixels,
        )
    except ConfigValueError as error:
        raise InvalidInputError(f"{SETTING_FLAGS.get(error.key, error.key)}: {error.problem}") from None


def _jobs(args: argparse.Namespace):
    import dataclasses

    from dreampainter.pipelines.jobs import GenerationJob, read_jobs

    settings = _settings(args)
    if args.batch:
        given = [
            name for name in ("image", "mask", "prompt", "prompt_2", "reference") if getattr(args, name) is not None
        ]
        if given:
            raise InvalidInputError(
                f"--batch: cannot be combined with --{', --'.join(n.replace('_', '-') for n in given)} (put them in the JSONL)"
            )
        jobs = read_jobs(args.batch, settings)
        if len(jobs) > 1 and args.out.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
            raise InvalidInputError(
                f"--out: must be a folder for a batch of {len(jobs)} jobs, got {args.out}"
            )
        return jobs
    for name in ("image", "prompt"):
        if getattr(args, name) is None:
            raise InvalidInputError(f"--{name}: required (or give --batch)")
    values = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    job = GenerationJob(
        image=args.image, mask=args.mask, prompt=args.prompt, prompt_2=args.prompt_2, reference=args.reference,
        **values,
    )  # fmt: skip
    return [job.validate()]


def run(args: argparse.Namespace) -> int:
    from dreampainter.pipelines import DreamPainterPipeline
    from dreampainter.pipelines.jobs import check_job_inputs, run_jobs

    jobs = _jobs(args)
    device, dtype = device_and_dtype(args.device, args.dtype)
    check_job_inputs(jobs)
    _check_backbone_options(args.pipeline, jobs)
    pipe = DreamPainterPipeline.from_pretrained(args.pipeline, torch_dtype=dtype).to(device)
    written = run_jobs(pipe, jobs, args.out, device)
    print(f"wrote {len(written)} files for {len(jobs)} job(s) under {args.out}")
    return 0


def _check_backbone_options(folder: str, jobs) -> None:
    """SDXL-only options on an SD pipeline fail before any weight is loaded (the folder's UNet config tells)."""
    from pathlib import Path

    from dreampainter.models.backbones import backbone_for_folder

    if not (Path(folder) / "unet" / "config.json").is_file():
        return  # from_pretrained names what is missing
    backbone = backbone_for_folder(folder)
    if backbone.uses_pooled_text:
        return
    for name in ("prompt_2", "negative_prompt_2"):
        if any(getattr(job, name) is not None for job in jobs):
            raise InvalidInputError(f"{name}: only SDXL pipelines take it; {folder} is {backbone.description}")
