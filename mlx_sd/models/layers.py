"""Blocks shared by the UNet and the autoencoder, named as diffusers names them so checkpoints load by key.

Every tensor is channels-last: images (B, H, W, C), token sequences (B, N, C).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..attention import attention


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over channels-last input, statistics in float32.

    Two-pass variance (mean first, then the mean of squared deviations): the one-pass E[x^2] - E[x]^2 loses
    ~4e-5 relative accuracy at full-size VAE resolutions, where groups hold millions of values.
    """

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        shape = x.shape
        groups = x.reshape(shape[0], -1, self.num_groups, shape[-1] // self.num_groups).astype(mx.float32)
        mean = groups.mean(axis=(1, 3), keepdims=True)
        centred = groups - mean
        var = mx.square(centred).mean(axis=(1, 3), keepdims=True)
        normed = (centred * mx.rsqrt(var + self.eps)).reshape(shape).astype(x.dtype)
        return normed * self.weight + self.bias


class Attention(nn.Module):
    """Multi-head attention with diffusers' parameter names (`to_q`, `to_k`, `to_v`, `to_out.0`)."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, inner, bias=qkv_bias)
        self.to_out = [nn.Linear(inner, query_dim)]  # diffusers' to_out.1 is a dropout

    def __call__(self, x: mx.array, context: mx.array | None = None) -> mx.array:
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out[0](out)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice with an optional timestep bias in between (diffusers ResnetBlock2D)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int | None,
        groups: int = 32,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]  # (B, 1, 1, C)
        h = self.conv2(nn.silu(self.norm2(h)))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE encoder pads right/bottom only (padding=0 plus an explicit (0, 1) pad)."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.asymmetric_pad:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


def upsample_nearest(x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
    """torch's F.interpolate(mode="nearest") on (B, H, W, C): scale 2, or to an explicit (H, W).

    For a target size torch reads source index floor(i * in / out), computed in float32; we mirror that so
    odd latent sizes (images that are multiples of 8 but not of 64) upsample exactly as diffusers does.
    """
    B, H, W, C = x.shape
    if size is None or size == (2 * H, 2 * W):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (B, H, 2, W, 2, C))
        return x.reshape(B, 2 * H, 2 * W, C)
    out_h, out_w = size
    rows = _nearest_index(H, out_h)
    cols = _nearest_index(W, out_w)
    return x[:, rows][:, :, cols]


def _nearest_index(n_in: int, n_out: int) -> mx.array:
    scale = mx.array(n_in / n_out, dtype=mx.float32)
    idx = mx.floor(mx.arange(n_out, dtype=mx.float32) * scale).astype(mx.int32)
    return mx.minimum(idx, n_in - 1)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        return self.conv(upsample_nearest(x, size))


def timestep_embedding(
    t: mx.array, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0, max_period: float = 10000
) -> mx.array:
    """Sinusoidal embedding of (fractional) timesteps, (B,) -> (B, dim), as diffusers' get_timestep_embedding."""
    half = dim // 2
    exponent = -math.log(max_period) * mx.arange(half, dtype=mx.float32) / (half - freq_shift)
    angles = t.astype(mx.float32)[:, None] * mx.exp(exponent)[None, :]
    sin, cos = mx.sin(angles), mx.cos(angles)
    return mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, with LCM's optional guidance-embedding input (`cond_proj`)."""

    def __init__(self, in_channels: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_channels, bias=False)

    def __call__(self, x: mx.array, cond: mx.array | None = None) -> mx.array:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(nn.silu(self.linear_1(x)))
