"""SCUNet (Zhang et al. 2023, "Practical Blind Image Denoising via Swin-Conv-UNet and Data Synthesis"), A1111's
"ScuNET GAN" and "ScuNET PSNR": a 1x restoration network A1111 lists among its upscalers (it denoises; the upscale
loop then resizes with Lanczos).

A UNet of three 2x2-strided downsamplings and 2x2 transposed-conv upsamplings, each level a stack of Swin-Conv blocks:
a 1x1 conv splits the channels into a residual conv branch (3x3, ReLU, 3x3) and a Swin transformer branch (8x8
windows of 32-wide heads, every second block shifted by half a window with its -inf masks, a relative-position bias
per head), a 1x1 conv joins them, plus the input. The image is padded by reflection to a multiple of 64 and cropped
back. As spandrel builds it, the training resolution is 256, so every level's odd blocks are shifted.

Parameter paths follow the published checkpoints (`m_head`, `m_down1.N`, ..., `m_tail`). Images are (B, H, W, C) in
[0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import window_attention
from .dat import GELU, ReLU
from .layers import Conv2d, LayerNorm, conv_transpose, linear, linear_plus
from .swinir import reflect_pad, relative_position_index, sequential, shift_mask

WINDOW = 8
HEAD_DIM = 32
MULTIPLE = 64  # the input is padded to this (three 2x downsamplings of 8-pixel windows)


@dataclass(frozen=True)
class SCUNetConfig:
    in_channels: int = 3
    dim: int = 64
    config: tuple[int, ...] = (4, 4, 4, 4, 4, 4, 4)  # blocks of down1, down2, down3, body, up3, up2, up1

    @property
    def scale(self) -> int:
        return 1


class WMSA(nn.Module):
    """(Shifted) window self-attention: the original's `WMSA` on (B, H, W, C) maps."""

    def __init__(self, dim: int, shifted: bool):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.shifted = shifted
        self.embedding_layer = nn.Linear(dim, 3 * dim)
        self.relative_position_params = mx.zeros((self.heads, 2 * WINDOW - 1, 2 * WINDOW - 1))
        self.linear = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p, s = WINDOW, WINDOW // 2
        mask = None
        if self.shifted:
            x = mx.roll(x, (-s, -s), axis=(1, 2))
            mask = mx.array(np.where(shift_mask(H, W, (p, p), (s, s)) < 0, -np.inf, 0).astype(np.float32))
        windows = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p, C)
        index = mx.array(relative_position_index(p, p).reshape(-1))
        bias = self.relative_position_params.reshape(self.heads, -1)[:, index].reshape(self.heads, p * p, p * p)
        out = window_attention(*mx.split(linear(self.embedding_layer, windows), 3, axis=-1), self.heads, bias, mask)
        out = linear(self.linear, out).reshape(B, H // p, W // p, p, p, C).transpose(0, 1, 3, 2, 4, 5)
        out = out.reshape(B, H, W, C)
        return (mx.roll(out, (s, s), axis=(1, 2)) if self.shifted else out) + residual


class Block(nn.Module):
    """The Swin transformer branch: x + WMSA(LN(x)), then x + MLP(LN(x)) (4x, GELU)."""

    def __init__(self, dim: int, shifted: bool):
        super().__init__()
        self.ln1 = LayerNorm(dim)
        self.msa = WMSA(dim, shifted)
        self.ln2 = LayerNorm(dim)
        self.mlp = [nn.Linear(dim, 4 * dim), GELU(), nn.Linear(4 * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        x = self.msa(self.ln1(x), x)
        return linear_plus(self.mlp[2], linear(self.mlp[0], self.ln2(x), "gelu"), x)


class ConvTransBlock(nn.Module):
    def __init__(self, conv_dim: int, trans_dim: int, shifted: bool):
        super().__init__()
        both = conv_dim + trans_dim
        self.split = conv_dim
        self.trans_block = Block(trans_dim, shifted)
        self.conv1_1 = Conv2d(both, both, 1)
        self.conv1_2 = Conv2d(both, both, 1)
        self.conv_block = [Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False), ReLU(),
                           Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False)]  # fmt: skip

    def __call__(self, x: mx.array) -> mx.array:
        y = self.conv1_1(x)
        conv, trans = y[..., : self.split], y[..., self.split :]
        conv = sequential(self.conv_block, conv) + conv
        return self.conv1_2(mx.concatenate([conv, self.trans_block(trans)], axis=-1)) + x


class Up(nn.Module):
    """torch's ConvTranspose2d with a 2x2 kernel and stride 2, no bias: each pixel becomes a 2x2 patch, one product.
    The weight is (in, 2, 2, out), torch's (in, out, 2, 2) moved as every 4-D conv weight is at conversion."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.weight = mx.zeros((inputs, 2, 2, outputs))

    def __call__(self, x: mx.array) -> mx.array:
        return conv_transpose(x, self.weight, 2)


def _stage(dim: int, blocks: int) -> list:
    """ConvTransBlocks splitting `dim` channels in two halves, every second one shifted."""
    return [ConvTransBlock(dim // 2, dim // 2, i % 2 == 1) for i in range(blocks)]


class SCUNet(nn.Module):
    def __init__(self, config: SCUNetConfig):
        super().__init__()
        self.config = c = config
        d, n = c.dim, c.config
        self.m_head = [Conv2d(c.in_channels, d, 3, padding=1, bias=False)]
        self.m_down1 = [*_stage(d, n[0]), Conv2d(d, 2 * d, 2, stride=2, bias=False)]
        self.m_down2 = [*_stage(2 * d, n[1]), Conv2d(2 * d, 4 * d, 2, stride=2, bias=False)]
        self.m_down3 = [*_stage(4 * d, n[2]), Conv2d(4 * d, 8 * d, 2, stride=2, bias=False)]
        self.m_body = _stage(8 * d, n[3])
        self.m_up3 = [Up(8 * d, 4 * d), *_stage(4 * d, n[4])]
        self.m_up2 = [Up(4 * d, 2 * d), *_stage(2 * d, n[5])]
        self.m_up1 = [Up(2 * d, d), *_stage(d, n[6])]
        self.m_tail = [Conv2d(d, c.in_channels, 3, padding=1, bias=False)]

    dtype = mx.float32  # A1111 runs it in its own dtype; float32 here, as every upscaler but the ESRGAN family
    size_minimum = 40  # spandrel's smallest SCUNet input
    size_multiple = 1  # the network pads itself to MULTIPLE
    a1111_tiling = "average"  # A1111 1.8+ runs ScuNET through `upscale_2`
    a1111_tile = 256  # its SCUNET_tile default

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H, W, C)."""
        _, H, W, _ = x.shape
        x0 = reflect_pad(x, -H % MULTIPLE, -W % MULTIPLE)
        x1 = sequential(self.m_head, x0)
        x2 = sequential(self.m_down1, x1)
        x3 = sequential(self.m_down2, x2)
        x4 = sequential(self.m_down3, x3)
        y = sequential(self.m_body, x4)
        y = sequential(self.m_up3, y + x4)
        y = sequential(self.m_up2, y + x3)
        y = sequential(self.m_up1, y + x2)
        return sequential(self.m_tail, y + x1)[:, :H, :W]
