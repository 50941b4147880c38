"""The studio's page (Gradio Blocks) over a :class:`StudioService`; ``launch`` serves it.

The page only wires controls to ``inputs`` / ``service``: product upload -> placement preview with the mask
tinted over the photo in an editor (paint pink to add, blue to remove; the eraser removes strokes; "Apply mask
edits", or Generate, applies them) -> conditions -> a gallery of results
with their settings, a full-size PNG download and "use these settings". Errors are one line in the
page's status box (and a toast); the server keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import gradio as gr
import numpy as np

from dreampainter.errors import DreamPainterError, InvalidInputError
from dreampainter.models import reference_layers
from dreampainter.pipelines.image_processing import ProductInput, prepare_product_input
from dreampainter.studio.inputs import (
    BACKGROUND_COLOUR,
    CANVAS_CHOICES,
    PRODUCT_COLOUR,
    Placement,
    ProductKind,
    apply_mask_edits,
    hex_colour,
    load_product,
    mask_overlay,
    place_product,
)
from dreampainter.studio.service import (
    ReferenceMode,
    ReferencePreset,
    StudioRequest,
    StudioService,
    load_references,
)

logger = logging.getLogger(__name__)

STATUS_READY = "Ready: upload a product (a transparent PNG cut-out, or a photo)."
PRODUCT_KINDS = [
    ("cut-out (transparent PNG)", ProductKind.cutout.value),
    ("photo + mask", ProductKind.photo_mask.value),
    ("photo, automatic mask (plain background)", ProductKind.photo_auto.value),
]
REFERENCE_PRESETS = [
    ("all layers", ReferencePreset.all.value),
    ("layout", ReferencePreset.layout.value),
    ("style", ReferencePreset.style.value),
    ("layout + style", ReferencePreset.both.value),
]
REFERENCE_MODES = [
    ("use the chosen one", ReferenceMode.one.value),
    ("one run per reference", ReferenceMode.each.value),
]


def error_status(error: Exception) -> str:
    """The one line the page shows for a failed action (never a traceback)."""
    if isinstance(error, DreamPainterError):
        message = str(error)
    else:
        logger.exception("studio: unexpected error")
        message = f"unexpected {type(error).__name__}: {error}".splitlines()[0]
    gr.Warning(message)
    return f"**Error:** {message}"


def guarded(outputs: int):
    """Run a page handler; on an error return the error line for the status box (last output), skip the rest."""

    def decorate(handler):
        @functools.wraps(handler)
        def run(*args, **kwargs):
            try:
                return handler(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - shown in the page, the server keeps serving
                return (*[gr.skip()] * (outputs - 1), error_status(error))

        return run

    return decorate


def placement_from(canvas, long_side, width, height, scale, x, y, margin) -> Placement:
    """The placement controls' values as a :class:`Placement` (empty numbers fall back to the defaults)."""
    defaults = Placement()
    return Placement(
        canvas=canvas or defaults.canvas,
        long_side=int(long_side or defaults.long_side),
        width=int(width or defaults.width),
        height=int(height or defaults.height),
        scale=float(scale),
        position=(float(x), float(y)),
        margin=float(margin),
    )


def saved_reference_scale(service: StudioService) -> float:
    """The attention-level reference scale saved in the pipeline (the slider's start); 1.0 without adapter."""
    layers = list(reference_layers(service.pipe.unet).values())
    return float(getattr(layers[0], "reference_scale", 1.0)) if layers else 1.0


def editor_view(product: ProductInput) -> dict[str, Any]:
    """The editor's value for a product: the photo with its mask tinted, no strokes yet."""
    overlay = mask_overlay(product)
    return {"background": overlay, "layers": [], "composite": overlay}


