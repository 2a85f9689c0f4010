"""MoSR ("MambaOut Super-Resolution", neosr): 4xNomos2_hq_mosr and the other MoSR upscalers A1111 (1.8+, through
spandrel) runs from `models/ESRGAN`.

A 3x3 conv, then gated CNN blocks (MambaOut's): a LayerNorm over the channels, a 3x3 conv to two hidden widths whose
first part gates (through Mish) the rest after a depthwise 7x7 conv on its last `conv_channels`, a 3x3 conv back,
Mish, and the block input minus 0.5 added; then two 3x3 convs with Mish and a 1x1. A shortcut branch (3x3, Mish, 3x3,
Mish, plus a 1x1 of the input) minus 0.5 is added, and the head enlarges: a conv and a pixel shuffle ("ps"), eight
convs' worth of channels averaged first ("gps", the geometric-ensemble shuffle), or DySample ("dys",
`mlx_sd.models.dysample`). No input normalisation.

Parameter paths follow the published checkpoints; the Mish layers inside `gblocks` keep their indices as
parameter-free layers. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dysample import DySample
from .layers import Conv2d, LayerNorm, mish, pixel_shuffle
from .plksr import Mish
from .swinir import sequential

ENSEMBLE = 8  # the "gps" head's averaged copies


@dataclass(frozen=True)
class MoSRConfig:
    in_channels: int = 3
    dim: int = 64
    n_blocks: int = 24
    hidden: int = 96  # int(expansion_ratio x dim)
    conv_channels: int = 64  # int(conv_ratio x dim): the depthwise conv's share of the hidden channels
    kernel_size: int = 7
    upscale: int = 4
    upsampler: str = "ps"  # or "gps", "dys"
    out_channels: int = 3  # "dys" only (the others give back the input's channels)

    @property
    def scale(self) -> int:
        return self.upscale


class GatedCNNBlock(nn.Module):
    def __init__(self, c: MoSRConfig):
        super().__init__()
        self.norm = LayerNorm(c.dim, eps=1e-6)
        self.fc1 = Conv2d(c.dim, 2 * c.hidden, 3, padding=1)
        k = c.kernel_size
        self.conv = Conv2d(c.conv_channels, c.conv_channels, k, padding=k // 2, groups=c.conv_channels)
        self.fc2 = Conv2d(c.hidden, c.dim, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        hidden = self.fc2.weight.shape[-1]
        h = self.fc1(self.norm(x))
        gate, rest = h[..., :hidden], h[..., hidden:]
        split = rest.shape[-1] - self.conv.weight.shape[0]
        rest = mx.concatenate([rest[..., :split], self.conv(rest[..., split:])], axis=-1)
        return mish(self.fc2(mish(gate) * rest)) + (x - 0.5)


class ConvBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.block = [Conv2d(inputs, outputs, 3, padding=1), Mish(), Conv2d(outputs, outputs, 3, padding=1), Mish()]
        self.conv11 = Conv2d(inputs, outputs, 1)

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.block, x) + self.conv11(x)


class GPS(nn.Module):
    """The geometric-ensemble pixel shuffle: a conv to eight sets of the shuffled channels, averaged, shuffled."""

    def __init__(self, dim: int, scale: int, out: int):
        super().__init__()
        self.in_to_k = Conv2d(dim, ENSEMBLE * scale * scale * out, 3, padding=1)
        self._scale = scale

    def __call__(self, x: mx.array) -> mx.array:
        y = self.in_to_k(x)
        B, H, W, C = y.shape
        return pixel_shuffle(y.reshape(B, H, W, ENSEMBLE, C // ENSEMBLE).mean(axis=3), self._scale)


class MoSR(nn.Module):
    def __init__(self, config: MoSRConfig):
        super().__init__()
        self.config = c = config
        d = c.dim
        self.gblocks = [
            Conv2d(c.in_channels, d, 3, padding=1), *(GatedCNNBlock(c) for _ in range(c.n_blocks)),
            Conv2d(d, 2 * d, 3, padding=1), Mish(), Conv2d(2 * d, d, 3, padding=1), Mish(), Conv2d(d, d, 1),
        ]  # fmt: skip
        self.shortcut = ConvBlock(c.in_channels, d)
        if c.upsampler == "gps":
            self.upsampler = GPS(d, c.upscale, c.in_channels)
        elif c.upsampler == "dys":
            self.upsampler = DySample(d, c.out_channels, c.upscale, groups=4)
        else:
            self.upsampler = [Conv2d(d, c.in_channels * c.upscale**2, 3, padding=1)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.shortcut.conv11.weight.dtype

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H*scale, W*scale, C)."""
        y = sequential(self.gblocks, x) + (self.shortcut(x) - 0.5)
        if self.config.upsampler != "ps":
            return self.upsampler(y)
        return pixel_shuffle(self.upsampler[0](y), self.config.upscale)
