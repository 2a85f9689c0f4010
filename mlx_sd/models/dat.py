"""DAT (Chen et al. 2023, "Dual Aggregation Transformer for Image Super-Resolution"), A1111's "DAT x2/x3/x4".

Residual groups of blocks that alternate two attentions: spatial (half the channels in height x width windows, the
other half in width x height ones, every few blocks shifted by half a window with the Swin masks; a dynamic position
bias computed by a small MLP from the window offsets) and channel-wise (channels attending to channels over the
whole image, on L2-normalised queries and keys, with a learned temperature per head). Each attention is paired with a
depthwise 3x3 conv branch on its values, and the two exchange gates (the "adaptive interaction module": a channel gate
from global pooling, a spatial gate from 1x1 convs). The feed-forward is gated spatially: half its hidden channels
pass a depthwise conv and multiply the other half. As in the original, the windowed branches pad the map with zero
tokens (after the qkv projection, and unmasked) to a multiple of the larger window side.

Parameter paths follow the published checkpoints (spandrel's, the original's); the parameter-free layers inside their
`nn.Sequential`s keep their indices. BatchNorm runs with its running statistics (inference). Images are (B, H, W, C)
in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import channel_attention, window_attention
from .layers import Conv2d, LayerNorm, gelu, linear, linear_plus
from .swinir import (
    DIV2K_MEAN,
    LeakyReLU,
    PixelShuffle,
    pixelshuffle_stages,
    relative_position_index,
    residual_convs,
    sequential,
    shift_mask,
)


@dataclass(frozen=True)
class DATConfig:
    in_channels: int = 3
    embed_dim: int = 180
    split_size: tuple[int, int] = (8, 32)  # the first branch's window (height, width); the second's is transposed
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    expansion_factor: float = 2.0
    qkv_bias: bool = True
    upscale: int = 2
    resi_connection: str = "1conv"
    upsampler: str = "pixelshuffle"  # or "pixelshuffledirect" (DAT-light)
    num_feat: int = 64

    @property
    def scale(self) -> int:
        return self.upscale


class GELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return gelu(x)


class ReLU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return mx.maximum(x, 0)


class Placeholder(nn.Module):
    """A parameter-free layer of the original's Sequential that this port applies elsewhere (Rearrange, pooling)."""

    def __call__(self, x: mx.array) -> mx.array:
        return x