def edited_product(product: ProductInput, editor_value: dict | None) -> tuple[ProductInput, int]:
    """The product with the editor's strokes applied to its mask, and how many mask pixels they changed."""
    layers = (editor_value or {}).get("layers") or []
    mask = apply_mask_edits(product.product_mask, layers[0] if layers else None)
    changed = int(np.count_nonzero(mask != product.product_mask))
    if not changed:
        return product, 0
    return prepare_product_input(product.image, mask, name="product", mask_name="edited mask"), changed


def build_app(service: StudioService, defaults: StudioRequest | None = None) -> gr.Blocks:
    """The studio page for ``service``; ``defaults`` sets the controls' starting values."""
    defaults = defaults or StudioRequest()
    placement = defaults.placement
    with gr.Blocks(title="DreamPainter Studio", analytics_enabled=False) as app:
        gr.Markdown(
            "# DreamPainter Studio\nA new background around your product, from a prompt and reference images."
        )
        status = gr.Markdown(STATUS_READY, elem_id="studio-status")
        product_state = gr.State(None)  # the placed ProductInput (exact mask) the editor shows
        results_state = gr.State([])  # [(png path, settings dict)] of the gallery
        with gr.Row():
            with gr.Column(scale=1):
                gr.Markdown("### 1. Product")
                kind = gr.Radio(PRODUCT_KINDS, value=ProductKind.cutout.value, label="Product comes as")
                product_file = gr.File(label="Product image", file_types=["image"], elem_id="product-file")
                mask_file = gr.File(
                    label="Mask (white = product)", file_types=["image"], visible=False, elem_id="mask-file"
                )
                with gr.Accordion("Placement", open=True):
                    canvas = gr.Radio(
                        list(CANVAS_CHOICES), value=placement.canvas, label="Canvas", elem_id="canvas"
                    )
                    long_side = gr.Number(placement.long_side, label="Canvas long side (px)", precision=0)
                    with gr.Row():
                        width = gr.Number(placement.width, label="Custom width", precision=0)
                        height = gr.Number(placement.height, label="Custom height", precision=0)
                    scale = gr.Slider(
                        0.05, 1.0, placement.scale, step=0.01, label="Product scale", elem_id="scale"
                    )
                    with gr.Row():
                        pos_x = gr.Slider(
                            0.0,
                            1.0,
                            placement.position[0],
                            step=0.01,
                            label="Position x",
                            elem_id="position-x",
                        )
                        pos_y = gr.Slider(
                            0.0,
                            1.0,
                            placement.position[1],
                            step=0.01,
                            label="Position y",
                            elem_id="position-y",
                        )
                    margin = gr.Slider(
                        0.0, 0.45, placement.margin, step=0.01, label="Margin", elem_id="margin"
                    )
                editor = gr.ImageEditor(
                    label="Product mask (tinted) over the photo: paint pink to add, blue to remove, then apply",
                    type="numpy",
                    image_mode="RGBA",
                    format="png",
                    sources=[],
                    transforms=[],
                    layers=False,
                    brush=gr.Brush(
                        colors=[hex_colour(PRODUCT_COLOUR), hex_colour(BACKGROUND_COLOUR)],
                        default_color=hex_colour(PRODUCT_COLOUR),
                        color_mode="fixed",
                    ),
                    elem_id="mask-editor",
                )
                apply_edits = gr.Button("Apply mask edits", size="sm", elem_id="apply-mask")
            with gr.Column(scale=1):
                gr.Markdown("### 2. Conditions")
                prompt = gr.Textbox(
                    defaults.prompt, label="Prompt (English or Chinese)", lines=2, elem_id="prompt"
                )
                negative = gr.Textbox(defaults.negative_prompt or "", label="Negative prompt")
                reference_files = gr.File(
                    label="Reference images (zero or more)",
                    file_count="multiple",
                    file_types=["image"],
                    elem_id="reference-files",
                )
                with gr.Row():
                    reference_mode = gr.Radio(
                        REFERENCE_MODES, value=defaults.reference_mode.value, label="References"
                    )
                    reference_index = gr.Dropdown(choices=[], label="Chosen reference", type="index")
                text_guidance = gr.Slider(
                    0.0, 15.0, defaults.text_guidance_scale, step=0.5, label="Text guidance"
                )
                reference_guidance = gr.Slider(
                    0.0, 15.0, defaults.reference_guidance_scale or defaults.text_guidance_scale, step=0.5,
                    label="Reference guidance",
                )  # fmt: skip
                reference_scale = gr.Slider(
                    0.0, 2.0, defaults.reference_scale or saved_reference_scale(service), step=0.05,
                    label="Reference scale (attention level)",
                )  # fmt: skip
                reference_preset = gr.Radio(
                    REFERENCE_PRESETS,
                    value=defaults.reference_preset.value,
                    label="Reference scale applies to",
                )
                with gr.Row():
                    steps = gr.Slider(1, 100, defaults.num_inference_steps, step=1, label="Steps")
                    seed = gr.Number(defaults.seed, label="Seed", precision=0)
                    num_images = gr.Slider(1, 8, defaults.num_images, step=1, label="Images")
                resolution = gr.Number(
                    defaults.resolution or 0, label="Model resolution (px; 0 = canvas size)", precision=0
                )
                compare = gr.Checkbox(
                    defaults.compare_without_reference, label="Compare with / without reference"
                )
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=1):
                gr.Markdown("### 3. Results")
                gallery = gr.Gallery(
                    label="Results", format="png", columns=2, elem_id="results", interactive=False
                )
                download = gr.DownloadButton(
                    "Download PNG", value=None, interactive=False, elem_id="download"
                )
                settings_view = gr.JSON(label="Settings of the selected result", elem_id="settings")
                use_settings = gr.Button("Use these settings", elem_id="use-settings")

        placement_controls = [canvas, long_side, width, height, scale, pos_x, pos_y, margin]

        @guarded(outputs=3)
        def preview(kind_value, product_path, mask_path, *placement_values):
            if product_path is None:
                return None, None, STATUS_READY
            product = load_product(kind_value, product_path, mask_path, service.limits)
            placed = place_product(product, placement_from(*placement_values), service.limits)
            width_, height_ = placed.size
            return (
                placed,
                editor_view(placed),
                f"Product ready: {width_}x{height_} canvas. Set the conditions, then Generate.",
            )

        preview_inputs = [kind, product_file, mask_file, *placement_controls]
        preview_outputs = [product_state, editor, status]
        for trigger in (kind.change, product_file.change, mask_file.change, canvas.change, long_side.submit,
                        width.submit, height.submit, scale.release, pos_x.release, pos_y.release, margin.release):  # fmt: skip
            trigger(preview, preview_inputs, preview_outputs, concurrency_limit=4, show_progress="minimal")
        kind.change(
            lambda value: gr.update(visible=value == ProductKind.photo_mask.value),
            kind,
            mask_file,
            queue=False,
        )

        @guarded(outputs=3)
        def apply(product, editor_value):
            if product is None:
                raise InvalidInputError("mask: upload a product first")
            product, changed = edited_product(product, editor_value)
            return product, editor_view(product), f"Mask edits applied: {changed} pixels changed."

        apply_edits.click(
            apply, [product_state, editor], [product_state, editor, status], concurrency_limit=4
        )

        def list_references(paths):
            names = [os.path.basename(path) for path in paths or []]
            return gr.update(choices=names, value=names[0] if names else None)

        reference_files.change(list_references, reference_files, reference_index, queue=False)

        @guarded(outputs=5)
        def run(
            product, editor_value, reference_paths, prompt_value, negative_value, mode, index, s_text, s_ref,
            ref_scale, preset, steps_value, seed_value, num, resolution_value, compare_value, *placement_values,
            progress=gr.Progress(),  # noqa: B008 - gradio's way to ask for progress
        ):  # fmt: skip
            if product is None:
                raise InvalidInputError("product: upload a product first")
            product, changed = edited_product(product, editor_value)
            request = StudioRequest.from_dict(
                {
                    "prompt": prompt_value or "",
                    "negative_prompt": negative_value or None,
                    "reference_mode": mode,
                    "reference_index": int(index or 0),
                    "text_guidance_scale": float(s_text),
                    "reference_guidance_scale": float(s_ref),
                    "reference_scale": float(ref_scale),
                    "reference_preset": preset,
                    "num_inference_steps": int(steps_value),
                    "seed": int(seed_value or 0),
                    "num_images": int(num),
                    "resolution": int(resolution_value) if resolution_value else None,
                    "compare_without_reference": bool(compare_value),
                    "placement": vars(placement_from(*placement_values)),
                },
                "page",
            )
            references = load_references(reference_paths or [], service.limits)
            progress(0, desc="starting")
            results = service.generate(
                product,
                references,
                request,
                progress=lambda done, total, what: progress(
                    (done, total), desc=f"generating ({what})", unit="steps"
                ),
            )
            gallery_value = [(result.image, result.caption) for result in results]
            first = results[0]
            message = f"Generated {len(results)} image(s). Select one to see its settings; download saves the full-size PNG."
            if changed:
                message += f" (mask edited: {changed} pixels changed)"
            return (
                gallery_value,
                [(str(result.path), result.settings) for result in results],
                gr.update(value=str(first.path), interactive=True),
                first.settings,
                message,
            )

        generate.click(
            run,
            [product_state, editor, reference_files, prompt, negative, reference_mode, reference_index,
             text_guidance, reference_guidance, reference_scale, reference_preset, steps, seed, num_images,
             resolution, compare, *placement_controls],
            [gallery, results_state, download, settings_view, status],
            concurrency_id="model",
            concurrency_limit=1,
        )  # fmt: skip

        def select(results, event: gr.SelectData):
            if not results or event.index is None or event.index >= len(results):
                return gr.skip(), gr.skip()
            path, settings = results[event.index]
            return gr.update(value=path, interactive=True), settings

        gallery.select(select, results_state, [download, settings_view], queue=False)

        setting_outputs = [prompt, negative, text_guidance, reference_guidance, reference_scale, reference_preset,
                           steps, seed, num_images, resolution, reference_mode, reference_index, *placement_controls]  # fmt: skip

        @guarded(outputs=len(setting_outputs) + 1)
        def reuse(settings: dict[str, Any] | None):
            if not settings:
                raise InvalidInputError("settings: generate and select a result first")
            values = {key: value for key, value in settings.items() if key != "reference"}
            request = StudioRequest.from_dict(values, "settings")
            where = request.placement
            return (
                request.prompt,
                request.negative_prompt or "",
                request.text_guidance_scale,
                request.reference_guidance_scale if request.reference_guidance_scale is not None else request.text_guidance_scale,
                request.reference_scale if request.reference_scale is not None else saved_reference_scale(service),
                request.reference_preset.value,
                request.num_inference_steps,
                request.seed,
                request.num_images,
                request.resolution or 0,
                ReferenceMode.one.value,
                gr.skip() if settings.get("reference") is None else settings["reference"],
                where.canvas, where.long_side, where.width, where.height, where.scale, where.position[0],
                where.position[1], where.margin,
                "Settings loaded; Generate makes that image again (with the same uploads).",
            )  # fmt: skip

        use_settings.click(reuse, settings_view, [*setting_outputs, status], queue=False)
    return app


def launch(
    service: StudioService,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    defaults: StudioRequest | None = None,
    block: bool = True,
    max_queue: int = 32,
):
    """Serve the page: one model, a queue (generations run one at a time), uploads within the service's limits."""
    app = build_app(service, defaults)
    app.queue(max_size=max_queue, default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=service.limits.max_bytes,
        show_error=False,
        quiet=True,
        ssr_mode=False,
        footer_links=[],
        prevent_thread_lock=not block,
    )
    return app
