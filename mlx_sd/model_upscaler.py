"""Model upscalers (ESRGAN, SwinIR, DAT, ScuNET, HAT, SPAN, ...: `mlx_sd.models`), run on images as A1111 runs them.

A1111 (1.8+, through spandrel) upscales with an ESRGAN-family network in `upscaler_utils.upscale_with_model`: the
image is cut into 192 x 192 tiles overlapping by 8 pixels (`images.split_grid`, its `ESRGAN_tile` /
`ESRGAN_tile_overlap` defaults; tiles reaching past the image are cropped with black filling), each tile goes through
the network as 8-bit pixels in **BGR** order scaled to [0, 1] (A1111 flips the channels before and after the
network, whatever the model was trained on), the output is clamped, scaled by 255 and rounded to 8 bits, and the
tiles are joined with linear 8-bit ramps across the overlaps (`images.combine_grid`; `mlx_sd.grid`). A network whose
input must be a multiple of some size (Real-ESRGAN 2x+) gets its input padded on the bottom and right by reflection
(then by repetition) and the output cropped, as spandrel's `ImageModelDescriptor` does. SwinIR goes through
`upscale_2` instead: the same BGR input as floats, square tiles (192, or the image's shorter side) stepping by
tile - 8 with the last flush with the edge, each output clamped, the overlaps averaged in float32, then rounded to 8
bits once. DAT goes through `upscale_with_model` as ESRGAN does (its own `DAT_tile` settings, the same defaults),
ScuNET through `upscale_2` with 256-pixel tiles (`SCUNET_tile`); every other architecture (HAT, SPAN, PLKSR, ...:
A1111 keeps them in `models/ESRGAN`) as ESRGAN. The network says which (`a1111_tiling`). Here the tiles of an image
run through the network a few at a time, one batch per evaluation.

A grey model (one input channel: fbcnn_gray, drunet_gray, the grey DnCNNs, ...; A1111 hands every network three
channels, which such a model cannot take) sees the image's luma, as chaiNNer converts an image for one (OpenCV's
BGR2GRAY weights, in float), and its output is written to all three channels.
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
LUMA_BGR = (0.114, 0.587, 0.299)  # OpenCV's BGR2GRAY weights (ITU-R BT.601), which chaiNNer gives grey models


@dataclass
class ModelUpscaler:
    """A loaded upscaling network with the name it is listed under.

    Attributes:
        network: one of `mlx_sd.models`' upscaling networks (`RRDBNet`, `SRVGGNetCompact`, `SwinIR`, `DAT`, ...):
            its `config.scale`, `size_minimum`, `size_multiple`, `a1111_tiling`, optionally `a1111_tile` and
            `input_channels` (1: a grey model, given the luma).
        name: e.g. "R-ESRGAN 4x+" or "4x-UltraSharp".
        tile, tile_overlap: A1111's tiling (its defaults: 192 and 8, ScuNET's tile 256); tile 0 runs the whole image
            at once.
    """

    network: nn.Module
    name: str
    tile: int | None = None  # None: the network's A1111 default (`a1111_tile`, else TILE)
    tile_overlap: int = TILE_OVERLAP

    def __post_init__(self):
        if self.tile is None:
            self.tile = getattr(self.network, "a1111_tile", TILE)

    @property
    def scale(self) -> int:
        return self.network.config.scale

    def run(self, pixels: mx.array) -> mx.array:
        """The network on (B, H, W, C) float pixels in [0, 1] (BGR, as A1111 hands them): padded to its size rules,
        clamped to [0, 1], cropped to (B, H*scale, W*scale, C), float32. Three channels given to a grey model are
        its luma, its output repeated to three."""
        _, H, W, C = pixels.shape
        net = self.network
        grey = C == 3 and getattr(net, "input_channels", C) == 1
        if grey:
            pixels = pixels @ mx.array(LUMA_BGR)[:, None]  # (B, H, W, 1)
        x = _pad_bottom_right(pixels, *(_padded(n, net.size_multiple, net.size_minimum) - n for n in (H, W)))
        y = mx.clip(net(x.astype(net.dtype))[:, : H * self.scale, : W * self.scale].astype(mx.float32), 0.0, 1.0)
        return mx.repeat(y, 3, axis=-1) if grey else y

    def __call__(self, image: Image.Image) -> Image.Image:
        """One pass of the network over an RGB image, tiled (A1111's `upscale_with_model`): scale x the size."""
        if self.tile > 0 and not 0 <= self.tile_overlap < self.tile:
            raise ValueError(f"tile overlap {self.tile_overlap}: must be at least 0 and below the tile ({self.tile})")
        image = image.convert("RGB")
        if self.network.a1111_tiling == "average":
            return self._averaged(image)
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

    def _averaged(self, image: Image.Image) -> Image.Image:
        """A1111's `upscale_2` / `tiled_upscale_2`: overlapping outputs averaged in float, rounded once."""
        x = (np.asarray(image)[..., ::-1] / 255).astype(np.float32)  # (H, W, 3) BGR
        H, W, C = x.shape
        tile, s = min(self.tile, H, W), self.scale
        stride = tile - self.tile_overlap
        if self.tile <= 0 or stride <= 0:
            out = np.array(self.run(mx.array(x[None])))[0]
        else:
            corners = [(h, w) for h in [*range(0, H - tile, stride), H - tile]
                       for w in [*range(0, W - tile, stride), W - tile]]  # fmt: skip
            total = np.zeros((H * s, W * s, C), np.float32)
            weights = np.zeros_like(total)
            for i in range(0, len(corners), TILE_BATCH):
                batch = corners[i : i + TILE_BATCH]
                patches = self.run(mx.array(np.stack([x[h : h + tile, w : w + tile] for h, w in batch])))
                mx.eval(patches)
                for (h, w), patch in zip(batch, np.array(patches)):
                    total[h * s : (h + tile) * s, w * s : (w + tile) * s] += patch
                    weights[h * s : (h + tile) * s, w * s : (w + tile) * s] += 1
            out = total / weights
        pixels = np.round(255.0 * np.clip(out, 0.0, 1.0)).astype(np.uint8)[..., ::-1]
        return Image.fromarray(np.ascontiguousarray(pixels), "RGB")

    def _pixels(self, tiles: list[np.ndarray]) -> list[Image.Image]:
        """uint8 RGB arrays of one size -> upscaled RGB images, through BGR floats as A1111's `upscale_pil_patch`."""
        x = (np.stack(tiles)[..., ::-1] / 255).astype(np.float32)  # A1111: float64 division, then .float()
        y = self.run(mx.array(x))
        mx.eval(y)
        out = np.round(np.array(y) * 255.0).astype(np.uint8)[..., ::-1]  # rounded, as A1111's torch_bgr_to_pil_image
        return [Image.fromarray(np.ascontiguousarray(o), "RGB") for o in out]


def _padded(n: int, multiple: int, minimum: int) -> int:
    return math.ceil(max(minimum, n) / multiple) * multiple


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
