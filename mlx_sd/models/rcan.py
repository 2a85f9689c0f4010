"""RCAN (Zhang et al. 2018, "Image Super-Resolution Using Very Deep Residual Channel Attention Networks"): the RCAN
upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`, including the pixel-unshuffled 1x / 2x ones.

Residual groups of residual channel-attention blocks (conv, ReLU, conv, then the channel gate: the mean over the
pixels through a 1x1 bottleneck and a sigmoid), each group closed by a conv and added to its input; a conv and a
long skip over all groups; the pixel-shuffle tail. The image is scaled to [0, 255] and the files' own mean-shift 1x1
convs take the DIV2K mean off and back on. Pixel-unshuffled models (scale 1 or 2) unshuffle the input first (padded
by reflection to the factor) and upscale 4x. Without the mean-shift convs the image stays in [0, 1] (spandrel's
rgb_range 1).

Parameter paths follow the published checkpoints (spandrel's, EDSR/BasicSR's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import Placeholder, ReLU
from .layers import Conv2d, pixel_unshuffle, sigmoid
from .swinir import pixelshuffle_stages, reflect_pad, sequential

RGB_RANGE = 255.0  # the original's rgb_range with the mean shift (the files do not record it; spandrel's value)


@dataclass(frozen=True)
class RCANConfig:
    colors: int = 3
    n_feats: int = 64
    n_resgroups: int = 10
    n_resblocks: int = 20
    kernel_size: int = 3
    squeeze: int = 4  # the channel gate's bottleneck: n_feats // reduction
    upscale: int = 4  # of the network (4 for the unshuffled models)
    unshuffle: int = 1  # 4 // scale for the pixel-unshuffled 1x / 2x models
    norm: bool = True  # the mean-shift convs (sub_mean, add_mean) are in the file

    @property
    def scale(self) -> int:
        return self.upscale // self.unshuffle


class CALayer(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.conv_du = [Conv2d(channels, squeeze, 1), ReLU(), Conv2d(squeeze, channels, 1), Placeholder()]

    def __call__(self, x: mx.array) -> mx.array:
        pooled = mx.mean(x, axis=(1, 2), keepdims=True)
        return x * sigmoid(self.conv_du[2](mx.maximum(self.conv_du[0](pooled), 0)))


def conv(c: RCANConfig, inputs: int, outputs: int) -> Conv2d:
    return Conv2d(inputs, outputs, c.kernel_size, padding=c.kernel_size // 2)


class RCAB(nn.Module):
    def __init__(self, c: RCANConfig):
        super().__init__()
        f = c.n_feats
        self.body = [conv(c, f, f), ReLU(), conv(c, f, f), CALayer(f, c.squeeze)]

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.body, x) + x


class ResidualGroup(nn.Module):
    def __init__(self, c: RCANConfig):
        super().__init__()
        self.body = [*(RCAB(c) for _ in range(c.n_resblocks)), conv(c, c.n_feats, c.n_feats)]

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.body, x) + x


class RCAN(nn.Module):
    def __init__(self, config: RCANConfig):
        super().__init__()
        self.config = c = config
        if c.norm:
            self.sub_mean = Conv2d(3, 3, 1)
            self.add_mean = Conv2d(3, 3, 1)
        head = conv(c, c.colors * c.unshuffle**2, c.n_feats)
        self.head = [Placeholder(), head] if c.unshuffle > 1 else [head]  # the PixelUnshuffle keeps its index
        self.body = [*(ResidualGroup(c) for _ in range(c.n_resgroups)), conv(c, c.n_feats, c.n_feats)]
        self.tail = [pixelshuffle_stages(c.n_feats, c.upscale), conv(c, c.n_feats, c.colors)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.head[-1].weight.dtype

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, colors) in [0, 1] -> (B, H*scale, W*scale, colors)."""
        c = self.config
        _, H, W, _ = x.shape
        scale = RGB_RANGE if c.norm else 1.0
        x = reflect_pad(x, -H % c.unshuffle, -W % c.unshuffle) * scale
        if c.norm:
            x = self.sub_mean(x)
        if c.unshuffle > 1:
            x = pixel_unshuffle(x, c.unshuffle)
        features = self.head[-1](x)
        y = sequential(self.tail[0], sequential(self.body, features) + features)
        y = self.tail[1](y)
        if c.norm:
            y = self.add_mean(y)
        return (y / scale)[:, : H * c.scale, : W * c.scale]
