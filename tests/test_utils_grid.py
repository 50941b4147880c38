"""The one grid maker: layout, letterboxing, labels and captions."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from dreampainter.utils.grid import CAPTION_HEIGHT, NONE_GREY, image_grid


def test_tiles_are_letterboxed_into_squares_in_rows():
    rows = [[Image.new("RGB", (40, 20), "red"), None], [Image.new("L", (10, 10), 128)]]
    grid = image_grid(rows, tile=32, gap=4)
    assert grid.size == (4 + 2 * 36, 4 + 2 * 36)
    # the 40x20 red image is fitted to 32x16 and centred vertically: white bars above and below
    assert grid.getpixel((4 + 16, 4 + 16)) == (255, 0, 0)
    assert grid.getpixel((4 + 16, 4 + 2)) == (255, 255, 255)
    assert grid.getpixel((40 + 2, 4 + 2)) == NONE_GREY  # None -> grey tile
    assert grid.getpixel((4 + 16, 40 + 16)) == (128, 128, 128)  # L converted to RGB, enlarged


def test_small_images_are_enlarged_without_blurring():
    image = Image.new("RGB", (2, 2), "black")
    image.putpixel((0, 0), (255, 255, 255))
    grid = image_grid([[image]], tile=8, gap=0)
    assert {grid.getpixel((x, y)) for x in range(4) for y in range(4)} == {(255, 255, 255)}
    assert {grid.getpixel((x, y)) for x in range(4, 8) for y in range(4)} == {(0, 0, 0)}


def test_labels_and_captions_add_their_rows_of_text():
    plain = image_grid([[Image.new("RGB", (8, 8))]], tile=8, gap=0)
    labelled = image_grid([[("a", Image.new("RGB", (8, 8)))]], tile=8, gap=0, captions=["row"])
    assert labelled.size == (plain.width, plain.height + 2 * CAPTION_HEIGHT)
    assert labelled.getpixel((4, 2 * CAPTION_HEIGHT + 4)) == (0, 0, 0)


def test_grid_round_trips_through_png_and_refuses_nothing_to_show():
    buffer = io.BytesIO()
    image_grid([[Image.new("RGB", (8, 8), "blue")]], tile=8, gap=0).save(buffer, format="PNG")
    assert Image.open(buffer).size == (8, 8)
    with pytest.raises(ValueError, match="at least one tile"):
        image_grid([[]])