class BatchNorm(nn.Module):
    """torch's BatchNorm2d at inference: the running statistics, channels last."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))
        self.running_mean = mx.zeros((channels,))
        self.running_var = mx.ones((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        scale = self.weight * mx.rsqrt(self.running_var + self.eps)
        return x * scale + (self.bias - self.running_mean * scale)


def depthwise(dim: int) -> Conv2d:
    return Conv2d(dim, dim, 3, padding=1, groups=dim)


def interactions(dim: int) -> tuple[list, list]:
    """The adaptive interaction module's two gates: channel (global pooling, 1x1 convs) and spatial (1x1 convs)."""
    channel = [Placeholder(), Conv2d(dim, dim // 8, 1), BatchNorm(dim // 8), GELU(), Conv2d(dim // 8, dim, 1)]
    spatial = [Conv2d(dim, dim // 16, 1), BatchNorm(dim // 16), GELU(), Conv2d(dim // 16, 1, 1)]
    return channel, spatial


def channel_gate(layers: list, image: mx.array) -> mx.array:
    """sigmoid of the channel interaction: (B, H, W, C) -> (B, 1, 1, C)."""
    return mx.sigmoid(sequential(layers[1:], image.mean(axis=(1, 2), keepdims=True)))


class DynamicPosBias(nn.Module):
    """The position bias of every window offset (dy, dx), by an MLP: (offsets, 2) -> (offsets, heads)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        pos_dim = dim // 4
        self.pos_proj = nn.Linear(2, pos_dim)
        self.pos1 = [LayerNorm(pos_dim), ReLU(), nn.Linear(pos_dim, pos_dim)]
        self.pos2 = [LayerNorm(pos_dim), ReLU(), nn.Linear(pos_dim, pos_dim)]
        self.pos3 = [LayerNorm(pos_dim), ReLU(), nn.Linear(pos_dim, heads)]

    def __call__(self, offsets: mx.array) -> mx.array:
        return sequential(self.pos3, sequential(self.pos2, sequential(self.pos1, self.pos_proj(offsets))))


@lru_cache(maxsize=16)
def window_offsets(height: int, width: int) -> np.ndarray:
    """((2 height - 1)(2 width - 1), 2) offsets (dy, dx) within a window, dy major (the original's `rpe_biases`)."""
    dy, dx = np.meshgrid(np.arange(1 - height, height), np.arange(1 - width, width), indexing="ij")
    return np.stack([dy.reshape(-1), dx.reshape(-1)], axis=1).astype(np.float32)


class SpatialBranch(nn.Module):
    """One branch's window attention (the original's `Spatial_Attention`): its position-bias MLP and window."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], masked: bool = True):
        super().__init__()
        self.heads = heads
        self.window = window
        self.masked = masked  # shifted windows masked where they wrap (CRAFT's are not)
        self.pos = DynamicPosBias(dim // 4, heads)

    def bias(self) -> mx.array:
        """(heads, N, N) for the window's N positions."""
        h, w = self.window
        table = self.pos(mx.array(window_offsets(h, w)))
        index = mx.array(relative_position_index(h, w).reshape(-1))
        return table[index].reshape(h * w, h * w, self.heads).transpose(2, 0, 1)

    def __call__(self, qkv: mx.array, shift: tuple[int, int] | None) -> mx.array:
        """qkv: (B, H, W, 3, C) this branch's queries, keys and values of the padded map -> (B, H, W, C)."""
        B, H, W, _, C = qkv.shape
        (wh, ww), heads = self.window, self.heads
        mask = None
        if shift is not None:
            qkv = mx.roll(qkv, (-shift[0], -shift[1]), axis=(1, 2))
            mask = mx.array(shift_mask(H, W, self.window, shift)) if self.masked else None
        windows = qkv.reshape(B, H // wh, wh, W // ww, ww, 3 * C).transpose(0, 1, 3, 2, 4, 5)
        q, k, v = mx.split(windows.reshape(-1, wh * ww, 3 * C), 3, axis=-1)
        out = window_attention(q, k, v, heads, self.bias(), mask)
        out = out.reshape(B, H // wh, W // ww, wh, ww, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        return out if shift is None else mx.roll(out, shift, axis=(1, 2))


class WindowBranches(nn.Module):
    """The qkv projection and two window branches on half the channels each (height x width windows, then width x
    height), the map padded with zero tokens to the larger side; `attend` returns their output and the qkv. DAT's
    spatial attention, RGT's L-SA and CRAFT's SRWAB (shifted windows unmasked) add their own branch beside it."""

    def __init__(
        self, dim: int, heads: int, split_size: tuple[int, int], qkv_bias: bool, shifted: bool, masked: bool = True
    ):
        super().__init__()
        s0, s1 = split_size
        self.shift = ((s0 // 2, s1 // 2), (s1 // 2, s0 // 2)) if shifted else (None, None)
        self.pad_to = max(s0, s1)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attns = [SpatialBranch(dim // 2, heads // 2, window, masked) for window in ((s0, s1), (s1, s0))]

    def attend(self, x: mx.array, size: tuple[int, int]) -> tuple[mx.array, mx.array]:
        """(B, L, C) tokens -> the branches' (B, H, W, C) output and the (B, H, W, 3, C) queries, keys, values."""
        (H, W), (B, _, C) = size, x.shape
        qkv = linear(self.qkv, x).reshape(B, H, W, 3, C)
        ph, pw = -H % self.pad_to, -W % self.pad_to
        padded = mx.pad(qkv, [(0, 0), (0, ph), (0, pw), (0, 0), (0, 0)]) if ph or pw else qkv
        halves = [
            branch(padded[..., i * C // 2 : (i + 1) * C // 2], shift)[:, :H, :W]
            for i, (branch, shift) in enumerate(zip(self.attns, self.shift, strict=True))
        ]
        return mx.concatenate(halves, axis=-1), qkv


class SpatialAttention(WindowBranches):
    """The original's `Adaptive_Spatial_Attention`: the window branches beside a depthwise conv on the values, the
    two gating each other."""

    def __init__(self, c: DATConfig, heads: int, shifted: bool):
        super().__init__(c.embed_dim, heads, c.split_size, c.qkv_bias, shifted)
        dim = c.embed_dim
        self.dwconv = [depthwise(dim), BatchNorm(dim), GELU()]
        self.channel_interaction, self.spatial_interaction = interactions(dim)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        B, L, C = x.shape
        attended, qkv = self.attend(x, size)
        conv = sequential(self.dwconv, qkv[..., 2, :])
        spatial = mx.sigmoid(sequential(self.spatial_interaction, attended))  # (B, H, W, 1)
        mixed = attended * channel_gate(self.channel_interaction, conv) + spatial * conv
        return linear_plus(self.proj, mixed.reshape(B, L, C), residual)


class ChannelAttention(nn.Module):
    """The original's `Adaptive_Channel_Attention`: per head, its channels attend to each other across the image."""

    def __init__(self, c: DATConfig, heads: int):
        super().__init__()
        dim = c.embed_dim
        self.heads = heads
        self.temperature = mx.ones((heads, 1, 1))
        self.qkv = nn.Linear(dim, 3 * dim, bias=c.qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.dwconv = [depthwise(dim), BatchNorm(dim), GELU()]
        self.channel_interaction, self.spatial_interaction = interactions(dim)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        (H, W), (B, N, C), h = size, x.shape, self.heads
        qkv = linear(self.qkv, x)
        q, k, v = (t.reshape(B, N, h, C // h).transpose(0, 2, 3, 1) for t in mx.split(qkv, 3, axis=-1))  # (B,h,d,N)
        attended = channel_attention(q, k, v, self.temperature).transpose(0, 3, 1, 2).reshape(B, H, W, C)
        conv = sequential(self.dwconv, qkv[..., 2 * C :].reshape(B, H, W, C))
        spatial = mx.sigmoid(sequential(self.spatial_interaction, conv))  # (B, H, W, 1)
        mixed = attended * spatial + conv * channel_gate(self.channel_interaction, attended)
        return linear_plus(self.proj, mixed.reshape(B, N, C), residual)


class SpatialGate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.conv = depthwise(dim)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, N, C = x.shape
        x1, x2 = mx.split(x, 2, axis=-1)
        return x1 * self.conv(self.norm(x2).reshape(B, *size, C // 2)).reshape(B, N, C // 2)


class SGFN(nn.Module):
    """The spatial-gate feed-forward network: fc1, GELU, the spatial gate (halving the channels), fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.sg = SpatialGate(hidden // 2)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        return linear_plus(self.fc2, self.sg(linear(self.fc1, x, "gelu"), size), residual)


class DATB(nn.Module):
    def __init__(self, c: DATConfig, heads: int, group: int, index: int):
        super().__init__()
        self.norm1 = LayerNorm(c.embed_dim)
        if index % 2 == 0:
            # the original shifts blocks 2, 6, 10, ... of even groups and 0, 4, 8, ... of odd ones
            shifted = index % 4 == 2 if group % 2 == 0 else index % 4 == 0
            self.attn = SpatialAttention(c, heads, shifted)
        else:
            self.attn = ChannelAttention(c, heads)
        self.norm2 = LayerNorm(c.embed_dim)
        self.ffn = SGFN(c.embed_dim, int(c.embed_dim * c.expansion_factor))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        x = self.attn(self.norm1(x), size, x)
        return self.ffn(self.norm2(x), size, x)


class ResidualGroup(nn.Module):
    def __init__(self, c: DATConfig, depth: int, heads: int, group: int, block: type[nn.Module]):
        super().__init__()
        self.blocks = [block(c, heads, group, i) for i in range(depth)]
        self.conv = residual_convs(c.embed_dim, c.resi_connection)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        y = x
        for block in self.blocks:
            y = block(y, size)
        B, L, C = x.shape
        return sequential(self.conv, y.reshape(B, *size, C)).reshape(B, L, C) + x


class DAT(nn.Module):
    block = DATB  # RGT's subclass runs its own blocks in the same skeleton

    def __init__(self, config: DATConfig):
        super().__init__()
        self.config = c = config
        d, f = c.embed_dim, c.num_feat
        self.conv_first = Conv2d(c.in_channels, d, 3, padding=1)
        self.before_RG = [Placeholder(), LayerNorm(d)]
        self.layers = [
            ResidualGroup(c, depth, heads, i, self.block)
            for i, (depth, heads) in enumerate(zip(c.depths, c.num_heads, strict=True))
        ]
        self.norm = LayerNorm(d)
        self.conv_after_body = residual_convs(d, c.resi_connection)
        if c.upsampler == "pixelshuffle":
            self.conv_before_upsample = [Conv2d(d, f, 3, padding=1), LeakyReLU(0.01)]  # torch's default slope
            self.upsample = pixelshuffle_stages(f, c.upscale)
            self.conv_last = Conv2d(f, c.in_channels, 3, padding=1)
        else:
            self.upsample = [Conv2d(d, c.upscale**2 * c.in_channels, 3, padding=1), PixelShuffle(c.upscale)]

    dtype = mx.float32  # spandrel (and so A1111) never runs DAT in half precision
    size_minimum = 16  # spandrel's smallest DAT input
    size_multiple = 1
    a1111_tiling = "grid"  # A1111 runs DAT through `upscale_with_model` (its DAT_tile 192, overlap 8)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, in)."""
        c = self.config
        B, H, W, _ = x.shape
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype)
        first = self.conv_first(x - mean)
        tokens = self.before_RG[1](first.reshape(B, H * W, -1))
        for layer in self.layers:
            tokens = layer(tokens, (H, W))
        y = sequential(self.conv_after_body, self.norm(tokens).reshape(first.shape)) + first
        if c.upsampler == "pixelshuffle":
            y = self.conv_last(sequential(self.upsample, sequential(self.conv_before_upsample, y)))
        else:
            y = sequential(self.upsample, y)
        return y + mean
