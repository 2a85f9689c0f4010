"""DCTLSA (Zeng et al. 2023, "Densely Connected Transformer with Linear Self-Attention for Lightweight Image
Super-Resolution"): the DCTLSA upscalers chaiNNer, ComfyUI and A1111 (1.8+, through spandrel) run from
`models/ESRGAN`.

A 3x3 conv, six densely connected modules (each over a 1x1 conv + LeakyReLU 0.05 of the concatenation of the first
features and the earlier modules' outputs), a 1x1 conv of the six outputs, a 3x3 conv, the long residual and a
pixel-shuffle head. A module is two Swin layers, each: the map padded by reflection to the 16-pixel window, a
LayerNorm of the tokens (the original's patch embedding), then two blocks (the second on windows shifted by half a
window, without a mask), each:
- a local branch (BatchNorm with its running statistics, 1x1 conv, depthwise 3x3, BatchNorm, 1x1 conv, plus its
  input) on the (shifted) map;
- linear attention within windows on the local branch's output: per head, the keys softmaxed over the window's
  pixels, q (k^T v) with q scaled by 1 / sqrt(d); a projection, the local branch added; this replaces the block's
  input (no residual around it);
- the MLP with its residual (no LayerNorm).
Five heads (spandrel's number: the files do not record it).

Parameter paths follow the published checkpoints (spandrel's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import BatchNorm
from .layers import Conv2d, LayerNorm, linear
from .swinir import LeakyReLU, Mlp, PixelShuffle, reflect_pad, sequential

MODULES = 6  # densely connected modules (the original's B1..B6; its forward names six)
WINDOW = 16  # the Swin layers' window (fixed in the original)
HEADS = 5  # spandrel's num_head, which it cannot read from a file
MLP_RATIO = 2.0
SLOPE = 0.05  # the 1x1 fusion convs' LeakyReLU


@dataclass(frozen=True)
class DCTLSAConfig:
    in_channels: int = 3
    out_channels: int = 3
    nf: int = 55
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


class LocalModule(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.pointwise_prenorm_0 = BatchNorm(dim)
        self.pointwise_conv_0 = Conv2d(dim, dim, 1, bias=False)
        self.depthwise_conv = Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.pointwise_prenorm_1 = BatchNorm(dim)
        self.pointwise_conv_1 = Conv2d(dim, dim, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.depthwise_conv(self.pointwise_conv_0(self.pointwise_prenorm_0(x)))
        return self.pointwise_conv_1(self.pointwise_prenorm_1(x))


class LinearWindowAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.local = LocalModule(dim)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C), H and W multiples of the window -> (B, H, W, C)."""
        B, H, W, C = x.shape
        w, d = WINDOW, C // HEADS
        local = self.local(x) + x
        qkv = linear(self.qkv, local).reshape(B, H // w, w, W // w, w, 3 * C).transpose(0, 1, 3, 2, 4, 5)
        qkv = qkv.reshape(-1, w * w, 3, HEADS, d).transpose(2, 0, 3, 1, 4)  # (3, Bw, heads, N, d)
        q, k, v = qkv[0], mx.softmax(qkv[1], axis=-2, precise=True), qkv[2]
        out = (q * d**-0.5) @ (k.swapaxes(-1, -2) @ v)  # (Bw, heads, N, d): q (k^T v), a d x d product per head
        out = linear(self.proj, out.transpose(0, 2, 1, 3).reshape(-1, w * w, C))
        out = out.reshape(B, H // w, W // w, w, w, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return out + local


class Block(nn.Module):
    def __init__(self, dim: int, shift: int):
        super().__init__()
        self.shift = shift
        self.attn = LinearWindowAttention(dim)
        self.mlp = Mlp(dim, int(dim * MLP_RATIO))

    def __call__(self, x: mx.array) -> mx.array:
        s = self.shift
        x = self.attn(mx.roll(x, (-s, -s), axis=(1, 2)) if s else x)
        x = mx.roll(x, (s, s), axis=(1, 2)) if s else x
        return self.mlp(x, x)


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm(dim)


class BasicLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.blocks = [Block(dim, 0), Block(dim, WINDOW // 2)]
        self.patch_embed = PatchEmbed(dim)

    def __call__(self, x: mx.array) -> mx.array:
        _, H, W, _ = x.shape
        y = self.patch_embed.norm(reflect_pad(x, -H % WINDOW, -W % WINDOW))
        return sequential(self.blocks, y)[:, :H, :W]


class SwinT(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.transformer_body = [BasicLayer(dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.transformer_body[0](x)


class LSAB(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = [SwinT(dim), SwinT(dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.body, x)


class DCTLSA(nn.Module):
    def __init__(self, config: DCTLSAConfig):
        super().__init__()
        self.config = c = config
        nf = c.nf
        self.fea_conv = Conv2d(c.in_channels, nf, 3, padding=1)
        for i in range(1, MODULES + 1):
            setattr(self, f"B{i}", LSAB(nf))
        self.c = [Conv2d(nf * MODULES, nf, 1), LeakyReLU(SLOPE)]
        for i in range(1, MODULES):
            setattr(self, f"c{i}", [Conv2d(nf * (i + 1), nf, 1), LeakyReLU(SLOPE)])
        self.LR_conv = Conv2d(nf, nf, 3, padding=1)
        self.upsampler = [Conv2d(nf, c.out_channels * c.upscale**2, 3, padding=1), PixelShuffle(c.upscale)]

    dtype = mx.float32  # spandrel (and so A1111) never runs DCTLSA in half precision
    size_minimum = 16  # spandrel's size requirement (the layers' reflection padding needs it)
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1], H and W at least 16 -> (B, H*scale, W*scale, out)."""
        first = self.fea_conv(x)
        dense, outputs = first, []
        for i in range(1, MODULES + 1):
            fused = dense if i == 1 else sequential(getattr(self, f"c{i - 1}"), dense)
            outputs.append(getattr(self, f"B{i}")(fused))
            if i < MODULES:
                dense = mx.concatenate([dense, outputs[-1]], axis=-1)  # the first features and every output so far
        y = self.LR_conv(sequential(self.c, mx.concatenate(outputs, axis=-1))) + first
        return sequential(self.upsampler, y)
