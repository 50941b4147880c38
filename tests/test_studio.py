"""DreamPainter Studio without a browser: uploads and limits, masks (alpha, given, automatic, edited),
placement with margin, reference-scale presets, generation, per-result settings, the command without gradio."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreampainter.errors import InvalidInputError
from dreampainter.models import reference_layers, set_reference_scale
from dreampainter.studio.inputs import (
    BACKGROUND_COLOUR,
    PRODUCT_COLOUR,
    Limits,
    Placement,
    apply_mask_edits,
    auto_mask,
    fit_in_margin,
    load_product,
    place_product,
)
from dreampainter.studio.service import (
    ReferencePreset,
    StudioRequest,
    StudioService,
    block_scales,
    load_references,
)
from dreampainter.toy.pipeline import build_tiny_pipeline


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    rng = np.random.default_rng(0)
    cutout = np.zeros((40, 30, 4), np.uint8)
    cutout[..., :3] = rng.integers(0, 256, (40, 30, 3))
    cutout[6:34, 5:25, 3] = 255
    Image.fromarray(cutout, "RGBA").save(root / "cutout.png")
    photo = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    mask = np.zeros((30, 44), np.uint8)
    mask[8:22, 12:30] = 255
    Image.fromarray(photo).save(root / "photo.png")
    Image.fromarray(mask).save(root / "mask.png")
    plain = np.full((96, 96, 3), 235, np.uint8)
    plain[30:70, 36:60] = (180, 40, 30)
    Image.fromarray(plain).save(root / "plain.png")
    Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(root / "ref.png")
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    return root


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio_pipe")
    return StudioService(build_tiny_pipeline(root / "tokenizer"), "cpu", out_dir=root / "out")


def test_load_product_kinds_and_limits(files):
    limits = Limits()
    cutout = load_product("cutout", files / "cutout.png", None, limits)
    assert cutout.size == (30, 40) and (cutout.product_mask == 255).sum() == 28 * 20
    photo = load_product("photo_mask", files / "photo.png", files / "mask.png", limits)
    assert np.array_equal(np.asarray(photo.image), np.asarray(Image.open(files / "photo.png")))
    with pytest.raises(InvalidInputError, match="product: not a decodable image"):
        load_product("cutout", files / "broken.png", None, limits)
    with pytest.raises(InvalidInputError, match="needs an alpha channel"):
        load_product("cutout", files / "photo.png", None, limits)
    with pytest.raises(InvalidInputError, match="mask: upload the product mask"):
        load_product("photo_mask", files / "photo.png", None, limits)
    with pytest.raises(InvalidInputError, match="over the upload limit"):
        load_product("cutout", files / "cutout.png", None, Limits(max_bytes=100))
    with pytest.raises(InvalidInputError, match="over the pixel limit of 1000"):
        load_product("cutout", files / "cutout.png", None, Limits(max_pixels=1000))
    with pytest.raises(InvalidInputError, match=r"reference 1 \(broken.png\): not a decodable image"):
        load_references([files / "broken.png"], limits)


def test_auto_mask_on_plain_background_and_refused_on_busy_one(files):
    product = load_product("photo_auto", files / "plain.png", None, Limits())
    expected = np.zeros((96, 96), bool)
    expected[30:70, 36:60] = True
    found = product.product_mask >= 128
    assert (found & expected).sum() / (found | expected).sum() > 0.95
    with pytest.raises(InvalidInputError, match="not plain enough"):
        auto_mask(Image.open(files / "photo.png"))


@pytest.mark.parametrize(
    ("canvas", "size"), [("1:1", (64, 64)), ("4:5", (48, 64)), ("3:4", (48, 64)), ("16:9", (64, 32))]
)
def test_canvas_presets(canvas, size):
    assert Placement(canvas=canvas, long_side=64).canvas_size((10, 10)) == size
    assert Placement(canvas="as uploaded").canvas_size((30, 44)) == (30, 44)
    assert Placement(canvas="custom", width=101, height=37).canvas_size((10, 10)) == (104, 40)


def test_placement_keeps_the_margin_and_the_product_pixels(files):
    limits = Limits()
    cutout = load_product("cutout", files / "cutout.png", None, limits)
    # Asked for the top-left corner at full scale: the product shrinks and moves inside a 10% margin.
    placed = place_product(
        cutout, Placement(canvas="1:1", long_side=80, scale=1.0, position=(0, 0), margin=0.1), limits
    )
    assert placed.size == (80, 80)
    rows, cols = np.nonzero(placed.product_mask)
    assert rows.min() >= 8 and cols.min() >= 8 and rows.max() < 72 and cols.max() < 72
    assert rows.min() <= 9 and cols.min() <= 9  # pushed against the margin, not centred
    scale, position = fit_in_margin((20, 28), (80, 80), 0.5, (0.5, 0.5), 0.1)
    assert scale == 0.5 and position == (0.5, 0.5)  # fits already: unchanged
    with pytest.raises(InvalidInputError, match="margin"):
        fit_in_margin((20, 28), (80, 80), 0.5, (0.5, 0.5), 0.5)
    with pytest.raises(InvalidInputError, match="canvas: 80x80 = 6400 pixels is over the limit"):
        place_product(cutout, Placement(canvas="1:1", long_side=80), Limits(max_pixels=5000))


def test_mask_edits_add_remove_and_keep_soft_values():
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 255
    mask[5:15, 5] = 200  # a soft edge
    strokes = np.zeros((40, 40, 4), np.uint8)  # the editor's layer, at twice the size
    strokes[0:4, 0:4] = (*PRODUCT_COLOUR, 255)  # add the top-left corner
    strokes[20:24, 20:24] = (*BACKGROUND_COLOUR, 255)  # remove the centre
    edited = apply_mask_edits(mask, strokes)
    assert (edited[0:2, 0:2] == 255).all() and (edited[10:12, 10:12] == 0).all()
    assert (edited[5:15, 5] == 200).all()  # untouched soft values stay exact
    assert np.count_nonzero(edited != mask) == 8
    assert apply_mask_edits(mask, None) is mask
    assert apply_mask_edits(mask, np.zeros((20, 20, 4), np.uint8)) is mask


def test_reference_presets_name_the_layout_and_style_blocks(service):
    unet = service.pipe.unet
    down = [i for i, block in enumerate(unet.down_blocks) if getattr(block, "attentions", None)]
    up = [i for i, block in enumerate(unet.up_blocks) if getattr(block, "attentions", None)]
    assert block_scales(unet, "all", 0.7) == 0.7
    assert block_scales(unet, "layout", 0.7) == {"down": {f"block_{down[-1]}": 0.7}}
    assert block_scales(unet, "style", 0.7) == {"up": {f"block_{up[0]}": 0.7}}
    both = block_scales(unet, ReferencePreset.both, 0.7)
    try:
        set_reference_scale(unet, both)
        scales = {name: attn.reference_scale for name, attn in reference_layers(unet).items()}
        on = {name for name, value in scales.items() if value == pytest.approx(0.7)}
        assert on and all(name.startswith((f"down_blocks.{down[-1]}.", f"up_blocks.{up[0]}.")) for name in on)
        assert all(value == 0.0 for name, value in scales.items() if name not in on)
    finally:
        set_reference_scale(unet, 1.0)


def test_generate_keeps_product_pixels_and_each_result_reproduces_alone(service, files):
    limits = Limits()
    placement = Placement(canvas="1:1", long_side=32, scale=0.7)
    product = place_product(load_product("cutout", files / "cutout.png", None, limits), placement, limits)
    references = load_references([files / "ref.png"], limits)
    request = StudioRequest(
        prompt="a marble table", num_inference_steps=2, num_images=2, compare_without_reference=True,
        reference_preset="style", reference_scale=0.8, placement=placement,
    )  # fmt: skip
    seen = []
    results = service.generate(
        product, references, request, progress=lambda done, total, what: seen.append(done)
    )
    assert seen == list(range(1, 9)) and [r.caption for r in results] == [
        "ref.png · seed 0", "ref.png · seed 1", "no reference · seed 0", "no reference · seed 1",
    ]  # fmt: skip
    full = product.product_mask == 255
    for result in results:
        pixels = np.asarray(Image.open(result.path))
        assert pixels.shape == (32, 32, 3)
        assert np.array_equal(pixels[full], np.asarray(product.image)[full])
    assert not np.array_equal(
        np.asarray(results[0].image), np.asarray(results[2].image)
    )  # the reference acts
    # "use these settings": the second image's settings alone make the same image.
    settings = dict(results[1].settings)
    assert settings.pop("reference") == "ref.png" and settings["seed"] == 1 and settings["num_images"] == 1
    again = service.generate(product, references, StudioRequest.from_dict(settings))
    assert len(again) == 1 and np.array_equal(np.asarray(again[0].image), np.asarray(results[1].image))


def test_generate_refuses_bad_requests_in_one_line(service, files):
    limits = Limits()
    product = load_product("photo_mask", files / "photo.png", files / "mask.png", limits)
    with pytest.raises(InvalidInputError, match="write a prompt or upload a reference"):
        service.generate(product, [], StudioRequest(num_inference_steps=1))
    with pytest.raises(InvalidInputError, match="number 3 chosen but 1 uploaded"):
        service.generate(
            product,
            load_references([files / "ref.png"], limits),
            StudioRequest(prompt="x", reference_index=2),
        )
    with pytest.raises(InvalidInputError, match="reference_preset"):
        StudioRequest.from_dict({"reference_preset": "texture"})


def test_the_cli_works_without_gradio_and_the_studio_command_says_how_to_install_it(tmp_path):
    """``import dreampainter`` and the other commands never need gradio; ``studio`` says what to install."""
    code = (
        "import sys; sys.modules['gradio'] = None\n"  # as if gradio were not installed
        "import dreampainter, dreampainter.studio, dreampainter.studio.service\n"
        "from dreampainter.cli import build_parser, main\n"
        "build_parser()\n"
        f"sys.exit(main(['studio', '--pipeline', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: the studio needs gradio: pip install 'dreampainter[studio]'"
    )
    assert "gradio" not in done.stdout


def test_studio_command_refuses_a_missing_pipeline_in_one_line(tmp_path, capsys):
    from dreampainter.cli import main

    assert main(["studio", "--pipeline", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "pipeline folder (model_index.json) not found" in capsys.readouterr().err


def test_runs_per_reference_and_one_text_only_run_to_compare(service, files):
    references = load_references([files / "ref.png", files / "ref.png"], Limits())
    runs = service.runs
    assert runs(StudioRequest(prompt="x"), []) == [None]
    assert runs(StudioRequest(prompt="x", reference_index=1), references) == [1]
    assert runs(StudioRequest(prompt="x", reference_mode="each"), references) == [0, 1]
    assert runs(StudioRequest(prompt="x", reference_mode="each", compare_without_reference=True), references) == [
        0, 1, None,
    ]  # fmt: skip
    assert runs(StudioRequest(prompt="x", compare_without_reference=True), []) == [None]


def test_a_chinese_prompt_generates_and_is_kept_in_the_settings(service, files):
    limits = Limits()
    product = load_product("photo_mask", files / "photo.png", files / "mask.png", limits)
    (result,) = service.generate(
        product, [], StudioRequest(prompt="大理石桌面，柔和的光", num_inference_steps=1)
    )
    assert result.settings["prompt"] == "大理石桌面，柔和的光" and result.image.size == (44, 30)


def test_an_sdxl_pipeline_generates_at_the_canvas_size_with_exact_product_pixels(tmp_path, files):
    """The studio is backbone-agnostic: an SDXL pipeline (two text encoders, size conditioning, buckets)
    generates on a 4:5 canvas, with the style preset, and keeps the product's pixels."""
    service = StudioService(build_tiny_pipeline(tmp_path / "tokenizer", backbone="sdxl"), "cpu", out_dir=tmp_path / "out")
    limits = Limits()
    placement = Placement(canvas="4:5", long_side=40, scale=0.7)
    product = place_product(load_product("cutout", files / "cutout.png", None, limits), placement, limits)
    request = StudioRequest(prompt="a marble table", num_inference_steps=2, reference_preset="style",
                            resolution=64, placement=placement)  # fmt: skip
    (result,) = service.generate(product, load_references([files / "ref.png"], limits), request)
    pixels = np.asarray(Image.open(result.path))
    assert pixels.shape == (40, 32, 3)
    full = product.product_mask == 255
    assert np.array_equal(pixels[full], np.asarray(product.image)[full])
