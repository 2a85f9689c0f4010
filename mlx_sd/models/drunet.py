"""DRUNet (Zhang et al. 2021, "Plug-and-Play Image Restoration with Deep Denoiser Prior"): KAIR's drunet_color and
drunet_gray denoisers, 1x restoration networks A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

A UNet of four levels (KAIR's `UNetRes`): a 3x3 conv, at each of three levels residual blocks then a downsampling to
the next, residual blocks at the bottom, then per level an upsampling, the skip added, residual blocks, and a last
3x3 conv; no biases. Its input carries one channel more than the image: the noise-level map, which spandrel fills
with 15/255 (KAIR's default) when it runs the model as an image-to-image network; spandrel pads the image to
multiples of 8 (by reflection) first.

KAIR's blocks, which FBCNN (`fbcnn.py`) shares: `ResBlock` (x + conv(ReLU(conv(x)))), the downsamplings (a 2x2
strided conv; or 2x2 average pooling then a 3x3 conv, which a file cannot tell from max pooling: spandrel reads it
as average pooling) and the upsamplings (a 2x2 transposed conv; nearest then a 3x3 conv; a 3x3 conv then a pixel
shuffle), each laid out as KAIR's flattened `sequential` numbers them.

Parameter paths follow the published checkpoints (`m_head`, `m_down1.N.res.M`, ..., `m_tail`). Images are (B, H, W,
C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import ReLU
from .layers import Conv2d, conv_transpose, upsample_nearest
from .swinir import PixelShuffle, sequential

NOISE_LEVEL = 15 / 255  # the noise map spandrel gives DRUNet and FDnCNN (KAIR's default)
MULTIPLE = 8  # three 2x downsamplings: spandrel pads DRUNet's input to this


@dataclass(frozen=True)
class DRUNetConfig:
    in_channels: int = 3  # the image's; the first conv takes one more (the noise map)
    out_channels: int = 3
    nc: tuple[int, int, int, int] = (64, 128, 256, 512)  # channels per level
    nb: int = 4  # residual blocks per level
    downsample: str = "strideconv"  # or "avgpool"
    upsample: str = "convtranspose"  # or "upconv", "pixelshuffle"

    @property
    def scale(self) -> int:
        return 1


def conv_relu_conv(channels: int, bias: bool) -> list:
    """KAIR's "CRC" layers: a 3x3 conv, ReLU, a 3x3 conv."""
    return [Conv2d(channels, channels, 3, padding=1, bias=bias), ReLU(),
            Conv2d(channels, channels, 3, padding=1, bias=bias)]  # fmt: skip


class ResBlock(nn.Module):
    """KAIR's ResBlock in its "CRC" mode: x + conv(ReLU(conv(x)))."""

    def __init__(self, channels: int, bias: bool):
        super().__init__()
        self.res = conv_relu_conv(channels, bias)

    def __call__(self, x: mx.array) -> mx.array:
        return x + sequential(self.res, x)


class AvgPool(nn.Module):
    """torch's AvgPool2d(2, 2) on (B, H, W, C) of even sizes."""

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


class NearestUp(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return upsample_nearest(x)


class ConvTranspose(nn.Module):
    """torch's ConvTranspose2d with a 2x2 kernel and stride 2: the weight (in, 2, 2, out), torch's (in, out, 2, 2)
    moved as every 4-D conv weight is at conversion."""

    def __init__(self, inputs: int, outputs: int, bias: bool):
        super().__init__()
        self.weight = mx.zeros((inputs, 2, 2, outputs))
        if bias:
            self.bias = mx.zeros((outputs,))

    def __call__(self, x: mx.array) -> mx.array:
        y = conv_transpose(x, self.weight, 2)
        return y + self.bias if "bias" in self else y


def downsample(inputs: int, outputs: int, mode: str, bias: bool) -> list:
    """KAIR's `downsample_strideconv` (one layer) or `downsample_avgpool` (two: the pooling, then the conv)."""
    if mode == "strideconv":
        return [Conv2d(inputs, outputs, 2, stride=2, bias=bias)]
    return [AvgPool(), Conv2d(inputs, outputs, 3, padding=1, bias=bias)]


def upsample(inputs: int, outputs: int, mode: str, bias: bool) -> list:
    """KAIR's `upsample_convtranspose` (one layer), `upsample_upconv` (nearest, conv) or `upsample_pixelshuffle`
    (conv, shuffle)."""
    if mode == "convtranspose":
        return [ConvTranspose(inputs, outputs, bias)]
    if mode == "upconv":
        return [NearestUp(), Conv2d(inputs, outputs, 3, padding=1, bias=bias)]
    return [Conv2d(inputs, 4 * outputs, 3, padding=1, bias=bias), PixelShuffle(2)]


class DRUNet(nn.Module):
    def __init__(self, config: DRUNetConfig):
        super().__init__()
        self.config = c = config
        nc, nb, down, up = c.nc, c.nb, c.downsample, c.upsample
        self.m_head = Conv2d(c.in_channels + 1, nc[0], 3, padding=1, bias=False)
        self.m_down1 = [*(ResBlock(nc[0], False) for _ in range(nb)), *downsample(nc[0], nc[1], down, False)]
        self.m_down2 = [*(ResBlock(nc[1], False) for _ in range(nb)), *downsample(nc[1], nc[2], down, False)]
        self.m_down3 = [*(ResBlock(nc[2], False) for _ in range(nb)), *downsample(nc[2], nc[3], down, False)]
        self.m_body = [ResBlock(nc[3], False) for _ in range(nb)]
        self.m_up3 = [*upsample(nc[3], nc[2], up, False), *(ResBlock(nc[2], False) for _ in range(nb))]
        self.m_up2 = [*upsample(nc[2], nc[1], up, False), *(ResBlock(nc[1], False) for _ in range(nb))]
        self.m_up1 = [*upsample(nc[1], nc[0], up, False), *(ResBlock(nc[0], False) for _ in range(nb))]
        self.m_tail = Conv2d(nc[0], c.out_channels, 3, padding=1, bias=False)

    @property
    def dtype(self) -> mx.Dtype:
        return self.m_tail.weight.dtype

    @property
    def input_channels(self) -> int:
        return self.config.in_channels

    size_minimum = 1
    size_multiple = MULTIPLE  # spandrel's SizeRequirements(multiple_of=8), padded by reflection
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1], H and W multiples of 8 -> (B, H, W, out_channels); the noise map appended."""
        noise = mx.full((*x.shape[:3], 1), NOISE_LEVEL, x.dtype)
        x1 = self.m_head(mx.concatenate([x, noise], axis=-1))
        x2 = sequential(self.m_down1, x1)
        x3 = sequential(self.m_down2, x2)
        x4 = sequential(self.m_down3, x3)
        y = sequential(self.m_body, x4)
        y = sequential(self.m_up3, y + x4)
        y = sequential(self.m_up2, y + x3)
        y = sequential(self.m_up1, y + x2)
        return self.m_tail(y + x1)
