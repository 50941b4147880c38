"""``dreampainter assemble``: a DreamPainterPipeline folder from public weights, without the trainer."""

from __future__ import annotations

import argparse

from dreampainter.errors import InvalidInputError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "assemble",
        help="build a pipeline folder from SD inpainting + a CLIP image encoder + an IP-Adapter (+ LoRA)",
        description="Assemble a DreamPainterPipeline from local public weights and save it with save_pretrained "
        "(load it with DreamPainterPipeline.from_pretrained or `dreampainter generate --pipeline`). Nothing is "
        "downloaded.",
    )
    parser.add_argument(
        "--base", required=True, help="SD inpainting: a diffusers folder, or one .safetensors / .ckpt file"
    )
    parser.add_argument(
        "--base-config", help="for a single-file --base: a local diffusers folder to take the configs from"
    )
    parser.add_argument(
        "--reference-encoder",
        help="CLIP image encoder: a transformers CLIPVisionModelWithProjection folder, or an open_clip file",
    )
    parser.add_argument("--open-clip-model", help="the open_clip architecture of an open_clip file (e.g. ViT-H-14)")
    parser.add_argument(
        "--adapter", help="an IP-Adapter file (.safetensors / .bin; linear or Plus) or a DreamPainter adapter folder"
    )
    parser.add_argument("--adapter-scale", type=float, default=None, help="attention-level reference weight (default 1)")
    parser.add_argument("--lora", help="a LoRA file or folder (peft / diffusers format)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="LoRA weight (default 1)")
    parser.add_argument(
        "--fuse-lora",
        action="store_true",
        help="fuse the LoRA into the weights (required with --lora: a saved pipeline holds plain weights)",
    )
    parser.add_argument("--out", required=True, help="the pipeline folder to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dreampainter.pipelines import DreamPainterPipeline

    if args.lora is None and (args.fuse_lora or args.lora_scale != 1.0):
        raise InvalidInputError("--fuse-lora / --lora-scale: only with --lora")
    if args.lora is not None and not args.fuse_lora:
        raise InvalidInputError(
            f"--lora {args.lora}: add --fuse-lora; a saved pipeline holds plain weights (attach a LoRA at load "
            "time with DreamPainterPipeline.from_parts(..., fuse_lora=False))"
        )
    pipe = DreamPainterPipeline.from_parts(
        args.base,
        base_config=args.base_config,
        reference_encoder=args.reference_encoder,
        open_clip_model=args.open_clip_model,
        adapter=args.adapter,
        adapter_scale=args.adapter_scale,
        lora=args.lora,
        lora_scale=args.lora_scale,
        fuse_lora=True,
    )
    pipe.save_pretrained(args.out)
    kind = "text and reference" if pipe.reference_encoder is not None else "text only"
    print(f"saved pipeline ({kind}) to {args.out}")
    return 0
