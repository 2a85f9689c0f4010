"""Swift-SRGAN (Krishnan & Nandakumar 2021, "Swift-SRGAN: Rethinking Super-Resolution for Efficient and Real-time
Inference"): the Swift-SRGAN upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

SRGAN's generator with depthwise-separable convolutions (a depthwise conv, then a 1x1): a 9x9 block with PReLU,
residual blocks (two 3x3 blocks with BatchNorm, PReLU after the first, plus the input), a 3x3 block with BatchNorm
plus the first block's output, per octave a separable conv to 4x the channels, a pixel shuffle and PReLU, and a 9x9
separable conv whose tanh is mapped to [0, 1].

Parameter paths follow the published checkpoints (spandrel's). BatchNorm runs with its running statistics.
Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import BatchNorm
from .esrgan import PReLU
from .layers import Conv2d, pixel_shuffle, tanh
from .swinir import sequential


@dataclass(frozen=True)
class SwiftSRGANConfig:
    in_channels: int = 3
    num_channels: int = 64
    num_blocks: int = 16
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


class SeparableConv(nn.Module):
    def __init__(self, inputs: int, outputs: int, kernel: int, bias: bool = True):
        super().__init__()
        self.depthwise = Conv2d(inputs, inputs, kernel, padding=kernel // 2, groups=inputs, bias=bias)
        self.pointwise = Conv2d(inputs, outputs, 1, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.pointwise(self.depthwise(x))


class ConvBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, kernel: int, act: bool = True, bn: bool = True):
        super().__init__()
        self.cnn = SeparableConv(inputs, outputs, kernel, bias=not bn)
        if bn:
            self.bn = BatchNorm(outputs)
        self.act = PReLU(outputs)  # in the file whether or not the block applies it
        self._act = act

    def __call__(self, x: mx.array) -> mx.array:
        x = self.cnn(x)
        x = self.bn(x) if "bn" in self else x
        return self.act(x) if self._act else x


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block1 = ConvBlock(channels, channels, 3)
        self.block2 = ConvBlock(channels, channels, 3, act=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block2(self.block1(x)) + x


class UpsampleBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = SeparableConv(channels, 4 * channels, 3)
        self.act = PReLU(channels)

    def __call__(self, x: mx.array) -> mx.array:
        return self.act(pixel_shuffle(self.conv(x), 2))


class SwiftSRGAN(nn.Module):
    def __init__(self, config: SwiftSRGANConfig):
        super().__init__()
        self.config = c = config
        n = c.num_channels
        self.initial = ConvBlock(c.in_channels, n, 9, bn=False)
        self.residual = [ResidualBlock(n) for _ in range(c.num_blocks)]
        self.convblock = ConvBlock(n, n, 3, act=False)
        self.upsampler = [UpsampleBlock(n) for _ in range(c.upscale.bit_length() - 1)]
        self.final_conv = SeparableConv(n, c.in_channels, 9)

    @property
    def dtype(self) -> mx.Dtype:
        return self.final_conv.pointwise.weight.dtype

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H*scale, W*scale, C)."""
        initial = self.initial(x)
        y = sequential(self.upsampler, self.convblock(sequential(self.residual, initial)) + initial)
        return (tanh(self.final_conv(y)) + 1) / 2
