"""DRCT (Hsu et al. 2024, "DRCT: Saving Image Super-resolution away from Information Bottleneck"): DRCT-L,
4xRealWebPhoto_v4_drct-l and the other DRCT upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

SwinIR's layout (a 3x3 conv, residual groups at the input size, a pixel-shuffle head) with dense groups: each group
runs five Swin blocks, the k-th over the group input concatenated with the k - 1 earlier blocks' outputs, each
block's output squeezed by a 1x1 conv to `gc` channels (LeakyReLU 0.2 after all but the last, which returns to the
width); the group returns 0.2 x that plus its input. The blocks alternate unshifted and shifted windows; their head
counts make the widened channel counts divisible (the files record them). The input is normalised by the DIV2K mean
and must be a multiple of 16 pixels (spandrel pads it, as `ModelUpscaler` does).

Parameter paths follow the published checkpoints. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d
from .swinir import DIV2K_MEAN, PixelShuffleTrunk, SwinTransformerBlock

BLOCKS = 5  # Swin blocks per dense group
GROUP_SCALE = 0.2  # the dense group's residual scale


@dataclass(frozen=True)
class DRCTConfig:
    in_channels: int = 3
    embed_dim: int = 180
    num_heads: tuple[tuple[int, ...], ...] = ((6, 4, 6, 4, 6),) * 6  # per group, per block (the files' bias tables)
    window_size: int = 16
    mlp_ratio: float = 2.0  # of the first three blocks of a group; the last two have 1
    gc: int = 32  # the growth: channels each block adds to the next one's input
    upscale: int = 4
    resi_connection: str = "1conv"  # or "identity"
    patch_norm: bool = True
    num_feat: int = 64
    img_size: int = 64  # the training size; windows larger than it shrink to it (the original's rule)

    @property
    def scale(self) -> int:
        return self.upscale


class RDG(nn.Module):
    """Residual dense group: five Swin blocks over the growing concatenation, each squeezed by a 1x1 conv."""

    def __init__(self, c: DRCTConfig, heads: tuple[int, ...]):
        super().__init__()
        window = min(c.window_size, c.img_size)
        shift = window // 2 if c.img_size > c.window_size else 0
        for k in range(BLOCKS):
            dim = c.embed_dim + k * c.gc
            mlp_ratio = c.mlp_ratio if k < 3 else 1.0
            setattr(self, f"swin{k + 1}", SwinTransformerBlock(dim, heads[k], window, shift if k % 2 else 0, mlp_ratio))
            setattr(self, f"adjust{k + 1}", Conv2d(dim, c.gc if k < BLOCKS - 1 else c.embed_dim, 1))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, _ = x.shape
        features = [x]
        for k in range(1, BLOCKS + 1):
            y = getattr(self, f"swin{k}")(mx.concatenate(features, axis=-1) if k > 1 else x, size)
            y = getattr(self, f"adjust{k}")(y.reshape(B, *size, -1)).reshape(B, L, -1)
            features.append(nn.leaky_relu(y, 0.2) if k < BLOCKS else y)
        return features[-1] * GROUP_SCALE + x


class DRCT(PixelShuffleTrunk):
    def __init__(self, config: DRCTConfig):
        super().__init__()
        self.config = c = config
        self._build(c, [RDG(c, heads) for heads in c.num_heads])

    dtype = mx.float32  # spandrel (and so A1111) never runs DRCT in half precision
    size_minimum = 1
    size_multiple = 16  # spandrel's size requirement: the input padded to it, the output cropped
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1], H and W multiples of 16 -> (B, H*scale, W*scale, in)."""
        mean = mx.array(DIV2K_MEAN if self.config.in_channels == 3 else (0.0,), x.dtype)
        return self._run(x - mean) + mean
