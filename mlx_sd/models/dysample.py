"""DySample (Liu et al. 2023, "Learning to Upsample by Learning to Sample"): the learned upsampler of the RealPLKSR
and MoSR "dysample" models, as spandrel's `DySample` runs it.

Per group of channels, every output pixel samples the input bilinearly at its own point: the point of a plain
`scale`x upsampling (the sub-pixel grid, `init_pos`) moved by an offset a 1x1 conv predicts, damped by a sigmoid gate
from a second 1x1 conv (x 0.5). Sampling is torch's `grid_sample` (bilinear, align_corners=False, border padding);
an optional 1x1 conv then mixes the channels. Images are (B, H, W, C).
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .layers import Conv2d, pixel_shuffle, sigmoid


@lru_cache(maxsize=16)
def initial_positions(scale: int, groups: int) -> np.ndarray:
    """(2 x groups x scale^2,) the sub-pixel offsets of a plain upsampling, x then y, in the original's channel
    order (its `_init_pos`)."""
    h = np.arange((-scale + 1) / 2, (scale - 1) / 2 + 1) / scale
    grid = np.stack(np.meshgrid(h, h, indexing="ij")).transpose(0, 2, 1)  # (2, s, s)
    return np.tile(grid, (1, groups, 1)).reshape(-1).astype(np.float32)


def grid_sample(x: mx.array, grid: mx.array) -> mx.array:
    """torch's grid_sample(mode="bilinear", align_corners=False, padding_mode="border") channels-last.

    Args:
        x: (N, H, W, C) the images.
        grid: (N, h, w, 2) sampling points, x then y, in [-1, 1] across the images' outer pixel edges.
    Returns:
        (N, h, w, C).
    """
    N, H, W, C = x.shape
    ix = mx.clip(((grid[..., 0] + 1) * W - 1) / 2, 0, W - 1)  # border padding: the points clamped to the pixels
    iy = mx.clip(((grid[..., 1] + 1) * H - 1) / 2, 0, H - 1)
    x0, y0 = mx.floor(ix), mx.floor(iy)
    wx, wy = ix - x0, iy - y0
    x0, y0 = x0.astype(mx.int32), y0.astype(mx.int32)
    x1, y1 = mx.minimum(x0 + 1, W - 1), mx.minimum(y0 + 1, H - 1)  # weight 0 where clamped
    flat = x.reshape(N * H * W, C)
    out_shape = grid.shape[:3]
    image = (mx.arange(N) * (H * W)).reshape(N, 1, 1)

    def at(yy: mx.array, xx: mx.array) -> mx.array:
        # rows of the flattened images: a plain gather (take_along_axis with a broadcast index took 10x as long)
        return mx.take(flat, (image + yy * W + xx).reshape(-1), axis=0).reshape(*out_shape, C)

    wx, wy = wx[..., None], wy[..., None]
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy


class DySample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, scale: int, groups: int, end_convolution: bool = True):
        super().__init__()
        self.scale, self.groups = scale, groups
        if end_convolution:
            self.end_conv = Conv2d(in_channels, out_channels, 1)
        self.offset = Conv2d(in_channels, 2 * groups * scale**2, 1)
        self.scope = Conv2d(in_channels, 2 * groups * scale**2, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        s, G = self.scale, self.groups
        B, H, W, C = x.shape
        offset = self.offset(x) * sigmoid(self.scope(x)) * 0.5 + mx.array(initial_positions(s, G))
        n = G * s * s
        centres = mx.stack(mx.meshgrid(mx.arange(W) + 0.5, mx.arange(H) + 0.5, indexing="xy"), axis=-1)  # (H, W, 2)
        scale = mx.array([W, H], mx.float32)
        # channel k * n + j of the offsets moves coordinate k (x, y); normalised to [-1, 1] as the original does
        coords = 2 * (centres[None, :, :, :, None] + offset.reshape(B, H, W, 2, n)) / scale[:, None] - 1
        coords = pixel_shuffle(coords.reshape(B, H, W, 2 * n), s)  # (B, sH, sW, 2G): channel k * G + g
        coords = coords.reshape(B, s * H, s * W, 2, G).transpose(0, 4, 1, 2, 3).reshape(B * G, s * H, s * W, 2)
        groups = x.reshape(B, H, W, G, C // G).transpose(0, 3, 1, 2, 4).reshape(B * G, H, W, C // G)
        out = grid_sample(groups, coords).reshape(B, G, s * H, s * W, C // G).transpose(0, 2, 3, 1, 4)
        out = out.reshape(B, s * H, s * W, C)
        return self.end_conv(out) if "end_conv" in self else out
