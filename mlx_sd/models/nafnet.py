"""NAFNet (Chen et al. 2022, "Simple Baselines for Image Restoration"): NAFNet-SIDD (denoising), NAFNet-GoPro and
NAFNet-REDS (deblurring), 1x restoration networks A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

A UNet of NAFBlocks without nonlinear activations: LayerNorm over the channels, a 1x1 conv to twice the width, a 3x3
depthwise conv, the simple gate (one half times the other), simplified channel attention (the image's global
average, a 1x1 conv, a product), a 1x1 conv, added with a per-channel scale beta; then LayerNorm, a 1x1 conv, the
gate, a 1x1 conv, added with a scale gamma. Each encoder level ends in a 2x2 strided conv to twice the channels,
each decoder level starts with a 1x1 conv to twice the channels and a pixel shuffle, then adds the skip; the image is
added at the end. The input is padded with zeros to a multiple of 2^levels and the output cropped, as the original
does. The channel attention averages the whole (padded) input, so a tile's output depends on the whole tile.

Parameter paths follow the published checkpoints (`intro`, `encoders.N.M`, `downs.N`, `middle_blks.N`, `ups.N.0`,
`decoders.N.M`, `ending`). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import Placeholder
from .layers import Conv2d, LayerNorm, pixel_shuffle
from .swinir import sequential

LN_EPS = 1e-6  # the original's LayerNorm2d


@dataclass(frozen=True)
class NAFNetConfig:
    img_channel: int = 3
    width: int = 16
    middle_blk_num: int = 1
    enc_blk_nums: tuple[int, ...] = ()
    dec_blk_nums: tuple[int, ...] = ()

    @property
    def scale(self) -> int:
        return 1


def simple_gate(x: mx.array) -> mx.array:
    a, b = mx.split(x, 2, axis=-1)
    return a * b


class NAFBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1 = LayerNorm(c, eps=LN_EPS)
        self.conv1 = Conv2d(c, 2 * c, 1)
        self.conv2 = Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.sca = [Placeholder(), Conv2d(c, c, 1)]  # global average pooling (applied in __call__), a 1x1 conv
        self.conv3 = Conv2d(c, c, 1)
        self.beta = mx.zeros((1, 1, 1, c))
        self.norm2 = LayerNorm(c, eps=LN_EPS)
        self.conv4 = Conv2d(c, 2 * c, 1)
        self.conv5 = Conv2d(c, c, 1)
        self.gamma = mx.zeros((1, 1, 1, c))

    def __call__(self, inp: mx.array) -> mx.array:
        x = simple_gate(self.conv2(self.conv1(self.norm1(inp))))
        x = x * self.sca[1](x.mean(axis=(1, 2), keepdims=True))  # (B, 1, 1, c) per image
        y = inp + self.conv3(x) * self.beta
        x = self.conv5(simple_gate(self.conv4(self.norm2(y))))
        return y + x * self.gamma


class NAFNet(nn.Module):
    def __init__(self, config: NAFNetConfig):
        super().__init__()
        self.config = c = config
        self.intro = Conv2d(c.img_channel, c.width, 3, padding=1)
        self.ending = Conv2d(c.width, c.img_channel, 3, padding=1)
        chan = c.width
        self.encoders, self.downs = [], []
        for num in c.enc_blk_nums:
            self.encoders.append([NAFBlock(chan) for _ in range(num)])
            self.downs.append(Conv2d(chan, 2 * chan, 2, stride=2))
            chan *= 2
        self.middle_blks = [NAFBlock(chan) for _ in range(c.middle_blk_num)]
        self.ups, self.decoders = [], []
        for num in c.dec_blk_nums:
            self.ups.append([Conv2d(chan, 2 * chan, 1, bias=False)])  # then a pixel shuffle (in __call__)
            chan //= 2
            self.decoders.append([NAFBlock(chan) for _ in range(num)])

    @property
    def dtype(self) -> mx.Dtype:
        return self.ending.weight.dtype

    @property
    def input_channels(self) -> int:
        return self.config.img_channel

    size_minimum = 1
    size_multiple = 1  # the network pads itself (with zeros) to 2^levels
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, inp: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H, W, C)."""
        _, H, W, _ = inp.shape
        m = 2 ** len(self.encoders)
        inp = mx.pad(inp, [(0, 0), (0, -H % m), (0, -W % m), (0, 0)])
        x = self.intro(inp)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = sequential(encoder, x)
            skips.append(x)
            x = down(x)
        x = sequential(self.middle_blks, x)
        for decoder, up, skip in zip(self.decoders, self.ups, skips[::-1]):
            x = sequential(decoder, pixel_shuffle(up[0](x), 2) + skip)
        return (self.ending(x) + inp)[:, :H, :W]
