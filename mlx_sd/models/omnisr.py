"""OmniSR (Wang et al. 2023, "Omni Aggregation Networks for Lightweight Image Super-Resolution"): the OmniSR upscalers
A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

A 3x3 conv, then groups (OSAG) of omni self-attention blocks, each group closed by a 1x1 conv, a residual and an
enhanced spatial attention gate (ESA: a strided conv, 7x7 max pooling, a conv, bilinear back to size, a sigmoid
gate); a 3x3 conv, the long residual and a pixel-shuffle head. An OSA block is a MobileNet conv block (1x1, GELU,
depthwise 3x3, GELU, squeeze-excitation, 1x1, plus its input), then two rounds of: spatial self-attention within
w x w windows (the first round over blocks of adjacent pixels, the second over a grid of pixels H / w apart, with
a learned relative-position bias), a gated conv feed-forward, channel self-attention (each head's channels attend to
each other over a window's pixels, on L2-normalised queries and keys with a learned temperature; over blocks, then
over the grid of pixels w apart), another gated feed-forward; each behind a LayerNorm and with its residual. The
image is padded with zeros to a multiple of the window (as the original), the output cropped.

Parameter paths follow the published checkpoints (spandrel's, the original's); the parameter-free layers inside
their `nn.Sequential`s keep their indices. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import channel_attention, window_attention
from ..upscale import interpolate
from .dat import GELU, Placeholder
from .layers import Conv2d, LayerNorm, gelu, linear, max_pool, sigmoid, silu
from .swinir import PixelShuffle, relative_position_index, sequential

HEADS = 4  # both attentions: the spatial ones are dim // 4 channels a head, the channel ones have four heads


@dataclass(frozen=True)
class OmniSRConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    block_num: int = 1  # OSA blocks per group
    res_num: int = 5  # groups
    window_size: int = 8
    pe: bool = True  # the relative-position bias
    upscale: int = 4
    bias: bool = True  # of the first, last, head and group-closing convs

    @property
    def scale(self) -> int:
        return self.upscale


def _windows(x: mx.array, w: int, grid: bool) -> mx.array:
    """(B, H, W, C) -> (B x windows, w x w, C): blocks of adjacent pixels, or grids of pixels H / w apart."""
    B, H, W, C = x.shape
    if grid:
        return x.reshape(B, w, H // w, w, W // w, C).transpose(0, 2, 4, 1, 3, 5).reshape(-1, w * w, C)
    return x.reshape(B, H // w, w, W // w, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)


def _unwindow(x: mx.array, shape: tuple, w: int, grid: bool) -> mx.array:
    B, H, W, C = shape
    if grid:
        return x.reshape(B, H // w, W // w, w, w, C).transpose(0, 3, 1, 4, 2, 5).reshape(shape)
    return x.reshape(B, H // w, W // w, w, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(shape)


class PreNorm(nn.Module):
    """x + fn(norm(x)): the original's PreNormResidual (LayerNorm, eps 1e-5) and Conv_PreNormResidual (eps 1e-6)."""

    def __init__(self, dim: int, fn: nn.Module, eps: float):
        super().__init__()
        self.norm = LayerNorm(dim, eps=eps)
        self.fn = fn

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.fn(self.norm(x))


class SqueezeExcitation(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim * 0.25)
        self.gate = [Placeholder(), nn.Linear(dim, hidden, bias=False), Placeholder(),
                     nn.Linear(hidden, dim, bias=False)]  # fmt: skip

    def __call__(self, x: mx.array) -> mx.array:
        pooled = x.mean(axis=(1, 2), keepdims=True)
        return x * sigmoid(self.gate[3](silu(self.gate[1](pooled))))


class MBConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fn = [Conv2d(dim, dim, 1), GELU(), Conv2d(dim, dim, 3, padding=1, groups=dim), GELU(),
                   SqueezeExcitation(dim), Conv2d(dim, dim, 1)]  # fmt: skip

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.fn, x) + x


class Attention(nn.Module):
    """Self-attention within w x w windows of blocks or of the grid, with the relative-position bias."""

    def __init__(self, dim: int, window: int, pe: bool, grid: bool):
        super().__init__()
        self._window, self._grid = window, grid
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        if pe:
            self.rel_pos_bias = nn.Embedding((2 * window - 1) ** 2, HEADS)
        self._index = mx.array(relative_position_index(window, window))

    def __call__(self, x: mx.array) -> mx.array:
        w = self._window
        q, k, v = mx.split(linear(self.to_qkv, _windows(x, w, self._grid)), 3, axis=-1)
        bias = self.rel_pos_bias.weight[self._index].transpose(2, 0, 1) if "rel_pos_bias" in self else None
        out = linear(self.to_out[0], window_attention(q, k, v, HEADS, bias))
        return _unwindow(out, x.shape, w, self._grid)


