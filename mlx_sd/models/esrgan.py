"""Super-resolution networks of the ESRGAN family, the model upscalers of A1111's hires fix and "Extras" tab.

- `RRDBNet`: ESRGAN (Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution Generative Adversarial Networks") and the
  models trained with its architecture: Real-ESRGAN 4x+ / 4x+ Anime6B / 2x+, BSRGAN, and the community's
  4x-UltraSharp, Remacri, NMKD, ... A trunk of residual-in-residual dense blocks at the input size, then 2x nearest
  upsampling + conv per octave. Real-ESRGAN's 2x and 1x models first pixel-unshuffle the image (their "4x" trunk then
  lands on 2x or 1x). ESRGAN+ adds a 1x1 convolution inside each dense block.
- `SRVGGNetCompact`: Real-ESRGAN's compact network (realesr-general-x4v3, realesr-animevideov3): plain convs + PReLU
  at the input size, a pixel shuffle, plus the nearest-upsampled input.

Parameter paths follow BasicSR's (Real-ESRGAN's) names; the old ESRGAN layout (`model.0`, `model.1.sub.N.RDB1...`)
and BSRGAN's are mapped onto them in `convert/upscaler.py`. Images are (B, H, W, C) in [0, 1]; outputs are not
clamped (`mlx_sd.model_upscaler` clamps, as spandrel does).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, pixel_shuffle, pixel_unshuffle

LEAKY_SLOPE = 0.2  # ESRGAN's LeakyReLU
RESIDUAL_SCALE = 0.2  # dense blocks and RRDBs add 0.2 x their output to the input


@dataclass(frozen=True)
class ESRGANConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    num_blocks: int = 23
    growth: int = 32  # channels each dense-block conv adds
    upsamples: int = 2  # 2x nearest + conv stages after the trunk
    shuffle: int = 1  # pixel-unshuffle factor of the input (Real-ESRGAN 2x+: 2; 1x models: 4)
    plus: bool = False  # ESRGAN+ 1x1 residual paths

    @property
    def scale(self) -> int:
        return 2**self.upsamples // self.shuffle


@dataclass(frozen=True)
class CompactConfig:
    in_channels: int = 3
    out_channels: int = 3
    num_feat: int = 64
    num_conv: int = 16
    scale: int = 4


def upsample_repeat(x: mx.array, r: int) -> mx.array:
    """Nearest-neighbour upsampling by an integer factor: every pixel repeated r x r (torch's "nearest")."""
    B, H, W, C = x.shape
    return mx.broadcast_to(x[:, :, None, :, None, :], (B, H, r, W, r, C)).reshape(B, H * r, W * r, C)


class ResidualDenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output; LeakyReLU after all but the last."""

    def __init__(self, num_feat: int, growth: int, plus: bool):
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", Conv2d(num_feat + i * growth, growth, 3, padding=1))
        self.conv5 = Conv2d(num_feat + 4 * growth, num_feat, 3, padding=1)
        if plus:
            self.conv1x1 = Conv2d(num_feat, growth, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        plus = "conv1x1" in self
        x1 = nn.leaky_relu(self.conv1(x), LEAKY_SLOPE)
        x2 = nn.leaky_relu(self.conv2(mx.concatenate([x, x1], axis=-1)), LEAKY_SLOPE)
        if plus:
            x2 = x2 + self.conv1x1(x)
        x3 = nn.leaky_relu(self.conv3(mx.concatenate([x, x1, x2], axis=-1)), LEAKY_SLOPE)
        x4 = nn.leaky_relu(self.conv4(mx.concatenate([x, x1, x2, x3], axis=-1)), LEAKY_SLOPE)
        if plus:
            x4 = x4 + x2
        x5 = self.conv5(mx.concatenate([x, x1, x2, x3, x4], axis=-1))
        return x5 * RESIDUAL_SCALE + x


class RRDB(nn.Module):
    """Residual in residual dense block: three dense blocks, then 0.2 x that plus the input."""

    def __init__(self, num_feat: int, growth: int, plus: bool):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, growth, plus)
        self.rdb2 = ResidualDenseBlock(num_feat, growth, plus)
        self.rdb3 = ResidualDenseBlock(num_feat, growth, plus)

    def __call__(self, x: mx.array) -> mx.array:
        return self.rdb3(self.rdb2(self.rdb1(x))) * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
    def __init__(self, config: ESRGANConfig):
        super().__init__()
        self.config = config
        c = config
        self.conv_first = Conv2d(c.in_channels * c.shuffle**2, c.num_feat, 3, padding=1)
        self.body = [RRDB(c.num_feat, c.growth, c.plus) for _ in range(c.num_blocks)]
        self.conv_body = Conv2d(c.num_feat, c.num_feat, 3, padding=1)
        for i in range(c.upsamples):
            setattr(self, f"conv_up{i + 1}", Conv2d(c.num_feat, c.num_feat, 3, padding=1))
        self.conv_hr = Conv2d(c.num_feat, c.num_feat, 3, padding=1)
        self.conv_last = Conv2d(c.num_feat, c.out_channels, 3, padding=1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_first.weight.dtype

    size_minimum = 2  # spandrel's smallest ESRGAN input (its reflection padding needs two pixels)
    a1111_tiling = "grid"  # A1111 runs ESRGAN through `upscale_with_model` (Pillow tile grid), see model_upscaler

    @property
    def size_multiple(self) -> int:
        """Input sizes must be multiples of this (spandrel asks 4 of every unshuffling model, A1111 pads to it)."""
        return 4 if self.config.shuffle > 1 else 1

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1], H and W multiples of `size_multiple` -> (B, H*scale, W*scale, out)."""
        if self.config.shuffle > 1:
            x = pixel_unshuffle(x, self.config.shuffle)
        feat = self.conv_first(x)
        trunk = feat
        for block in self.body:
            trunk = block(trunk)
        feat = feat + self.conv_body(trunk)
        for i in range(self.config.upsamples):
            feat = nn.leaky_relu(getattr(self, f"conv_up{i + 1}")(upsample_repeat(feat, 2)), LEAKY_SLOPE)
        return self.conv_last(nn.leaky_relu(self.conv_hr(feat), LEAKY_SLOPE))


# One compiled kernel instead of four elementwise passes (a tenth of the compact network's time on CPU).
_prelu = mx.compile(lambda x, slope: mx.maximum(x, 0) + slope * mx.minimum(x, 0), shapeless=True)


class PReLU(nn.Module):
    """torch's PReLU with one slope per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = mx.full((channels,), 0.25)

    def __call__(self, x: mx.array) -> mx.array:
        return _prelu(x, self.weight.astype(x.dtype))


class SRVGGNetCompact(nn.Module):
    def __init__(self, config: CompactConfig):
        super().__init__()
        self.config = config
        c = config
        layers = [Conv2d(c.in_channels, c.num_feat, 3, padding=1), PReLU(c.num_feat)]
        for _ in range(c.num_conv):
            layers += [Conv2d(c.num_feat, c.num_feat, 3, padding=1), PReLU(c.num_feat)]
        layers.append(Conv2d(c.num_feat, c.out_channels * c.scale**2, 3, padding=1))
        self.body = layers  # body.{2i}: convs, body.{2i+1}: PReLUs, as Real-ESRGAN numbers them

    size_multiple = 1
    size_minimum = 2
    a1111_tiling = "grid"

    @property
    def dtype(self) -> mx.Dtype:
        return self.body[0].weight.dtype

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, out): the learned residual over nearest upsampling."""
        out = x
        for layer in self.body:
            out = layer(out)
        return pixel_shuffle(out, self.config.scale) + upsample_repeat(x, self.config.scale)
