"""SRFormer (Zhou et al. 2023, "SRFormer: Permuted Self-Attention for Single Image Super-Resolution"): SRFormer,
SRFormer-light and the real-world SRFormer models (spandrel_extra_arches' `SRFormer`, which ComfyUI and chaiNNer load
beside spandrel).

SwinIR's layout (`mlx_sd.models.swinir`: padding by reflection to the window, the DIV2K mean, a 3x3 conv, residual
groups, LayerNorm, conv, one of its four heads) with other blocks. Permuted self-attention: within each window of
window x window pixels (22 or 16 in the published models) the queries keep every pixel, while keys and values are
projected to half the channels and each 2x2 cell's four pixels are stacked into one token of the full width: window^2
queries against window^2 / 4 keys, with a relative position bias over the half-size window (each query takes its own
cell's offsets). Every second block shifts the windows by half a window, with the mask of SwinIR's regions against
those of the key cells (cut on the half-size map, at -ceil(shift / 2) as the original's `-shift // 2` does). The
feed-forward is ATD's (fc1, GELU, plus a 5x5 depthwise conv with GELU, fc2).

Parameter paths follow the published checkpoints (the original's, spandrel_extra_arches'). Images are (B, H, W, C) in
[0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import window_attention
from .atd import ConvFFN
from .layers import Conv2d, LayerNorm, linear
from .swinir import (
    DIV2K_MEAN,
    MASKED,
    RSTB,
    PatchEmbed,
    build_head,
    reflect_pad,
    relative_position_index,
    residual_convs,
    run_head,
    sequential,
    shift_regions,
    shifted_windows,
)

FFN_KERNEL = 5  # the feed-forward's depthwise conv


@dataclass(frozen=True)
class SRFormerConfig:
    in_channels: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 22  # even: 2x2 cells pool the keys
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    patch_norm: bool = True
    upsampler: str = "pixelshuffle"  # or "pixelshuffledirect", "nearest+conv" (4x), "" (restoration)
    upscale: int = 4
    resi_connection: str = "1conv"  # or "3conv"
    num_feat: int = 64  # the "pixelshuffle" and "nearest+conv" heads' width (fixed in the original)
    img_size: int = 66  # the training size rounded up to the window: blocks shift only where it exceeds the window

    @property
    def scale(self) -> int:
        return self.upscale


@lru_cache(maxsize=16)
def permuted_position_index(window: int) -> np.ndarray:
    """(window^2, (window / 2)^2) bias-table row of each (query pixel, key cell) pair: the offset of the query's 2x2
    cell to the key cell in the half-size window (the original's `aligned_relative_position_index`)."""
    half = window // 2
    cell = (np.arange(window)[:, None] // 2) * half + np.arange(window)[None, :] // 2  # each pixel's cell
    return relative_position_index(half, half)[cell.reshape(-1)]


@lru_cache(maxsize=16)
def permuted_shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """(nW, N, N / 4) additive mask of shifted windows whose keys are 2x2 cells: 0 where a query pixel's region
    (SwinIR's 3 x 3 regions) is its key cell's, -100 elsewhere; the cells' regions are cut on the half-size map at
    -window / 2 and -ceil(shift / 2) (the original's `-shift_size // 2`): a cell straddling the shift's cut (an odd
    shift, 11 for the published 22-pixel windows) takes the later region."""
    pixels = shift_regions(height, width, window, shift)
    halves = tuple(w // 2 for w in window)
    cells = shift_regions(height // 2, width // 2, halves, tuple(-(-s // 2) for s in shift))
    return np.where(pixels[:, :, None] != cells[:, None, :], MASKED, 0.0).astype(np.float32)


class PermutedSelfAttention(nn.Module):
    """The original's PSA: every pixel's query against keys and values of the window's 2x2 cells, each cell's four
    half-width projections stacked (row-major) into one full-width token."""

    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = mx.zeros(((window - 1) ** 2, heads))  # (2 * window / 2 - 1)^2 offsets
        self.kv = nn.Linear(dim, dim // 2, bias=qkv_bias)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        """x: (B*nW, N, C) windows; mask: (nW, N, N / 4) or None."""
        Bw, N, C = x.shape
        half = self.window // 2
        kv = linear(self.kv, x).reshape(Bw, half, 2, half, 2, 2, C // 4)  # (.., cell row, dy, cell col, dx, k|v, C/4)
        kv = kv.transpose(0, 1, 3, 5, 2, 4, 6).reshape(Bw, N // 4, 2, C)  # (.., cell, k|v, dy dx C/4)
        index = mx.array(permuted_position_index(self.window).reshape(-1))
        bias = self.relative_position_bias_table[index].reshape(N, N // 4, self.heads).transpose(2, 0, 1)
        out = window_attention(linear(self.q, x), kv[:, :, 0], kv[:, :, 1], self.heads, bias, mask)
        return linear(self.proj, out)


class PSABlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, qkv_bias: bool = True):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm(dim)
        self.attn = PermutedSelfAttention(dim, window, heads, qkv_bias)
        self.norm2 = LayerNorm(dim)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), FFN_KERNEL)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        """x: (B, H*W, C) tokens of an H x W map (multiples of the window)."""
        B, L, C = x.shape
        y = self.norm1(x).reshape(B, *size, C)
        x = x + shifted_windows(self.attn, y, self.window, self.shift, permuted_shift_mask).reshape(B, L, C)
        return self.mlp(self.norm2(x), size, x)


class SRFormer(nn.Module):
    def __init__(self, config: SRFormerConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.conv_first = Conv2d(c.in_channels, d, 3, padding=1)
        if c.patch_norm:
            self.patch_embed = PatchEmbed(d)
        block = partial(PSABlock, qkv_bias=c.qkv_bias)
        self.layers = [RSTB(c, depth, heads, block) for depth, heads in zip(c.depths, c.num_heads, strict=True)]
        self.norm = LayerNorm(d)
        self.conv_after_body = residual_convs(d, c.resi_connection)
        build_head(self, c, c.in_channels)

    dtype = mx.float32  # spandrel_extra_arches never runs SRFormer in half precision
    size_minimum = 16  # its smallest input
    size_multiple = 1
    a1111_tiling = "grid"  # run as the other spandrel architectures from models/ESRGAN (`upscale_with_model`)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, in)."""
        c = self.config
        _, H, W, _ = x.shape
        ws = c.window_size
        x = reflect_pad(x, -H % ws, -W % ws)
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype)
        x = x - mean  # img_range 1: spandrel_extra_arches' value, the published models'
        first = self.conv_first(x)
        B, h, w, C = first.shape
        tokens = first.reshape(B, h * w, C)
        if "patch_embed" in self:
            tokens = self.patch_embed.norm(tokens)
        for layer in self.layers:
            tokens = layer(tokens, (h, w))
        y = sequential(self.conv_after_body, self.norm(tokens).reshape(first.shape)) + first
        return (run_head(self, c, y, x) + mean)[:, : H * c.upscale, : W * c.upscale]
