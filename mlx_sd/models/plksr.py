"""PLKSR and RealPLKSR (Lee et al. 2024, "Partial Large Kernel CNNs for Efficient Super-Resolution"): the
4xNomos2_realplksr, 4xPurePhoto-RealPLSKR, 2xHFA2k and other PLKSR upscalers A1111 (1.8+, through spandrel) runs from
`models/ESRGAN`.

A 3x3 conv, then blocks of: a channel mixer (two convs, 3x3 and/or 1x1, doubling the channels between them; Mish in
RealPLKSR, GELU in PLKSR), a large-kernel conv (17x17 by default) on the first quarter of the channels only, the
element-wise attention x * sigmoid(conv3x3(x)), a 1x1 refine, RealPLKSR's GroupNorm (or a LayerNorm before the
block), plus the block's input. A last 3x3 conv makes scale^2 x 3 channels, the input (each channel repeated scale^2
times) is added, and a pixel shuffle (or DySample, `mlx_sd.models.dysample`) enlarges. No normalisation of the
input.

Parameter paths follow the published checkpoints, including PLKSR's `channe_mixer` spelling; RealPLKSR's dropout
keeps its index in `feats` as a parameter-free layer. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import GELU, Placeholder
from .dysample import DySample
from .layers import Conv2d, GroupNorm, LayerNorm, mish, pixel_shuffle, sigmoid
from .swinir import sequential

NORM_GROUPS = 4  # RealPLKSR's GroupNorm groups (the files do not record them; spandrel's fixed value)


@dataclass(frozen=True)
class PLKSRConfig:
    dim: int = 64
    n_blocks: int = 28
    upscale: int = 4
    kernel_size: int = 17
    partial: int = 16  # channels the large kernel sees: int(dim x split_ratio)
    real: bool = True  # RealPLKSR (Mish, GroupNorm or LayerNorm, a dropout in `feats`) or PLKSR
    mixer: str = "DCCM"  # the channel mixer's kernels: "DCCM" 3x3 + 3x3, "CCM" 3x3 + 1x1, "ICCM" 1x1 + 3x3
    use_ea: bool = True
    layer_norm: bool = False  # RealPLKSR: a LayerNorm before each block instead of the GroupNorm after
    dysample: bool = False  # RealPLKSR: a DySample head instead of the pixel shuffle

    @property
    def scale(self) -> int:
        return self.upscale

    @property
    def supports_half(self) -> bool:
        """spandrel runs RealPLKSR's GroupNorm variant in float32 only."""
        return not self.real or self.layer_norm


class Mish(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return mish(x)


class PartialConv(nn.Module):
    """The large-kernel conv over the first `partial` channels; the others pass through."""

    def __init__(self, partial: int, kernel_size: int):
        super().__init__()
        self.conv = Conv2d(partial, partial, kernel_size, padding=kernel_size // 2)

    def __call__(self, x: mx.array) -> mx.array:
        p = self.conv.weight.shape[0]
        return mx.concatenate([self.conv(x[..., :p]), x[..., p:]], axis=-1)


class EA(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.f = [Conv2d(dim, dim, 3, padding=1), Placeholder()]

    def __call__(self, x: mx.array) -> mx.array:
        return x * sigmoid(self.f[0](x))


class PLKBlock(nn.Module):
    def __init__(self, c: PLKSRConfig):
        super().__init__()
        first, second = {"DCCM": (3, 3), "CCM": (3, 1), "ICCM": (1, 3)}[c.mixer]
        mixer = [Conv2d(c.dim, 2 * c.dim, first, padding=first // 2), Mish() if c.real else GELU(),
                 Conv2d(2 * c.dim, c.dim, second, padding=second // 2)]  # fmt: skip
        self.mixer_name = "channel_mixer" if c.real else "channe_mixer"  # PLKSR's files spell it so
        setattr(self, self.mixer_name, mixer)
        self.lk = PartialConv(c.partial, c.kernel_size)
        if c.use_ea:
            self.attn = EA(c.dim)
        self.refine = Conv2d(c.dim, c.dim, 1)
        if c.real and c.layer_norm:
            self.layer_norm = LayerNorm(c.dim, eps=1e-6)
        elif c.real:
            self.norm = GroupNorm(NORM_GROUPS, c.dim)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.layer_norm(x) if "layer_norm" in self else x
        y = self.lk(sequential(self[self.mixer_name], y))
        y = self.refine(self.attn(y) if "attn" in self else y)
        return (self.norm(y) if "norm" in self else y) + x


class PLKSR(nn.Module):
    def __init__(self, config: PLKSRConfig):
        super().__init__()
        self.config = c = config
        blocks = [PLKBlock(c) for _ in range(c.n_blocks)]
        dropout = [Placeholder()] if c.real else []
        self.feats = [Conv2d(3, c.dim, 3, padding=1), *blocks, *dropout, Conv2d(c.dim, 3 * c.upscale**2, 3, padding=1)]
        if c.dysample:  # the original's groups: 3 for odd scales, else 4
            s = c.upscale
            self.to_img = DySample(3 * s * s, 3, s, groups=3 if s % 2 else 4, end_convolution=s != 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.feats[0].weight.dtype

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, 3) in [0, 1] -> (B, H*scale, W*scale, 3)."""
        s = self.config.upscale
        y = sequential(self.feats, x) + mx.repeat(x, s * s, axis=-1)
        return self.to_img(y) if self.config.dysample else pixel_shuffle(y, s)
