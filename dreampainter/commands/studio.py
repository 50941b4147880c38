"""``dreampainter studio``: the local web page (Gradio) over one loaded pipeline."""

from __future__ import annotations

import argparse

from dreampainter.commands.common import add_device_arguments, device_and_dtype
from dreampainter.errors import InvalidInputError

INSTALL_HINT = "the studio needs gradio: pip install 'dreampainter[studio]'"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "studio",
        help="a local web page: upload a product and references, place it, generate, download",
        description="Serve DreamPainter Studio, a web page over one loaded pipeline: product cut-out or photo "
        "(+ mask, or an automatic mask on plain backgrounds) with an editable mask, placement on a canvas, prompt "
        "and references, results with their settings and full-size PNG downloads. Binds 127.0.0.1 unless --host "
        "says otherwise; generations are queued and run one at a time.",
    )
    parser.add_argument("--pipeline", required=True, help="a pipeline folder written by save_pretrained")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free)"
    )
    parser.add_argument(
        "--share", action="store_true", help="also open a public gradio.live link (off unless asked)"
    )
    parser.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload in MB (default 50)")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="largest image in pixels (default: the project's decode limit)",
    )
    parser.add_argument(
        "--steps", type=int, default=30, help="the page's starting number of steps (default 30)"
    )
    parser.add_argument(
        "--canvas-side",
        type=int,
        default=512,
        help="the page's starting canvas long side in px (default 512)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="the page's starting model resolution (about RESOLUTION^2 pixels; default: the canvas size)",
    )
    add_device_arguments(parser, auto="cuda when available")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401 - only to say how to install it when missing
    except ImportError:
        raise InvalidInputError(INSTALL_HINT) from None
    from dreampainter.data.decode import DEFAULT_MAX_PIXELS
    from dreampainter.studio.inputs import Limits, Placement
    from dreampainter.studio.service import StudioRequest, StudioService

    if args.max_upload_mb <= 0:
        raise InvalidInputError(f"--max-upload-mb: must be positive, got {args.max_upload_mb}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise InvalidInputError(f"--max-pixels: must be positive, got {args.max_pixels}")
    for flag, value in (
        ("--steps", args.steps),
        ("--canvas-side", args.canvas_side),
        ("--resolution", args.resolution),
    ):
        if value is not None and value < 1:
            raise InvalidInputError(f"{flag}: must be positive, got {value}")
    device, dtype = device_and_dtype(args.device, args.dtype)
    limits = Limits(
        max_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS
    )
    defaults = StudioRequest(
        num_inference_steps=args.steps,
        resolution=args.resolution,
        placement=Placement(canvas="1:1", long_side=args.canvas_side),
    )
    service = StudioService.from_pretrained(args.pipeline, device, dtype, limits=limits)
    from dreampainter.studio.app import launch

    app = launch(service, host=args.host, port=args.port, share=args.share, defaults=defaults, block=False)
    print(f"DreamPainter Studio on {app.local_url} (device {device}, {dtype}); Ctrl+C stops it", flush=True)
    if app.share_url:
        print(f"public link: {app.share_url}", flush=True)
    app.block_thread()
    return 0
