"""Pipeline inputs in pixel space: odd image formats, masks, sizes, compositing, cut-out placement, guidance plans."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.pipelines.guidance import TEXT, TEXT_REF, UNCOND, GuidancePlan
from dreampainter.pipelines.image_processing import (
    composite,
    feathered_alpha,
    inpainting_mask,
    place_cutout,
    prepare_product_input,
    processing_size,
    to_pil_image,
)


def _photo(width=40, height=30, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _product_mask(width=40, height=30) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[8:22, 10:30] = 255
    return mask


# ----------------------------------------------------------------------------- odd but valid inputs


def test_cmyk_grayscale_palette_16bit_files_decode_to_rgb(tmp_path):
    rgb = Image.fromarray(_photo())
    cases = {
        "cmyk.jpg": rgb.convert("CMYK"),
        "gray.png": rgb.convert("L"),
        "palette.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "sixteen.png": Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257),
    }
    mask = _product_mask()
    for name, image in cases.items():
        image.save(tmp_path / name)
        product = prepare_product_input(tmp_path / name, mask)
        assert product.image.mode == "RGB" and product.image.size == (40, 30), name
    sixteen = np.asarray(prepare_product_input(tmp_path / "sixteen.png", mask).image)
    gray = np.asarray(rgb.convert("L"))
    assert np.abs(sixteen[..., 0].astype(int) - gray).max() <= 1  # 16-bit scaled to 8 bits, not clipped


def test_exif_rotated_photo_is_upright_and_matches_an_upright_mask(tmp_path):
    stored = Image.fromarray(_photo(40, 30))  # stored landscape, EXIF says rotate 90° -> upright 30x40
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    upright_mask = np.zeros((40, 30), np.uint8)
    upright_mask[5:20, 5:25] = 255
    product = prepare_product_input(tmp_path / "rotated.jpg", upright_mask)
    assert product.image.size == (30, 40)
    with pytest.raises(InvalidInputError, match="mask is 40x30 but"):
        prepare_product_input(tmp_path / "rotated.jpg", _product_mask(40, 30))


@pytest.mark.parametrize("kind", ["0/1", "0/255", "antialiased", "bool", "float", "rgba-alpha"])
def test_mask_conventions_all_mean_255_is_product(kind):
    base = _product_mask()
    if kind == "0/1":
        mask = (base > 0).astype(np.uint8)
    elif kind == "0/255":
        mask = Image.fromarray(base)
    elif kind == "antialiased":
        mask = np.asarray(Image.fromarray(base).resize((80, 60)).resize((40, 30), Image.Resampling.BILINEAR))
    elif kind == "bool":
        mask = base > 0
    elif kind == "float":
        mask = base.astype(np.float32) / 255.0
    else:
        rgba = np.zeros((30, 40, 4), np.uint8)
        rgba[..., 3] = base
        mask = Image.fromarray(rgba)
    product = prepare_product_input(_photo(), mask)
    assert product.product_mask.dtype == np.uint8
    assert ((product.product_mask >= 128) == (base > 0)).all()
    assert product.product_mask[15, 20] == 255 and product.product_mask[0, 0] == 0


def test_rgba_cutout_alpha_is_the_product_mask():
    rgba = np.dstack([_photo(), _product_mask()])
    product = prepare_product_input(Image.fromarray(rgba))
    assert product.image.mode == "RGB"
    assert (product.product_mask == _product_mask()).all()


def test_tensor_and_float_array_inputs():
    photo = _photo()
    tensor = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    from_tensor = prepare_product_input(tensor, torch.from_numpy(_product_mask() > 0))
    from_float = prepare_product_input(photo.astype(np.float32) / 255, _product_mask())
    assert (np.asarray(from_tensor.image) == photo).all()
    assert (np.asarray(from_float.image) == photo).all()
    assert (from_tensor.product_mask == _product_mask()).all()


# ----------------------------------------------------------------------------- bad inputs


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` (tiny file, huge image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing file", "file not found"),
        ("undecodable", "not a decodable image"),
        ("size mismatch", "mask is 20x30 but image is 40x30"),
        ("empty mask", "product mask is empty"),
        ("full mask", "covers the whole image"),
        ("opaque rgba", "fully opaque alpha"),
        ("rgb without mask", "product_mask: required"),
        ("over pixel limit", "over the limit of 1000"),
        ("decompression bomb", "pixels"),
        ("nan array", "NaN"),
    ],
)
def test_bad_product_inputs_raise_one_line_errors(tmp_path, case, message):
    photo, mask = _photo(), _product_mask()
    kwargs = {}
    if case == "missing file":
        photo = tmp_path / "nope.png"
    elif case == "undecodable":
        (tmp_path / "bad.png").write_bytes(b"not an image at all")
        photo = tmp_path / "bad.png"
    elif case == "size mismatch":
        mask = mask[:, :20]
    elif case == "empty mask":
        mask = np.zeros_like(mask)
    elif case == "full mask":
        mask = np.full_like(mask, 255)
    elif case == "opaque rgba":
        photo, mask = Image.fromarray(np.dstack([photo, np.full_like(mask, 255)])), None
    elif case == "rgb without mask":
        mask = None
    elif case == "over pixel limit":
        kwargs["max_pixels"] = 1000
    elif case == "decompression bomb":
        photo = _bomb_png(30000, 30000)
    elif case == "nan array":
        photo = np.full((30, 40, 3), np.nan, np.float32)
    expected = MissingFileError if case == "missing file" else InvalidInputError
    with pytest.raises(expected, match=message) as error:
        prepare_product_input(photo, mask, **kwargs)
    assert "\n" not in str(error.value)


def test_pixel_limit_applies_to_pil_inputs_and_files(tmp_path):
    Image.fromarray(_photo()).save(tmp_path / "photo.png")
    for source in (tmp_path / "photo.png", Image.open(tmp_path / "photo.png"), _photo()):
        with pytest.raises(InvalidInputError, match="over the (pixel )?limit of 500"):
            to_pil_image(source, "image", max_pixels=500)


# ----------------------------------------------------------------------------- sizes, masks, compositing


@pytest.mark.parametrize("size", [(40, 30), (37, 53), (513, 301), (8, 1000)])
@pytest.mark.parametrize("multiple", [2, 8])
def test_processing_size_is_a_multiple_and_keeps_aspect(size, multiple):
    width, height = processing_size(*size, multiple)
    assert width % multiple == 0 and height % multiple == 0
    assert abs(width - size[0]) <= multiple / 2 + 1e-9 or width == multiple
    assert abs(height - size[1]) <= multiple / 2 + 1e-9 or height == multiple
    width, height = processing_size(*size, multiple, resolution=64)
    assert width % multiple == 0 and height % multiple == 0
    assert abs(width * height - 64 * 64) < 64 * 64 * 0.5 + multiple * 64 * 4


def test_inpainting_mask_is_the_complement_and_dilation_grows_the_product():
    product = _product_mask()
    inverse = np.asarray(inpainting_mask(product))
    assert (inverse == 255 - product).all()
    dilated = np.asarray(inpainting_mask(product, product_dilation=2))
    assert (dilated[6:24, 8:32] == 0).all() and dilated[5, 7] == 255 and dilated[0, 0] == 255


def test_feathered_composite_keeps_product_pixels_exactly():
    mask = _product_mask()
    alpha = feathered_alpha(mask, 2.0)
    assert (alpha[mask == 255] == 1.0).all()
    assert 0.0 < alpha[15, 30] < 1.0  # just outside the product: blended
    assert alpha[0, 0] == 0.0  # far away: generated only
    original, generated = np.random.default_rng(1).random((2, 30, 40, 3), dtype=np.float32)
    out = composite(generated, original, alpha)
    assert (out[mask == 255] == original[mask == 255]).all()
    assert (out[alpha == 0] == generated[alpha == 0]).all()
    sharp = feathered_alpha(mask, 0.0)
    assert set(np.unique(sharp)) == {0.0, 1.0}


def test_place_cutout_scales_positions_and_returns_matching_mask():
    cutout = np.zeros((50, 100, 4), np.uint8)
    cutout[10:40, 20:80] = (200, 10, 10, 255)  # a 60x30 product in a larger transparent frame
    photo, mask = place_cutout(Image.fromarray(cutout), (120, 90), scale=0.5, position=(0.25, 0.5))
    assert photo.size == (120, 90) and mask.shape == (90, 120)
    ys, xs = np.nonzero(mask >= 128)
    assert xs.max() - xs.min() + 1 == 60 and ys.max() - ys.min() + 1 == 30  # fits 0.5 x 120 wide
    assert abs((xs.min() + xs.max()) / 2 - 30) <= 1 and abs((ys.min() + ys.max()) / 2 - 45) <= 1
    pixels = np.asarray(photo)
    assert (pixels[mask == 255] == (200, 10, 10)).all() and (pixels[mask == 0] == 255).all()
    # A partly outside product is clipped, not refused; a fully outside one is refused.
    _, clipped = place_cutout(Image.fromarray(cutout), (120, 90), scale=0.5, position=(0.0, 0.5))
    assert 0 < (clipped >= 128).sum() < (mask >= 128).sum()
    with pytest.raises(InvalidInputError, match="falls outside"):
        place_cutout(Image.fromarray(cutout), (120, 90), position=(3.0, 3.0))
    with pytest.raises(InvalidInputError, match="alpha"):
        place_cutout(Image.fromarray(cutout[..., :3]), (120, 90))
    with pytest.raises(InvalidInputError, match="fully transparent"):
        place_cutout(Image.fromarray(np.zeros_like(cutout)), (120, 90))


# ----------------------------------------------------------------------------- guidance plans


@pytest.mark.parametrize(
    "s_text, s_ref, has_ref, branches",
    [
        (7.5, 7.5, True, (UNCOND, TEXT_REF)),  # equal scales: the usual two-branch guidance
        (7.5, 0.0, True, (UNCOND, TEXT)),  # no reference guidance: text-only guidance
        (7.5, 3.0, False, (UNCOND, TEXT)),  # no reference given
        (5.0, 3.0, True, (UNCOND, TEXT, TEXT_REF)),  # dual guidance
        (1.0, 0.0, True, (TEXT,)),  # no guidance at all
        (1.0, 4.0, True, (TEXT, TEXT_REF)),
        (0.0, 0.0, True, (UNCOND,)),
    ],
)
def test_guidance_plan_runs_only_needed_branches(s_text, s_ref, has_ref, branches):
    assert GuidancePlan.create(s_text, s_ref, has_ref).branches == branches


@pytest.mark.parametrize(
    "s_text, s_ref", [(5.0, 3.0), (7.5, 7.5), (7.5, 0.0), (1.0, 4.0), (1.0, 0.0), (2.0, 1.0)]
)
def test_guidance_combination_matches_the_dual_formula(s_text, s_ref):
    e_uncond, e_text, e_ref = torch.randn(3, 2, 4, 5, 5, dtype=torch.float64)
    expected = e_uncond + s_text * (e_text - e_uncond) + s_ref * (e_ref - e_text)
    plan = GuidancePlan.create(s_text, s_ref, True)
    predictions = {UNCOND: e_uncond, TEXT: e_text, TEXT_REF: e_ref}
    # Branches that are skipped have weight zero; feeding their true value elsewhere must not matter.
    batched = torch.cat([predictions[name] for name in plan.branches])
    assert torch.allclose(plan.combine(batched), expected, atol=1e-12)


@pytest.mark.parametrize("value", [float("nan"), -1.0, float("inf"), "x"])
def test_guidance_scales_must_be_finite_and_non_negative(value):
    with pytest.raises(InvalidInputError, match="text_guidance_scale"):
        GuidancePlan.create(value, 1.0, True)
    with pytest.raises(InvalidInputError, match="reference_guidance_scale"):
        GuidancePlan.create(1.0, value, True)
