"""MoESR ("MambaOut Excitation Super-Resolution", neosr): the MoESR upscalers A1111 (1.8+, through spandrel) runs from
`models/ESRGAN`.

A 3x3 conv, then stages of gated CNN blocks (MambaOut's, as MoSR's: a channel LayerNorm, a 3x3 conv to two hidden
parts, the first gating the second through Mish after an Inception depthwise conv of its last channels: identity,
3x3, 1x11 and 11x1 on eighths of them; a 3x3 conv back, Mish, a learned layer scale, plus the input), each stage
closed by a multi-scale gate (MSG: a conv to a quarter of the channels, pixel unshuffle, LeakyReLU 0.1, three gated
blocks at half the size, a conv, pixel shuffle, LeakyReLU 0.1, plus its input). A long residual and one of neosr's
UniUpsample heads (`mlx_sd.models.uniupsample`). Inputs are padded by reflection to even sizes.

Parameter paths follow the published checkpoints (spandrel's, neosr's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, LayerNorm, mish, pixel_unshuffle
from .swinir import LeakyReLU, PixelShuffle, reflect_pad, sequential
from .uniupsample import uni_upsample

BAND = 11  # the Inception conv's band kernels (1 x 11, 11 x 1)


@dataclass(frozen=True)
class MoESRConfig:
    in_channels: int = 3
    out_channels: int = 3
    dim: int = 64
    n_blocks: int = 9  # stages
    n_block: int = 4  # gated blocks per stage
    hidden: int = 170  # int(expansion_factor x dim)
    msg_hidden: int = 24  # int(expansion_msg x dim), the MSG's blocks'
    upsampler: str = "pixelshuffledirect"
    upscale: int = 4
    upsample_dim: int = 64

    @property
    def scale(self) -> int:
        return self.upscale


class InceptionConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        gc = int(channels * 0.125)
        self.dwconv_hw = Conv2d(gc, gc, 3, padding=1, groups=gc)
        self.dwconv_w = Conv2d(gc, gc, (1, BAND), padding=(0, BAND // 2), groups=gc)
        self.dwconv_h = Conv2d(gc, gc, (BAND, 1), padding=(BAND // 2, 0), groups=gc)

    def __call__(self, x: mx.array) -> mx.array:
        gc = self.dwconv_hw.weight.shape[0]
        n = x.shape[-1] - 3 * gc
        parts = (x[..., n : n + gc], x[..., n + gc : n + 2 * gc], x[..., n + 2 * gc :])
        convs = (self.dwconv_hw, self.dwconv_w, self.dwconv_h)
        return mx.concatenate([x[..., :n], *(conv(p) for conv, p in zip(convs, parts, strict=True))], axis=-1)


class GatedCNNBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = LayerNorm(dim, eps=1e-6)
        self.fc1 = Conv2d(dim, 2 * hidden, 3, padding=1)
        self.conv = InceptionConv(dim)
        self.fc2 = Conv2d(hidden, dim, 3, padding=1)
        self.gamma = mx.ones((1, 1, 1, dim))  # the file's (1, dim, 1, 1), moved as 4-D weights are

    def __call__(self, x: mx.array) -> mx.array:
        hidden, dim = self.fc2.weight.shape[-1], x.shape[-1]
        h = self.fc1(self.norm(x))
        gate, rest = h[..., :hidden], h[..., hidden:]
        rest = mx.concatenate([rest[..., : hidden - dim], self.conv(rest[..., hidden - dim :])], axis=-1)
        return mish(self.fc2(mish(gate) * rest)) * self.gamma + x


class Unshuffle(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self._r = r

    def __call__(self, x: mx.array) -> mx.array:
        return pixel_unshuffle(x, self._r)


class MSG(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.down = [Conv2d(dim, dim // 4, 3, padding=1), Unshuffle(2), LeakyReLU(0.1)]
        self.gated = [GatedCNNBlock(dim, hidden) for _ in range(3)]
        self.up = [Conv2d(dim, 4 * dim, 3, padding=1), PixelShuffle(2), LeakyReLU(0.1)]

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.up, sequential(self.gated, sequential(self.down, x))) + x


class Stage(nn.Module):
    def __init__(self, c: MoESRConfig):
        super().__init__()
        self.blocks = [GatedCNNBlock(c.dim, c.hidden) for _ in range(c.n_block)]
        self.msg = MSG(c.dim, c.msg_hidden)

    def __call__(self, x: mx.array) -> mx.array:
        return self.msg(sequential(self.blocks, x))


class MoESR(nn.Module):
    def __init__(self, config: MoESRConfig):
        super().__init__()
        self.config = c = config
        self.in_to_dim = Conv2d(c.in_channels, c.dim, 3, padding=1)
        self.blocks = [Stage(c) for _ in range(c.n_blocks)]
        self.upscale = uni_upsample(c.upsampler, c.upscale, c.dim, c.out_channels, c.upsample_dim)

    @property
    def dtype(self) -> mx.Dtype:
        return self.in_to_dim.weight.dtype

    size_minimum = 2  # spandrel's
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, out)."""
        _, H, W, _ = x.shape
        x = self.in_to_dim(reflect_pad(x, H % 2, W % 2))
        y = sequential(self.upscale, sequential(self.blocks, x) + x)
        return y[:, : H * self.config.upscale, : W * self.config.upscale]
