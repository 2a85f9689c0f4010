"""SAFMN (Sun et al. 2023, "Spatially-Adaptive Feature Modulation for Efficient Image Super-Resolution"): the small
SAFMN upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`, and its 1x BCIE variant (`SAFMNBCIE`: the
same blocks on the pixel-unshuffled image, in residual groups) for bicubic and compression artefacts.

A 3x3 conv, then blocks of: a LayerNorm over the channels and the spatially-adaptive feature modulation (the
channels in four parts, each through a depthwise 3x3 conv at 1, 1/2, 1/4 and 1/8 of the size: max-pooled there,
upsampled back to the nearest pixel; a 1x1 conv mixes them; GELU of that times the input), plus the input; a second
LayerNorm and a conv feed-forward (3x3 to twice the channels, GELU, 1x1 back), plus its input. A residual over the
blocks, a 3x3 conv and a pixel shuffle. Inputs are multiples of 8 (spandrel pads them, as `ModelUpscaler` does), so
the original's adaptive pooling and nearest interpolation are exact 2^i windows and repeats.

Parameter paths follow the published checkpoints; the GELUs inside their `nn.Sequential`s keep their indices.
Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import GELU, Placeholder
from .esrgan import upsample_repeat
from .layers import Conv2d, LayerNorm, gelu, max_pool, pixel_shuffle, pixel_unshuffle
from .swinir import PixelShuffle, sequential

LEVELS = 4  # the modulation's scales: 1, 1/2, 1/4, 1/8


@dataclass(frozen=True)
class SAFMNConfig:
    dim: int = 36
    n_blocks: int = 8
    hidden: int = 72  # the feed-forward's width: int(dim x ffn_scale)
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


class SAFM(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        part = dim // LEVELS
        self.mfr = [Conv2d(part, part, 3, padding=1, groups=part) for _ in range(LEVELS)]
        self.aggr = Conv2d(dim, dim, 1)

    def __call__(self, x: mx.array) -> mx.array:
        part = x.shape[-1] // LEVELS
        levels = []
        for i, conv in enumerate(self.mfr):
            chunk = x[..., i * part : (i + 1) * part]
            levels.append(conv(chunk) if i == 0 else upsample_repeat(conv(max_pool(chunk, 2**i)), 2**i))
        return gelu(self.aggr(mx.concatenate(levels, axis=-1))) * x


class CCM(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ccm = [Conv2d(dim, hidden, 3, padding=1), GELU(), Conv2d(hidden, dim, 1)]


class AttBlock(nn.Module):
    def __init__(self, c: SAFMNConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.dim, eps=1e-6)
        self.norm2 = LayerNorm(c.dim, eps=1e-6)
        self.safm = SAFM(c.dim)
        self.ccm = CCM(c.dim, c.hidden)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.safm(self.norm1(x)) + x
        return sequential(self.ccm.ccm, self.norm2(x)) + x


@dataclass(frozen=True)
class SAFMNBCIEConfig:
    """SAFMN's BCIE variant (bicubic/compressed image enhancement, 1x): pixel-unshuffled by `unshuffle`, groups of
    `num_layers` blocks each closed by a conv and a residual."""

    dim: int = 48
    n_blocks: int = 6
    num_layers: int = 6
    hidden: int = 96
    unshuffle: int = 2

    @property
    def scale(self) -> int:
        return 1


class BasicLayer(nn.Module):
    def __init__(self, c: SAFMNBCIEConfig):
        super().__init__()
        block = SAFMNConfig(dim=c.dim, hidden=c.hidden)
        self.layers = [AttBlock(block) for _ in range(c.num_layers)]
        self.conv = Conv2d(c.dim, c.dim, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(sequential(self.layers, x)) + x


class SAFMNBCIE(nn.Module):
    """The 1x BCIE network: unshuffle and a conv, the groups plus a long residual, a conv, a shuffle and a conv."""

    def __init__(self, config: SAFMNBCIEConfig):
        super().__init__()
        self.config = c = config
        self.to_feat = [Placeholder(), Conv2d(3 * c.unshuffle**2, c.dim, 3, padding=1)]
        self.feats = [BasicLayer(c) for _ in range(c.n_blocks)]
        self.to_img = [Conv2d(c.dim, c.dim * c.unshuffle**2, 3, padding=1), PixelShuffle(c.unshuffle),
                       Conv2d(c.dim, 3, 3, padding=1)]  # fmt: skip

    dtype = mx.float32  # spandrel (and so A1111) runs it in float32
    size_minimum = 1
    a1111_tiling = "grid"

    @property
    def size_multiple(self) -> int:
        return 8 * self.config.unshuffle  # spandrel's 16 for its 2x unshuffle: whole pooling windows at every level

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, 3) in [0, 1], H and W multiples of 8 x unshuffle -> (B, H, W, 3)."""
        first = self.to_feat[1](pixel_unshuffle(x, self.config.unshuffle))
        return sequential(self.to_img, sequential(self.feats, first) + first)


class SAFMN(nn.Module):
    def __init__(self, config: SAFMNConfig):
        super().__init__()
        self.config = c = config
        self.to_feat = Conv2d(3, c.dim, 3, padding=1)
        self.feats = [AttBlock(c) for _ in range(c.n_blocks)]
        self.to_img = [Conv2d(c.dim, 3 * c.upscale**2, 3, padding=1)]

    dtype = mx.float32  # spandrel (and so A1111) runs SAFMN in float32
    size_minimum = 1
    size_multiple = 8  # spandrel's size requirement: the input padded to it, the output cropped
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, 3) in [0, 1], H and W multiples of 8 -> (B, H*scale, W*scale, 3)."""
        first = self.to_feat(x)
        return pixel_shuffle(self.to_img[0](sequential(self.feats, first) + first), self.config.upscale)