class ChannelAttention(nn.Module):
    """Per head, channels attend to channels over a window's pixels: blocks of w x w adjacent pixels, or the grid of
    pixels w apart (the original's Channel_Attention and Channel_Attention_grid)."""

    def __init__(self, dim: int, window: int, grid: bool):
        super().__init__()
        self._window, self._grid = window, grid
        self.temperature = mx.ones((HEADS, 1, 1))
        self.qkv = Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_dwconv = Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.project_out = Conv2d(dim, dim, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p, d = self._window, C // HEADS
        # (B, X, p, Y, p, heads, d) -> (B, groups, heads, d, pixels): grid groups are (p, p), blocks (X, Y)
        order = (0, 2, 4, 5, 6, 1, 3) if self._grid else (0, 1, 3, 5, 6, 2, 4)
        pixels = H * W // (p * p) if self._grid else p * p
        q, k, v = (
            t.reshape(B, H // p, p, W // p, p, HEADS, d).transpose(order).reshape(B, -1, HEADS, d, pixels)
            for t in mx.split(self.qkv_dwconv(self.qkv(x)), 3, axis=-1)
        )
        out = channel_attention(q, k, v, self.temperature)
        if self._grid:
            out = out.reshape(B, p, p, HEADS, d, H // p, W // p).transpose(0, 5, 1, 6, 2, 3, 4)
        else:
            out = out.reshape(B, H // p, W // p, HEADS, d, p, p).transpose(0, 1, 5, 2, 6, 3, 4)
        return self.project_out(out.reshape(B, H, W, C))


class GatedFeedForward(nn.Module):
    """1x1 conv to two hidden parts, a depthwise 3x3, GELU of the first times the second, 1x1 back (Restormer's
    gated-dconv feed-forward; OmniSR's and DITN's)."""

    def __init__(self, dim: int, hidden: int | None = None, bias: bool = False):
        super().__init__()
        hidden = hidden or dim
        self.project_in = Conv2d(dim, 2 * hidden, 1, bias=bias)
        self.dwconv = Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden, bias=bias)
        self.project_out = Conv2d(hidden, dim, 1, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        x1, x2 = mx.split(self.dwconv(self.project_in(x)), 2, axis=-1)
        return self.project_out(gelu(x1) * x2)


class OSABlock(nn.Module):
    def __init__(self, c: OmniSRConfig):
        super().__init__()
        f, w = c.num_feat, c.window_size

        def ffn():
            return PreNorm(f, GatedFeedForward(f), 1e-6)

        self.layer = [
            MBConv(f), Placeholder(), PreNorm(f, Attention(f, w, c.pe, grid=False), 1e-5), Placeholder(), ffn(),
            PreNorm(f, ChannelAttention(f, w, grid=False), 1e-6), ffn(),
            Placeholder(), PreNorm(f, Attention(f, w, c.pe, grid=True), 1e-5), Placeholder(), ffn(),
            PreNorm(f, ChannelAttention(f, w, grid=True), 1e-6), ffn(),
        ]  # fmt: skip

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.layer, x)


class ESA(nn.Module):
    """Enhanced spatial attention: a sigmoid gate from a strided, max-pooled, bilinearly restored branch."""

    def __init__(self, channels: int, n_feats: int):
        super().__init__()
        self.conv1 = Conv2d(n_feats, channels, 1)
        self.conv_f = Conv2d(channels, channels, 1)
        self.conv2 = Conv2d(channels, channels, 3, stride=2)
        self.conv3 = Conv2d(channels, channels, 3, padding=1)
        self.conv4 = Conv2d(channels, n_feats, 1)

    def __call__(self, x: mx.array) -> mx.array:
        first = self.conv1(x)
        pooled = max_pool(self.conv2(first), 7, 3)
        restored = interpolate(self.conv3(pooled), x.shape[1], x.shape[2])
        return x * sigmoid(self.conv4(restored + self.conv_f(first)))


class OSAG(nn.Module):
    def __init__(self, c: OmniSRConfig):
        super().__init__()
        f = c.num_feat
        self.residual_layer = [*(OSABlock(c) for _ in range(c.block_num)), Conv2d(f, f, 1, bias=c.bias)]
        self.esa = ESA(max(f // 4, 16), f)

    def __call__(self, x: mx.array) -> mx.array:
        return self.esa(sequential(self.residual_layer, x) + x)


class OmniSR(nn.Module):
    def __init__(self, config: OmniSRConfig):
        super().__init__()
        self.config = c = config
        f = c.num_feat
        self.input = Conv2d(c.in_channels, f, 3, padding=1, bias=c.bias)
        self.residual_layer = [OSAG(c) for _ in range(c.res_num)]
        self.output = Conv2d(f, f, 3, padding=1, bias=c.bias)
        self.up = [Conv2d(f, c.out_channels * c.upscale**2, 3, padding=1, bias=c.bias), PixelShuffle(c.upscale)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.input.weight.dtype

    size_minimum = 16  # spandrel's size requirement (ESA's pooling needs 7 pixels after its strided conv)
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1], H and W at least 16 -> (B, H*scale, W*scale, out)."""
        c = self.config
        _, H, W, _ = x.shape
        w = c.window_size
        x = mx.pad(x, [(0, 0), (0, -H % w), (0, -W % w), (0, 0)])  # zeros to the window, as the original
        features = self.input(x)
        y = sequential(self.up, self.output(sequential(self.residual_layer, features)) + features)
        return y[:, : H * c.upscale, : W * c.upscale]
