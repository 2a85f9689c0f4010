"""DITN (Liu et al. 2023, "Unfolding Once is Enough: A Deployment-Friendly Transformer Unit for Super-Resolution",
the real-world variant): the DITN upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

A 3x3 conv, then units (UFONE) of: inner-patch transformer layers on 8x8 patches (channel attention over a patch's
pixels, one head, L2-normalised with a learned temperature; the gated conv feed-forward), then spatial-aware layers
on the whole map (a 1x1 conv to two halves, one through a depthwise 5x5, a dilated depthwise 7x7 and a 1x1, gating
the other, a 1x1 and a learned per-channel scale; the feed-forward); every sub-layer sees tanh of its input through
a 1x1 conv and adds its output. A 3x3 conv, the long residual and a pixel-shuffle head. Inputs are padded by
reflection to a multiple of 8, the output cropped.

Parameter paths follow the published checkpoints (spandrel's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import channel_attention
from .layers import Conv2d, linear, tanh
from .omnisr import GatedFeedForward
from .swinir import PixelShuffle, reflect_pad, sequential

PATCH = 8  # the inner-patch layers' patches (the original's patch_size, which the files do not record)


@dataclass(frozen=True)
class DITNConfig:
    in_channels: int = 3
    dim: int = 60
    itl_blocks: int = 4
    sal_blocks: int = 4
    ufone_blocks: int = 1
    hidden: int = 120  # the feed-forward's width: int(dim x ffn_expansion_factor)
    bias: bool = False
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


class ISA(nn.Module):
    """Inner-patch self-attention: channels attending to channels over a patch's pixels."""

    def __init__(self, dim: int, bias: bool):
        super().__init__()
        self.temperature = mx.ones((1, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.project_out = Conv2d(dim, dim, 1, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        q, k, v = (t.swapaxes(1, 2)[:, None] for t in mx.split(linear(self.qkv, x.reshape(B, H * W, C)), 3, -1))
        out = channel_attention(q, k, v, self.temperature)[:, 0]  # (B, C, HW)
        return self.project_out(out.swapaxes(1, 2).reshape(B, H, W, C))


class SDA(nn.Module):
    """Spatial-aware attention: half the channels, through large depthwise convs, gate the other half."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = mx.zeros((1, 1, 1, dim))  # the file's (1, dim, 1, 1), moved as 4-D weights are
        self.DConvs = [Conv2d(dim, dim, 5, padding=2, groups=dim),
                       Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3), Conv2d(dim, dim, 1)]  # fmt: skip
        self.proj_first = [Conv2d(dim, 2 * dim, 1)]
        self.proj_last = [Conv2d(dim, dim, 1)]

    def __call__(self, x: mx.array) -> mx.array:
        a, x = mx.split(self.proj_first[0](x), 2, axis=-1)
        return self.proj_last[0](x * sequential(self.DConvs, a)) * self.scale


class Layer(nn.Module):
    """x + mixer(conv1(tanh x)), then x + ffn(conv2(tanh x)): the original's ITL (mixer `attn`) and SAL (`SDA`)."""

    def __init__(self, c: DITNConfig, inner: bool):
        super().__init__()
        if inner:
            self.attn = ISA(c.dim, c.bias)
        else:
            self.SDA = SDA(c.dim)
        self.conv1 = Conv2d(c.dim, c.dim, 1)
        self.conv2 = Conv2d(c.dim, c.dim, 1)
        self.ffn = GatedFeedForward(c.dim, c.hidden, c.bias)

    def __call__(self, x: mx.array) -> mx.array:
        mixer = self.attn if "attn" in self else self.SDA
        x = x + mixer(self.conv1(tanh(x)))
        return x + self.ffn(self.conv2(tanh(x)))


class UFONE(nn.Module):
    def __init__(self, c: DITNConfig):
        super().__init__()
        self.ITLs = [Layer(c, inner=True) for _ in range(c.itl_blocks)]
        self.SALs = [Layer(c, inner=False) for _ in range(c.sal_blocks)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p = PATCH
        patches = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p, p, C)
        patches = sequential(self.ITLs, patches)
        x = patches.reshape(B, H // p, W // p, p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return sequential(self.SALs, x)


class DITN(nn.Module):
    def __init__(self, config: DITNConfig):
        super().__init__()
        self.config = c = config
        self.sft = Conv2d(c.in_channels, c.dim, 3, padding=1)
        self.UFONE = [UFONE(c) for _ in range(c.ufone_blocks)]
        self.conv_after_body = Conv2d(c.dim, c.dim, 3, padding=1)
        self.upsample = [Conv2d(c.dim, 3 * c.upscale**2, 3, padding=1), PixelShuffle(c.upscale)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.sft.weight.dtype

    size_minimum = PATCH  # (the reflection padding needs more pixels than it adds)
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, 3)."""
        c = self.config
        _, H, W, _ = x.shape
        first = self.sft(reflect_pad(x, -H % PATCH, -W % PATCH))
        y = sequential(self.upsample, self.conv_after_body(sequential(self.UFONE, first)) + first)
        return y[:, : H * c.upscale, : W * c.upscale]
