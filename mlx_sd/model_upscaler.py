"""Model upscalers (ESRGAN, Real-ESRGAN, ... `mlx_sd.models.esrgan`) run on images as AUTOMATIC1111 runs them.

A1111 (1.8+, through spandrel) upscales with a network in `upscaler_utils.upscale_with_model`: the image is cut
into 192 x 192 tiles overlapping by 8 pixels (`images.split_grid`, its `ESRGAN_tile` / `ESRGAN_tile_overlap`
defaults; tiles reaching past the image are cropped with black filling), each tile goes through the network as
8-bit pixels in **BGR** order scaled to [0, 1] (A1111 flips the channels before and after the network, whatever
the model was trained on), the output is clamped, scaled by 255 and rounded to 8 bits, and the tiles are joined
with linear 8-bit ramps across the overlaps (`images.combine_grid`; `mlx_sd.grid`). A network whose
input must be a multiple of some size (Real-ESRGAN 2x+) gets its input padded on the bottom and right by reflection
(then by repetition) and the output cropped, as spandrel's `ImageModelDescriptor` does. Here the tiles of an image
run through the network a few at a time, one batch per evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from .grid import combine_grid, split_grid

TILE = 192  # A1111's ESRGAN_tile
TILE_OVERLAP = 8  # A1111's ESRGAN_tile_overlap
TILE_BATCH = 4  # tiles per network call
MIN_INPUT = 2  # spandrel's smallest ESRGAN input (its reflection padding needs two pixels)


@dataclass
class ModelUpscaler:
    """A loaded upscaling network with the name it is listed under.

    Attributes:
        network: an `RRDBNet` or `SRVGGNetCompact` (its `config.scale`, `size_multiple`).
        name: e.g. "R-ESRGAN 4x+" or "4x-UltraSharp".
        tile, tile_overlap: A1111's tiling; tile 0 runs the whole image at once.
    """

    network: nn.Module
    name: str
    tile: int = TILE
    tile_overlap: int = TILE_OVERLAP

    @property
    def scale(self) -> int:
        return self.network.config.scale

    def run(self, pixels: mx.array) -> mx.array:
        """The network on (B, H, W, C) float pixels in [0, 1]: padded to its size rules, clamped to [0, 1], cropped
        to (B, H*scale, W*scale, C), float32."""
        _, H, W, _ = pixels.shape
        x = _pad_bottom_right(pixels, *(_padded(n, self.network.size_multiple) - n for n in (H, W)))
        y = self.network(x.astype(self.network.dtype))
        return mx.clip(y[:, : H * self.scale, : W * self.scale].astype(mx.float32), 0.0, 1.0)

    def __call__(self, image: Image.Image) -> Image.Image:
        """One pass of the network over an RGB image, tiled (A1111's `upscale_with_model`): scale x the size."""
        if self.tile > 0 and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile overlap {self.tile_overlap}: must be at least 0 and below the tile ({self.tile})")
        image = image.convert("RGB")
        if self.tile <= 0 or min(image.size) <= self.tile_overlap:  # A1111's grid would have no tiles at all
            return self._pixels([np.asarray(image)])[0]
        grid = split_grid(image, self.tile, self.tile, self.tile_overlap)
        crops = [tile for _, _, row in grid for _, _, tile in row]
        done = []
        for i in range(0, len(crops), TILE_BATCH):
            done += self._pixels([np.asarray(t) for t in crops[i : i + TILE_BATCH]])
        outputs = iter(done)
        s = self.scale
        scaled = [(y * s, h * s, [(x * s, w * s, next(outputs)) for x, w, _ in row]) for y, h, row in grid]
        return combine_grid(scaled, image.width * s, image.height * s, self.tile_overlap * s)

    def _pixels(self, tiles: list[np.ndarray]) -> list[Image.Image]:
        """uint8 RGB arrays of one size -> upscaled RGB images, through BGR floats as A1111's `upscale_pil_patch`."""
        x = (np.stack(tiles)[..., ::-1] / 255).astype(np.float32)  # A1111: float64 division, then .float()
        y = self.run(mx.array(x))
        mx.eval(y)
        out = np.round(np.array(y) * 255.0).astype(np.uint8)[..., ::-1]  # rounded, as A1111's torch_bgr_to_pil_image
        return [Image.fromarray(np.ascontiguousarray(o), "RGB") for o in out]


def _padded(n: int, multiple: int) -> int:
    return max(MIN_INPUT, math.ceil(n / multiple) * multiple)


def _pad_bottom_right(x: mx.array, ph: int, pw: int) -> mx.array:
    """spandrel's `pad_tensor`: reflect by up to size - 1 pixels, repeat the edge for the rest."""
    for axis, p in ((1, ph), (2, pw)):
        if p <= 0:
            continue
        n = x.shape[axis]
        reflected = [n - 2 - k for k in range(min(p, n - 1))]
        index = list(range(n)) + reflected + [reflected[-1] if reflected else n - 1] * (p - len(reflected))
        x = mx.take(x, mx.array(index), axis=axis)
    return x
