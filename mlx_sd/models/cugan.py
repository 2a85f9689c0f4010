"""Real-CUGAN (bilibili's anime upscalers): up2x / up3x / up4x (conservative, no-denoise, denoise1x-3x), the "pro"
models and the fast 2x, as spandrel's `UpCunet2x`, `UpCunet3x`, `UpCunet4x`, `UpCunet2x_fast` run them.

Two cascaded UNets of unpadded ("valid") convolutions with squeeze-and-excitation blocks: the first upsamples with a
transposed conv, the second refines its output, and the two are summed where they overlap (the skips crop their
borders: `F.pad` with negative sizes). The image is padded by reflection first (18 to 38 pixels) so that the valid
convolutions leave the whole image, and cropped to scale x the input at the end; the 4x and fast 2x models add the
nearest-upsampled input. "pro" models work on x 0.7 + 0.15. Images are (B, H, W, C) in [0, 1].

Parameter paths follow the published checkpoints; the activations inside their `nn.Sequential`s keep their indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .esrgan import upsample_repeat
from .layers import Conv2d, conv_transpose, pixel_shuffle, pixel_unshuffle, sigmoid
from .swinir import sequential

SLOPE = 0.1  # every LeakyReLU's


@dataclass(frozen=True)
class CUGANConfig:
    in_channels: int = 3
    out_channels: int = 3
    upscale: int = 2  # 2, 3 or 4
    pro: bool = False
    fast: bool = False  # UpCunet2x_fast: pixel-unshuffled input

    @property
    def scale(self) -> int:
        return self.upscale


class LeakyReLU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return nn.leaky_relu(x, SLOPE)


class ConvTranspose(nn.Module):
    """torch's ConvTranspose2d; the weight as every 4-D conv weight is moved at conversion: (in, k, k, out)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int, padding: int):
        super().__init__()
        self.weight = mx.zeros((inputs, kernel, kernel, outputs))
        self.bias = mx.zeros((outputs,))
        self._stride, self._padding = stride, padding

    def __call__(self, x: mx.array) -> mx.array:
        return conv_transpose(x, self.weight, self._stride, self._padding) + self.bias


def crop(x: mx.array, n: int) -> mx.array:
    """torch's F.pad(x, (-n, -n, -n, -n)): n pixels off every border."""
    return x[:, n:-n, n:-n]


