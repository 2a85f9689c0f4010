"""Swin2SR (Conde et al. 2022, "Swin2SR: SwinV2 Transformer for Compressed Image Super-Resolution and Restoration"):
the classical, lightweight and real-world Swin2SR upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

SwinIR's layout with Swin Transformer V2 blocks: scaled cosine attention (queries and keys L2-normalised, times a
learned per-head temperature capped at 100), a continuous relative position bias (a small MLP over log-spaced window
offsets, 16 x sigmoid), q and v biases without a k bias, and the norms after the attention and the MLP (res-post-norm).
The patch embeddings are 1x1 convs here (at the trunk's start and closing every residual group). The image is padded
by reflection to a multiple of the window, normalised by the DIV2K mean and cropped back at the end.

Parameter paths follow the published checkpoints. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import window_attention
from .layers import Conv2d, LayerNorm, linear
from .swinir import (
    DIV2K_MEAN,
    LeakyReLU,
    ResidualGroup,
    build_head,
    reflect_pad,
    relative_position_index,
    residual_convs,
    run_head,
    sequential,
    shifted_windows,
)

MAX_TEMPERATURE = 100.0  # the logit scale's cap: exp(clamp(logit_scale, max=log(1 / 0.01)))


@dataclass(frozen=True)
class Swin2SRConfig:
    in_channels: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    upsampler: str = "pixelshuffle"  # or "pixelshuffledirect", "nearest+conv" (4x), "" (restoration)
    upscale: int = 4
    resi_connection: str = "1conv"  # or "3conv"
    num_feat: int = 64
    img_size: int = 64  # the training size; windows larger than it shrink to it (the original's rule)

    @property
    def scale(self) -> int:
        return self.upscale


@lru_cache(maxsize=16)
def log_offsets(window: int) -> np.ndarray:
    """((2w - 1)^2, 2) the window offsets (dy, dx) the position MLP reads: scaled to [-8, 8], then
    sign * log2(|x| + 1) / 3 (the original's `relative_coords_table`)."""
    r = np.arange(-(window - 1), window, dtype=np.float32)
    table = np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1) / np.float32(window - 1) * np.float32(8)
    return (np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8)).astype(np.float32).reshape(-1, 2)


class WindowAttentionV2(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.logit_scale = mx.zeros((heads, 1, 1))
        self.cpb_mlp = [nn.Linear(2, 512), LeakyReLU(0.0), nn.Linear(512, heads, bias=False)]  # slope 0: ReLU
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = mx.zeros((dim,))
        self.v_bias = mx.zeros((dim,))
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) or None."""
        Bw, N, C = x.shape
        h, d = self.heads, C // self.heads
        qkv = x @ self.qkv.weight.T + mx.concatenate([self.q_bias, mx.zeros_like(self.q_bias), self.v_bias])
        q, k, v = mx.split(qkv, 3, axis=-1)
        # cosine attention as window_attention's q k^T / sqrt(d): both normalised, the queries carrying the
        # temperature (and sqrt(d), which the product divides out again)
        norm = lambda t: t / mx.maximum(mx.linalg.norm(t, axis=-1, keepdims=True), 1e-12)  # noqa: E731 F.normalize
        temperature = mx.exp(mx.minimum(self.logit_scale.reshape(h, 1), np.log(MAX_TEMPERATURE))) * d**0.5
        q = (norm(q.reshape(Bw, N, h, d)) * temperature).reshape(Bw, N, C)
        k = norm(k.reshape(Bw, N, h, d)).reshape(Bw, N, C)
        table = sequential(self.cpb_mlp, mx.array(log_offsets(self.window)))  # ((2w-1)^2, heads)
        index = mx.array(relative_position_index(self.window, self.window).reshape(-1))
        bias = 16 * mx.sigmoid(table[index].reshape(N, N, h).transpose(2, 0, 1))
        return linear(self.proj, window_attention(q, k, v, h, bias, mask))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.fc2, linear(self.fc1, x, "gelu"))


class SwinV2Block(nn.Module):
    """Res-post-norm Swin V2 block: x + norm1(attention(x)), then + norm2(mlp(.))."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.attn = WindowAttentionV2(dim, window, heads)
        self.norm1 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm2 = LayerNorm(dim)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, C = x.shape
        y = shifted_windows(self.attn, x.reshape(B, *size, C), self.window, self.shift)
        x = x + self.norm1(y.reshape(B, L, C))
        return x + self.norm2(self.mlp(x))


class PatchEmbed(nn.Module):
    """A 1x1 conv (the original's patch size 1), then an optional LayerNorm, over a map's tokens."""

    def __init__(self, dim: int, norm: bool):
        super().__init__()
        self.proj = Conv2d(dim, dim, 1)
        if norm:
            self.norm = LayerNorm(dim)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        tokens = self.proj(x).reshape(B, H * W, C)
        return self.norm(tokens) if "norm" in self else tokens


class RSTB(nn.Module):
    def __init__(self, c: Swin2SRConfig, depth: int, heads: int):
        super().__init__()
        self.residual_group = ResidualGroup(c, depth, heads, SwinV2Block)
        self.conv = residual_convs(c.embed_dim, c.resi_connection)
        self.patch_embed = PatchEmbed(c.embed_dim, norm=False)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, C = x.shape
        return self.patch_embed(sequential(self.conv, self.residual_group(x, size).reshape(B, *size, C))) + x


class Swin2SR(nn.Module):
    def __init__(self, config: Swin2SRConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.conv_first = Conv2d(c.in_channels, d, 3, padding=1)
        self.patch_embed = PatchEmbed(d, norm=True)
        self.layers = [RSTB(c, depth, heads) for depth, heads in zip(c.depths, c.num_heads, strict=True)]
        self.norm = LayerNorm(d)
        self.conv_after_body = residual_convs(d, c.resi_connection)
        build_head(self, c, c.in_channels)  # SwinIR's heads ("nearest+conv" only 4x here: conv_up1, conv_up2)

    dtype = mx.float32  # spandrel (and so A1111) never runs Swin2SR in half precision
    size_minimum = 16  # spandrel's smallest Swin2SR input
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, in)."""
        c = self.config
        _, H, W, _ = x.shape
        ws = c.window_size
        x = reflect_pad(x, -H % ws, -W % ws)
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype)
        x = x - mean
        first = self.conv_first(x)
        B, Hp, Wp, C = first.shape
        tokens = self.patch_embed(first)
        for layer in self.layers:
            tokens = layer(tokens, (Hp, Wp))
        y = sequential(self.conv_after_body, self.norm(tokens).reshape(first.shape)) + first
        y = run_head(self, c, y, x)
        return (y + mean)[:, : H * c.upscale, : W * c.upscale]
