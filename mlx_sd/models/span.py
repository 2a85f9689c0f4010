"""SPAN (Wan et al. 2024, "Swift Parameter-free Attention Network for Efficient Super-Resolution"): the small fast
upscalers (4xNomos8k_span_otf, 2x/4x ClearRealityV1, ...) that A1111 (1.8+, through spandrel) runs from
`models/ESRGAN`.

Six blocks of three 3x3 convolutions with SiLU between; each block's output is (last conv + input) times
sigmoid(last conv) - 0.5, the parameter-free attention. The first features, the last block's (after one more conv),
the first block's and the last block's first conv (after its SiLU) are concatenated, mixed by a 1x1 conv and
pixel-shuffled. The input is normalised by the DIV2K mean and x 255 (unless the file says `no_norm`).

Each 3x3 conv is the original's `Conv3XC` at inference: a 1x1 -> 3x3 -> 1x1 chain plus a 1x1 skip, trained apart,
which the reader (`mlx_sd_convert.upscaler`) fuses into the single 3x3 conv (`eval_conv`) spandrel computes before
every call. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, pixel_shuffle, sigmoid, silu
from .swinir import DIV2K_MEAN

IMG_RANGE = 255.0  # the original's `img_range`, which the files do not record (spandrel's fixed value)


@dataclass(frozen=True)
class SPANConfig:
    in_channels: int = 3
    out_channels: int = 3
    feature_channels: int = 48
    upscale: int = 4
    norm: bool = True  # subtract the DIV2K mean and scale by 255 (files without a `no_norm` buffer)

    @property
    def scale(self) -> int:
        return self.upscale


class Conv3XC(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.eval_conv = Conv2d(inputs, outputs, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.eval_conv(x)


class SPAB(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c1_r, self.c2_r, self.c3_r = Conv3XC(dim, dim), Conv3XC(dim, dim), Conv3XC(dim, dim)

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(the block's output, its first conv's after SiLU: the original's in-place SiLU changes the tensor it
        returns)."""
        first = silu(self.c1_r(x))
        last = self.c3_r(silu(self.c2_r(first)))
        return (last + x) * (sigmoid(last) - 0.5), first


class SPAN(nn.Module):
    def __init__(self, config: SPANConfig):
        super().__init__()
        self.config = c = config
        f = c.feature_channels
        self.conv_1 = Conv3XC(c.in_channels, f)
        for i in range(1, 7):
            setattr(self, f"block_{i}", SPAB(f))
        self.conv_cat = Conv2d(4 * f, f, 1)
        self.conv_2 = Conv3XC(f, f)
        self.upsampler = [Conv2d(f, c.out_channels * c.upscale**2, 3, padding=1)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_cat.weight.dtype

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, out)."""
        c = self.config
        if c.norm:
            x = (x - mx.array(DIV2K_MEAN, x.dtype)) * IMG_RANGE
        features = self.conv_1(x)
        out = features
        for i in range(1, 7):
            out, first = getattr(self, f"block_{i}")(out)
            if i == 1:
                out_1 = out
        mixed = self.conv_cat(mx.concatenate([features, self.conv_2(out), out_1, first], axis=-1))
        return pixel_shuffle(self.upsampler[0](mixed), c.upscale)
