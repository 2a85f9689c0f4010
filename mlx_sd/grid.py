"""AUTOMATIC1111's tile grid (`images.split_grid`, `images.combine_grid`): an image cut into evenly spread,
overlapping tiles, and tiles joined again with linear 8-bit ramps across the overlaps. Model upscalers run on it
(`mlx_sd.model_upscaler`), and so does the "SD upscale" img2img script (`mlx_sd.sd_upscale`).

A grid is a list of rows `(y, tile_h, [(x, tile_w, tile), ...])`. Tiles reaching past the image (an image smaller
than a tile) are crops with black filling, as Pillow crops them and A1111 keeps them.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> list:
    """A1111's `split_grid`: as many tiles per axis as cover the image with at least `overlap` pixels shared."""

    def starts(size: int, tile: int) -> list[int]:
        count = math.ceil((size - overlap) / (tile - overlap))
        step = (size - tile) / (count - 1) if count > 1 else 0
        return [int(i * step) if int(i * step) + tile < size else size - tile for i in range(count)]

    return [(y, tile_h, [(x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))) for x in starts(image.width, tile_w)])
            for y in starts(image.height, tile_h)]  # fmt: skip


def _ramp(overlap: int, size: int, horizontal: bool) -> Image.Image:
    """A1111's blending masks: 0..255 across the overlap (r * 255 / overlap, truncated to 8 bits)."""
    r = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    return Image.fromarray(np.tile(r, (size, 1)) if horizontal else np.tile(r[:, None], (1, size)), "L")


def combine_grid(rows: list, width: int, height: int, overlap: int) -> Image.Image:
    """A1111's `combine_grid` into a width x height image: each tile after the first of a row fades in across the
    overlap, each row after the first likewise over the rows above."""
    combined = Image.new("RGB", (width, height))
    for y, h, row in rows:
        line = Image.new("RGB", (width, h))
        for x, w, tile in row:
            if x == 0 or overlap == 0:  # without an overlap a later tile covers what it shares with the last
                line.paste(tile, (x, 0))
                continue
            line.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=_ramp(overlap, h, horizontal=True))
            line.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0 or overlap == 0:
            combined.paste(line, (0, y))
            continue
        combined.paste(line.crop((0, 0, width, overlap)), (0, y), mask=_ramp(overlap, width, horizontal=False))
        combined.paste(line.crop((0, overlap, width, h)), (0, y + overlap))
    return combined
