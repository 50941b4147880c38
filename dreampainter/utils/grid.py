"""One grid maker for every picture of results: validation grids, `generate` grids, the demo's grid and
the benchmark contact sheet.

Each tile is fitted into a ``tile`` x ``tile`` square without distortion (small images are enlarged
with nearest-neighbour so toy pixels stay sharp); ``None`` is a grey "none" tile. Tiles may carry a
label above them and rows a caption.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

Tile = Image.Image | None | tuple[str, Image.Image | None]
CAPTION_HEIGHT = 14
NONE_GREY = (200, 200, 200)


def _fit(image: Image.Image | None, tile: int) -> Image.Image:
    square = Image.new("RGB", (tile, tile), "white")
    if image is None:
        square.paste(NONE_GREY, (0, 0, tile, tile))
        ImageDraw.Draw(square).text((tile // 2 - 12, tile // 2 - 6), "none", fill=(90, 90, 90))
        return square
    image = image.convert("RGB")
    scale = tile / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC
    square.paste(image.resize(size, resample), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return square


def _split(cell: Tile) -> tuple[str | None, Image.Image | None]:
    return cell if isinstance(cell, tuple) else (None, cell)


def image_grid(
    rows: Sequence[Sequence[Tile]],
    tile: int = 128,
    gap: int = 4,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """Rows of tiles (images, ``None``, or ``(label, image)`` pairs) in one RGB image; ``captions``: one per row."""
    if not rows or not any(rows):
        raise ValueError("image_grid needs at least one tile")
    labelled = any(isinstance(cell, tuple) for row in rows for cell in row)
    label_height = CAPTION_HEIGHT if labelled else 0
    caption_height = CAPTION_HEIGHT if captions else 0
    row_height = caption_height + label_height + tile + gap
    width = max(len(row) for row in rows) * (tile + gap) + gap
    grid = Image.new("RGB", (width, len(rows) * row_height + gap), "white")
    draw = ImageDraw.Draw(grid)
    for index, row in enumerate(rows):
        top = gap + index * row_height
        if captions:
            draw.text((gap, top), captions[index], fill=(0, 0, 0))
        for column, cell in enumerate(row):
            label, image = _split(cell)
            left = gap + column * (tile + gap)
            if label:
                draw.text((left + 2, top + caption_height + 1), label[:22], fill=(0, 0, 0))
            grid.paste(_fit(image, tile), (left, top + caption_height + label_height))
    return grid