class SEBlock(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.conv1 = Conv2d(channels, channels // reduction, 1)
        self.conv2 = Conv2d(channels // reduction, channels, 1)

    def __call__(self, x: mx.array) -> mx.array:
        pooled = mx.mean(x.astype(mx.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
        return x * sigmoid(self.conv2(mx.maximum(self.conv1(pooled), 0)))


class UNetConv(nn.Module):
    def __init__(self, inputs: int, middle: int, outputs: int, se: bool):
        super().__init__()
        self.conv = [Conv2d(inputs, middle, 3), LeakyReLU(), Conv2d(middle, outputs, 3), LeakyReLU()]
        if se:
            self.seblock = SEBlock(outputs)

    def __call__(self, x: mx.array) -> mx.array:
        y = sequential(self.conv, x)
        return self.seblock(y) if "seblock" in self else y


class UNet1(nn.Module):
    """The first UNet; its last layer a transposed conv (4, stride 2, padding 3; for 3x: 5, 3, 2)."""

    def __init__(self, inputs: int, outputs: int, three: bool = False):
        super().__init__()
        self.conv1 = UNetConv(inputs, 32, 64, se=False)
        self.conv1_down = Conv2d(64, 64, 2, stride=2)
        self.conv2 = UNetConv(64, 128, 64, se=True)
        self.conv2_up = ConvTranspose(64, 64, 2, 2, 0)
        self.conv3 = Conv2d(64, 64, 3)
        self.conv_bottom = ConvTranspose(64, outputs, *((5, 3, 2) if three else (4, 2, 3)))

    def __call__(self, x: mx.array) -> mx.array:
        x1 = self.conv1(x)
        x2 = self.conv2(nn.leaky_relu(self.conv1_down(x1), SLOPE))
        x2 = nn.leaky_relu(self.conv2_up(x2), SLOPE)
        return self.conv_bottom(nn.leaky_relu(self.conv3(crop(x1, 4) + x2), SLOPE))


class UNet2(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv1 = UNetConv(inputs, 32, 64, se=False)
        self.conv1_down = Conv2d(64, 64, 2, stride=2)
        self.conv2 = UNetConv(64, 64, 128, se=True)
        self.conv2_down = Conv2d(128, 128, 2, stride=2)
        self.conv3 = UNetConv(128, 256, 128, se=True)
        self.conv3_up = ConvTranspose(128, 128, 2, 2, 0)
        self.conv4 = UNetConv(128, 64, 64, se=True)
        self.conv4_up = ConvTranspose(64, 64, 2, 2, 0)
        self.conv5 = Conv2d(64, 64, 3)
        self.conv_bottom = Conv2d(64, outputs, 3)

    def __call__(self, x: mx.array) -> mx.array:
        x1 = self.conv1(x)
        x2 = self.conv2(nn.leaky_relu(self.conv1_down(x1), SLOPE))
        x3 = self.conv3(nn.leaky_relu(self.conv2_down(x2), SLOPE))
        x3 = nn.leaky_relu(self.conv3_up(x3), SLOPE)
        x4 = nn.leaky_relu(self.conv4_up(self.conv4(crop(x2, 4) + x3)), SLOPE)
        return self.conv_bottom(nn.leaky_relu(self.conv5(crop(x1, 16) + x4), SLOPE))


def reflect_pad(x: mx.array, before: int, after_h: int, after_w: int) -> mx.array:
    """torch's F.pad(mode="reflect") by `before` on the top and left and the afters on the bottom and right."""
    for axis, after in ((1, after_h), (2, after_w)):
        n = x.shape[axis]
        index = [*(before - k for k in range(before)), *range(n), *(n - 2 - k for k in range(after))]
        x = mx.take(x, mx.array(index), axis=axis)
    return x


class CUGAN(nn.Module):
    def __init__(self, config: CUGANConfig):
        super().__init__()
        self.config = c = config
        if c.upscale == 4 or c.fast:
            self.unet1 = UNet1(c.in_channels * (4 if c.fast else 1), 64)
            self.unet2 = UNet2(64, 64)
            self.conv_final = Conv2d(64, 4 * c.out_channels, 3)
        else:
            self.unet1 = UNet1(c.in_channels, c.out_channels, three=c.upscale == 3)
            self.unet2 = UNet2(c.in_channels, c.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        return self.unet1.conv3.weight.dtype

    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    @property
    def size_minimum(self) -> int:
        return 40 if self.config.fast else 32  # spandrel's size requirements (the fast model: also a multiple of 4)

    @property
    def size_multiple(self) -> int:
        return 4 if self.config.fast else 1

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H*scale, W*scale, out)."""
        c, s = self.config, self.config.upscale
        _, H, W, _ = x.shape
        if c.pro:
            x = x * 0.7 + 0.15
        source = x
        step = 4 if s == 3 else 2  # the padded size's multiple
        ph, pw = -H % step, -W % step
        border = 38 if c.fast else {2: 18, 3: 14, 4: 19}[s]
        x = reflect_pad(x, border, border + ph, border + pw)
        if c.fast:
            x = pixel_unshuffle(x, 2)
        x = self.unet1(x)
        y = self.unet2(x) + crop(x, 20)
        if c.upscale == 4 or c.fast:
            y = pixel_shuffle(crop(self.conv_final(y), 1), 2)
        y = y[:, : H * s, : W * s]
        if c.upscale == 4 or c.fast:
            y = y + upsample_repeat(source, s)
        return (y - 0.15) / 0.7 if c.pro else y
