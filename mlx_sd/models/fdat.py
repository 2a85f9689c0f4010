"""FDAT (neosr's "Fast Dual Aggregation Transformer"): the FDAT upscalers A1111 (1.8+, through spandrel) runs from
`models/ESRGAN`.

A 3x3 conv (after a pixel unshuffle for the 1x / 2x "unshuffle" models, which run 4x inside), then residual groups
of blocks alternating DAT's two attentions in a lighter form: spatial (window attention with a learned bias per head
and window position, the map padded with zero tokens to the window) or channel (channels attending to channels over
the whole image, L2-normalised, a learned temperature), each beside a depthwise conv with GELU, the two exchanging a
gate (a channel gate from global pooling after spatial attention, a spatial gate from a 1x1 conv after channel
attention); a feed-forward of fc1, GELU, a depthwise conv and fc2. Each group ends in a 3x3 conv plus its input; a
conv and the long residual; one of neosr's UniUpsample heads (`mlx_sd.models.uniupsample`).

Parameter paths follow the published checkpoints (spandrel's, neosr's); the parameter-free layers inside their
`nn.Sequential`s keep their indices. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import channel_attention, window_attention
from .dat import GELU, Placeholder
from .layers import Conv2d, LayerNorm, gelu, linear, linear_plus, pixel_unshuffle, sigmoid
from .swinir import reflect_pad, sequential
from .uniupsample import uni_upsample

PATTERN = ("spatial", "channel")  # the blocks of a group alternate these (spandrel's group_block_pattern)


@dataclass(frozen=True)
class FDATConfig:
    in_channels: int = 3
    out_channels: int = 3
    embed_dim: int = 120
    num_groups: int = 4
    blocks: int = 6  # per group: depth_per_group x len(PATTERN)
    num_heads: int = 4
    window_size: int = 8
    hidden: int = 240  # the feed-forward's width: int(embed_dim x ffn_expansion_ratio)
    gate_channels: int = 15  # the channel gate's bottleneck: embed_dim // aim_reduction_ratio
    upsampler: str = "transpose+conv"
    upscale: int = 4  # of the network (4 for the unshuffled models)
    mid_dim: int = 64
    unshuffle: int = 1  # 4 // scale for the "unshuffle" 1x / 2x models

    @property
    def scale(self) -> int:
        return self.upscale // self.unshuffle


class SpatialAttention(nn.Module):
    def __init__(self, c: FDATConfig):
        super().__init__()
        d, ws = c.embed_dim, c.window_size
        self.heads, self.ws = c.num_heads, ws
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.bias = mx.zeros((c.num_heads, ws * ws, ws * ws))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        (H, W), (B, L, C), ws = size, x.shape, self.ws
        y = mx.pad(x.reshape(B, H, W, C), [(0, 0), (0, -H % ws), (0, -W % ws), (0, 0)])  # zero tokens, unmasked
        h, w = y.shape[1:3]
        windows = y.reshape(B, h // ws, ws, w // ws, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        out = window_attention(*mx.split(linear(self.qkv, windows), 3, axis=-1), self.heads, self.bias)
        out = linear(self.proj, out).reshape(B, h // ws, w // ws, ws, ws, C).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(B, h, w, C)[:, :H, :W].reshape(B, L, C)


class ChannelAttention(nn.Module):
    def __init__(self, c: FDATConfig):
        super().__init__()
        d = c.embed_dim
        self.heads = c.num_heads
        self.temp = mx.ones((c.num_heads, 1, 1))
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, N, C = x.shape
        h = self.heads
        q, k, v = (t.reshape(B, N, h, C // h).transpose(0, 2, 3, 1) for t in mx.split(linear(self.qkv, x), 3, -1))
        out = channel_attention(q, k, v, self.temp)  # (B, h, d, N)
        return linear(self.proj, out.transpose(0, 3, 1, 2).reshape(B, N, C))


class Interaction(nn.Module):
    """The original's SimplifiedAIM: a spatial gate (1x1 conv, sigmoid) and a channel gate (pooling, 1x1 bottleneck
    with GELU, sigmoid)."""

    def __init__(self, c: FDATConfig):
        super().__init__()
        d, r = c.embed_dim, c.gate_channels
        self.sg = [Conv2d(d, 1, 1, bias=False), Placeholder()]
        self.cg = [Placeholder(), Conv2d(d, r, 1, bias=False), GELU(), Conv2d(r, d, 1, bias=False), Placeholder()]

    def __call__(self, attended: mx.array, conv: mx.array, spatial: bool) -> mx.array:
        """(B, H, W, C) both; after spatial attention the conv branch's channel gate scales it, after channel
        attention its spatial gate scales the conv branch."""
        if spatial:
            pooled = conv.mean(axis=(1, 2), keepdims=True)
            return attended * sigmoid(sequential(self.cg[1:4], pooled)) + conv
        return attended + conv * sigmoid(self.sg[0](attended))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.smix = Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        B, L, _ = x.shape
        y = self.smix(linear(self.fc1, x, "gelu").reshape(B, *size, -1)).reshape(B, L, -1)
        return linear_plus(self.fc2, y, residual)


class Block(nn.Module):
    def __init__(self, c: FDATConfig, kind: str):
        super().__init__()
        d = c.embed_dim
        self._spatial = kind == "spatial"
        self.n1 = LayerNorm(d)
        self.n2 = LayerNorm(d)
        self.attn = SpatialAttention(c) if self._spatial else ChannelAttention(c)
        self.conv = [Conv2d(d, d, 3, padding=1, groups=d, bias=False), GELU()]
        self.inter = Interaction(c)
        self.ffn = FeedForward(d, c.hidden)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, C = x.shape
        normed = self.n1(x)
        attended = self.attn(normed, size).reshape(B, *size, C)
        conv = gelu(self.conv[0](normed.reshape(B, *size, C)))
        x = x + self.inter(attended, conv, self._spatial).reshape(B, L, C)
        return self.ffn(self.n2(x), size, x)


class ResidualGroup(nn.Module):
    def __init__(self, c: FDATConfig):
        super().__init__()
        self.blocks = [Block(c, PATTERN[i % len(PATTERN)]) for i in range(c.blocks)]
        self.conv = Conv2d(c.embed_dim, c.embed_dim, 3, padding=1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        tokens = x.reshape(B, H * W, C)
        for block in self.blocks:
            tokens = block(tokens, (H, W))
        return self.conv(tokens.reshape(x.shape)) + x


class FDAT(nn.Module):
    def __init__(self, config: FDATConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        first = Conv2d(c.in_channels * c.unshuffle**2, d, 3, padding=1)
        self.conv_first = [Placeholder(), first] if c.unshuffle > 1 else first  # the PixelUnshuffle keeps index 0
        self.groups = [ResidualGroup(c) for _ in range(c.num_groups)]
        self.conv_after = Conv2d(d, d, 3, padding=1, bias=False)
        self.upsampler = uni_upsample(c.upsampler, c.upscale, d, c.out_channels, c.mid_dim)

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_after.weight.dtype

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, out)."""
        c = self.config
        _, H, W, _ = x.shape
        if c.unshuffle > 1:
            x = pixel_unshuffle(reflect_pad(x, -H % c.unshuffle, -W % c.unshuffle), c.unshuffle)
        shallow = (self.conv_first[1] if c.unshuffle > 1 else self.conv_first)(x)
        deep = self.conv_after(sequential(self.groups, shallow))
        return sequential(self.upsampler, deep + shallow)[:, : H * c.scale, : W * c.scale]
