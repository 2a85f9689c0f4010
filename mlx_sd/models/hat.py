"""HAT (Chen et al. 2023, "Activating More Pixels in Image Super-Resolution Transformer"): Real_HAT_GAN_SRx4,
4xNomos8kSCHAT-L and the other HAT upscalers A1111 (1.8+, through spandrel) runs from its `models/ESRGAN` folder.

SwinIR's layout (a 3x3 conv, residual groups at the input size, a pixel-shuffle head) with two additions. Each block
adds to its shifted-window attention a convolution branch on the same normalised input (3x3 conv to a third of the
channels, GELU, 3x3 conv back, RCAN's channel attention), scaled by 0.01 (`conv_scale`, which the files do not
record). Each group ends with an overlapping cross-attention block: queries in the usual windows, keys and values
from larger windows centred on them (16 -> 24 pixels for overlap ratio 0.5; the map zero-padded at its edges, after
the qkv projection, as torch's `nn.Unfold` does), with its own relative position bias. The image is padded by
reflection to a multiple of the window and cropped back at the end.

Parameter paths follow the published checkpoints (the original's, spandrel's); the parameter-free layers inside
their `nn.Sequential`s keep their indices. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import window_attention
from .dat import GELU, Placeholder, ReLU
from .layers import Conv2d, LayerNorm, linear, linear_plus
from .swinir import (
    DIV2K_MEAN,
    Mlp,
    PixelShuffleTrunk,
    reflect_pad,
    relative_position_index,
    sequential,
    shifted_windows,
)


@dataclass(frozen=True)
class HATConfig:
    in_channels: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 16
    overlap_window: int = 24  # the cross-attention's key window: int(window x overlap_ratio) + window
    conv_channels: int = 60  # the convolution branch's width: embed_dim // compress_ratio
    squeeze_channels: int = 6  # the channel attention's: embed_dim // squeeze_factor
    conv_scale: float = 0.01
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    patch_norm: bool = True
    upscale: int = 4
    resi_connection: str = "1conv"  # or "identity"
    num_feat: int = 64

    @property
    def scale(self) -> int:
        return self.upscale


@lru_cache(maxsize=16)
def overlap_position_index(window: int, overlap: int) -> np.ndarray:
    """(window^2, overlap^2) index into the cross-attention's bias table of every (query, key) pair: the key window
    is centred on the query window, offsets listed dy major (the original's `calculate_rpi_oca`)."""
    inner = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    outer = np.stack(np.meshgrid(np.arange(overlap), np.arange(overlap), indexing="ij")).reshape(2, -1)
    rel = (outer[:, None, :] - inner[:, :, None]).transpose(1, 2, 0) + (window - overlap + 1)
    return rel[..., 0] * (window + overlap - 1) + rel[..., 1]


class ChannelAttention(nn.Module):
    """RCAN's: the map times a sigmoid gate per channel, from its mean through a 1x1 bottleneck."""

    def __init__(self, dim: int, squeeze: int):
        super().__init__()
        self.attention = [Placeholder(), Conv2d(dim, squeeze, 1), ReLU(), Conv2d(squeeze, dim, 1), Placeholder()]

    def __call__(self, x: mx.array) -> mx.array:
        pooled = mx.mean(x, axis=(1, 2), keepdims=True)
        gate = self.attention[3](self.attention[2](self.attention[1](pooled)))
        return x * mx.sigmoid(gate)


class CAB(nn.Module):
    def __init__(self, dim: int, hidden: int, squeeze: int):
        super().__init__()
        self.cab = [Conv2d(dim, hidden, 3, padding=1), GELU(), Conv2d(hidden, dim, 3, padding=1),
                    ChannelAttention(dim, squeeze)]  # fmt: skip


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = mx.zeros(((2 * window - 1) ** 2, heads))

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) or None."""
        N = x.shape[1]
        index = mx.array(relative_position_index(self.window, self.window).reshape(-1))
        bias = self.relative_position_bias_table[index].reshape(N, N, self.heads).transpose(2, 0, 1)
        return linear(self.proj, window_attention(*mx.split(linear(self.qkv, x), 3, axis=-1), self.heads, bias, mask))


class HAB(nn.Module):
    """Hybrid attention block: (shifted) window attention plus the scaled convolution branch, then the MLP."""

    def __init__(self, c: HATConfig, heads: int, shift: int):
        super().__init__()
        self.window, self.shift, self.conv_scale = c.window_size, shift, c.conv_scale
        self.norm1 = LayerNorm(c.embed_dim)
        self.attn = WindowAttention(c.embed_dim, c.window_size, heads, c.qkv_bias)
        self.conv_block = CAB(c.embed_dim, c.conv_channels, c.squeeze_channels)
        self.norm2 = LayerNorm(c.embed_dim)
        self.mlp = Mlp(c.embed_dim, int(c.embed_dim * c.mlp_ratio))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        """x: (B, H*W, C) tokens of an H x W map (multiples of the window)."""
        B, L, C = x.shape
        y = self.norm1(x).reshape(B, *size, C)
        conv = self.conv_block.cab[3](sequential(self.conv_block.cab[:3], y))
        y = shifted_windows(self.attn, y, self.window, self.shift)
        x = x + y.reshape(B, L, C) + conv.reshape(B, L, C) * self.conv_scale
        return self.mlp(self.norm2(x), x)


class OCAB(nn.Module):
    """Overlapping cross-attention block: queries in window x window tiles, keys and values in the overlap x overlap
    windows centred on them (zero beyond the map), then the MLP."""

    def __init__(self, c: HATConfig, heads: int):
        super().__init__()
        dim, ws, ow = c.embed_dim, c.window_size, c.overlap_window
        self.window, self.overlap, self.heads = ws, ow, heads
        self.norm1 = LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=c.qkv_bias)
        self.relative_position_bias_table = mx.zeros(((ws + ow - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * c.mlp_ratio))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        (H, W), ws, ow = size, self.window, self.overlap
        B, L, C = x.shape
        qkv = linear(self.qkv, self.norm1(x)).reshape(B, H, W, 3 * C)
        q = qkv[..., :C].reshape(B, H // ws, ws, W // ws, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        p = (ow - ws) // 2
        kv = mx.pad(qkv[..., C:], ((0, 0), (p, p), (p, p), (0, 0)))  # (B, H + 2p, W + 2p, 2C)
        Hp, Wp = H + 2 * p, W + 2 * p
        # every overlap x overlap window, stepping by the window: a strided view of the padded map, then one copy
        kv = mx.as_strided(
            kv, (B, H // ws, W // ws, ow, ow, 2 * C),
            (Hp * Wp * 2 * C, ws * Wp * 2 * C, ws * 2 * C, Wp * 2 * C, 2 * C, 1),
        ).reshape(-1, ow * ow, 2 * C)  # fmt: skip
        index = mx.array(overlap_position_index(ws, ow).reshape(-1))
        bias = self.relative_position_bias_table[index].reshape(ws * ws, ow * ow, self.heads).transpose(2, 0, 1)
        out = window_attention(q, *mx.split(kv, 2, axis=-1), self.heads, bias)
        out = out.reshape(B, H // ws, W // ws, ws, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, L, C)
        x = linear_plus(self.proj, out, x)
        return self.mlp(self.norm2(x), x)


class AttenBlocks(nn.Module):
    def __init__(self, c: HATConfig, depth: int, heads: int):
        super().__init__()
        self.blocks = [HAB(c, heads, c.window_size // 2 if i % 2 else 0) for i in range(depth)]
        self.overlap_attn = OCAB(c, heads)


class RHAG(nn.Module):
    """Residual hybrid attention group: the blocks, the cross-attention block, a conv (or none), plus the input."""

    def __init__(self, c: HATConfig, depth: int, heads: int):
        super().__init__()
        self.residual_group = AttenBlocks(c, depth, heads)
        if c.resi_connection == "1conv":
            self.conv = Conv2d(c.embed_dim, c.embed_dim, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        y = x
        for block in self.residual_group.blocks:
            y = block(y, size)
        y = self.residual_group.overlap_attn(y, size)
        if "conv" in self:
            B, L, C = x.shape
            y = self.conv(y.reshape(B, *size, C)).reshape(B, L, C)
        return y + x


class HAT(PixelShuffleTrunk):
    def __init__(self, config: HATConfig):
        super().__init__()
        self.config = c = config
        self._build(c, [RHAG(c, depth, heads) for depth, heads in zip(c.depths, c.num_heads, strict=True)])

    dtype = mx.float32  # spandrel (and so A1111) never runs HAT in half precision
    size_minimum = 16  # spandrel's smallest HAT input
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, in)."""
        c = self.config
        _, H, W, _ = x.shape
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype)
        y = self._run(reflect_pad(x - mean, -H % c.window_size, -W % c.window_size))
        return (y + mean)[:, : H * c.upscale, : W * c.upscale]
