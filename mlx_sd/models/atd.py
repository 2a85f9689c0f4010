"""ATD (Zhang et al. 2024, "Transcending the Limit of Local Window: Advanced Super-Resolution Transformer with
Adaptive Token Dictionary"): the ATD upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

SwinIR's skeleton (`mlx_sd.models.swinir`: padding to the window, mean shift, conv, residual groups, LayerNorm, conv,
one of its four heads) with other layers. Each layer's normalised tokens go three ways, summed with the input:
- Swin's (shifted) window attention with the relative-position bias;
- token-dictionary cross-attention: every pixel attends to the group's learned dictionary of tokens (cosine
  similarity, a learned per-token scale of 1 + s log(tokens));
- category attention: pixels are sorted by the dictionary token they are most similar to, and attend within
  consecutive groups of `category_size` of that order (the last group filled up by mirroring the order's tail);
then a conv feed-forward (fc1, GELU, plus a depthwise conv with GELU, fc2). Between layers the dictionary is refined
towards the pixels that chose each token (InstanceNorm and softmax over the pixels, a learned sigmoid mix).

The order of equal categories is the stable one here: the original's unstable sort leaves it to the sort
implementation (torch's CPU, CUDA and MPS sorts differ), which changes which pixels share a group.

Parameter paths follow the published checkpoints (spandrel's, the original's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import window_attention
from .layers import Conv2d, LayerNorm, gelu, linear, linear_plus, sigmoid
from .swinir import (
    DIV2K_MEAN,
    PatchEmbed,
    build_head,
    reflect_pad,
    relative_position_index,
    residual_convs,
    run_head,
    sequential,
    shifted_windows,
)

LOGIT_SCALE_MAX = math.log(100.0)  # the category attention's clamp (1 / 0.01)


@dataclass(frozen=True)
class ATDConfig:
    in_channels: int = 3
    embed_dim: int = 210
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 16
    category_size: int = 256
    num_tokens: int = 128
    reducted_dim: int = 20
    convffn_kernel_size: int = 5
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    patch_norm: bool = True
    upscale: int = 4
    upsampler: str = "pixelshuffle"  # SwinIR's four heads
    resi_connection: str = "1conv"
    norm: bool = True  # the mean shift (a `no_norm` buffer in the file turns it off)
    num_feat: int = 64

    @property
    def scale(self) -> int:
        return self.upscale


def _normalize(x: mx.array) -> mx.array:
    return x / mx.maximum(mx.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # torch's F.normalize


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads, self.window = heads, window
        self.relative_position_bias_table = mx.zeros(((2 * window - 1) ** 2, heads))
        self.proj = nn.Linear(dim, dim)

    def __call__(self, qkv: mx.array, mask: mx.array | None) -> mx.array:
        N = qkv.shape[1]
        index = mx.array(relative_position_index(self.window, self.window).reshape(-1))
        bias = self.relative_position_bias_table[index].reshape(N, N, self.heads).transpose(2, 0, 1)
        return window_attention(*mx.split(qkv, 3, axis=-1), self.heads, bias, mask)


class DictionaryAttention(nn.Module):
    """The original's ATD_CA: pixels attend to the dictionary's tokens; returns the output and the similarities."""

    def __init__(self, c: ATDConfig):
        super().__init__()
        d = c.embed_dim
        self.wq = nn.Linear(d, c.reducted_dim, bias=c.qkv_bias)
        self.wk = nn.Linear(d, c.reducted_dim, bias=c.qkv_bias)
        self.wv = nn.Linear(d, d, bias=c.qkv_bias)
        self.scale = mx.full((c.num_tokens,), 0.5)

    def __call__(self, x: mx.array, td: mx.array) -> tuple[mx.array, mx.array]:
        logits = _normalize(linear(self.wq, x)) @ _normalize(linear(self.wk, td)).swapaxes(1, 2)  # (B, N, tokens)
        logits = logits * (1 + mx.clip(self.scale, 0, 1) * math.log(td.shape[1]))
        sim = mx.softmax(logits, axis=-1, precise=True)
        return sim @ linear(self.wv, td), sim


class CategoryAttention(nn.Module):
    """The original's AC_MSA: attention within groups of pixels of the same (or neighbouring) category."""

    def __init__(self, c: ATDConfig, heads: int):
        super().__init__()
        self.heads, self.group = heads, c.category_size
        self.proj = nn.Linear(c.embed_dim, c.embed_dim, bias=c.qkv_bias)
        self.logit_scale = mx.full((1, 1), math.log(10.0))

    def __call__(self, qkv: mx.array, sim: mx.array) -> mx.array:
        B, N, C3 = qkv.shape
        size = min(N, self.group)
        groups = -(-N // size)
        pad = groups * size - N
        # sort the pixels by category, stably: keys category x N + position are unique
        order = mx.argsort(mx.argmax(sim, axis=-1).astype(mx.int32) * N + mx.arange(N, dtype=mx.int32), axis=-1)
        flat = (order + mx.arange(B)[:, None] * N).reshape(-1)  # rows of (B x N, .): a plain gather (take_along_axis
        shuffled = mx.take(qkv.reshape(B * N, C3), flat, axis=0).reshape(B, N, C3)  # with a broadcast index: 20x)
        if pad:
            shuffled = mx.concatenate([shuffled, shuffled[:, N - pad :][:, ::-1]], axis=1)
        q, k, v = mx.split(shuffled.reshape(B * groups, size, C3), 3, axis=-1)
        scale = float(mx.exp(mx.minimum(self.logit_scale, LOGIT_SCALE_MAX)).item())
        y = window_attention(q, k, v, self.heads, None, scale=scale, unbounded=True)
        y = y.reshape(B, groups * size, -1)[:, :N]
        inverse = (mx.argsort(order, axis=-1) + mx.arange(B)[:, None] * N).reshape(-1)
        return linear(self.proj, mx.take(y.reshape(B * N, -1), inverse, axis=0).reshape(B, N, -1))


class InstanceNorm(nn.Module):
    """torch's InstanceNorm1d(channels, affine=True) on (B, channels, length)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        mean = x.mean(axis=-1, keepdims=True)
        var = mx.square(x - mean).mean(axis=-1, keepdims=True)
        return (x - mean) * mx.rsqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


class DepthwiseGELU(nn.Module):
    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.depthwise_conv = [Conv2d(dim, dim, kernel, padding=(kernel - 1) // 2, groups=dim)]


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseGELU(hidden, kernel)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        B, N, _ = x.shape
        y = linear(self.fc1, x, "gelu")
        y = y + gelu(self.dwconv.depthwise_conv[0](y.reshape(B, *size, -1))).reshape(B, N, -1)
        return linear_plus(self.fc2, y, residual)


class ATDTransformerLayer(nn.Module):
    def __init__(self, c: ATDConfig, heads: int, shift: int, last: bool):
        super().__init__()
        d = c.embed_dim
        self.shift = shift
        self.norm1 = LayerNorm(d)
        self.norm2 = LayerNorm(d)
        if not last:
            self.norm3 = InstanceNorm(c.num_tokens)
            self.sigma = mx.zeros((c.num_tokens, 1))
        self.wqkv = nn.Linear(d, 3 * d, bias=c.qkv_bias)
        self.attn_win = WindowAttention(d, c.window_size, heads)
        self.attn_atd = DictionaryAttention(c)
        self.attn_aca = CategoryAttention(c, heads)
        self.convffn = ConvFFN(d, int(d * c.mlp_ratio), c.convffn_kernel_size)

    def __call__(self, x: mx.array, td: mx.array, size: tuple[int, int]) -> tuple[mx.array, mx.array]:
        B, N, C = x.shape
        normed = self.norm1(x)
        qkv = linear(self.wqkv, normed)
        x_atd, sim = self.attn_atd(normed, td)
        x_aca = self.attn_aca(qkv, sim)
        windows = shifted_windows(self.attn_win, qkv.reshape(B, *size, 3 * C), self.attn_win.window, self.shift)
        x_win = linear(self.attn_win.proj, windows.reshape(B, N, C))
        x = x + x_win + x_atd + x_aca
        x = self.convffn(self.norm2(x), size, x)
        if "sigma" in self:
            weights = mx.softmax(self.norm3(sim.swapaxes(1, 2)), axis=-1, precise=True)  # (B, tokens, N)
            s = sigmoid(self.sigma)
            td = s * td + (1 - s) * (weights @ x)
        return x, td


class BasicBlock(nn.Module):
    def __init__(self, c: ATDConfig, depth: int, heads: int):
        super().__init__()
        ws = c.window_size
        self.layers = [ATDTransformerLayer(c, heads, ws // 2 if i % 2 else 0, i == depth - 1) for i in range(depth)]
        self.td = mx.zeros((c.num_tokens, c.embed_dim))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        td = mx.broadcast_to(self.td, (x.shape[0], *self.td.shape))
        for layer in self.layers:
            x, td = layer(x, td, size)
        return x


class ATDB(nn.Module):
    def __init__(self, c: ATDConfig, depth: int, heads: int):
        super().__init__()
        self.residual_group = BasicBlock(c, depth, heads)
        self.conv = residual_convs(c.embed_dim, c.resi_connection)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, C = x.shape
        y = sequential(self.conv, self.residual_group(x, size).reshape(B, *size, C))
        return y.reshape(B, L, C) + x


class ATD(nn.Module):
    def __init__(self, config: ATDConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.conv_first = Conv2d(c.in_channels, d, 3, padding=1)
        if c.patch_norm:
            self.patch_embed = PatchEmbed(d)
        self.layers = [ATDB(c, depth, heads) for depth, heads in zip(c.depths, c.num_heads, strict=True)]
        self.norm = LayerNorm(d)
        self.conv_after_body = residual_convs(d, c.resi_connection)
        build_head(self, c, c.in_channels)

    dtype = mx.float32  # spandrel (and so A1111) never runs ATD in half precision
    size_minimum = 8  # spandrel's smallest ATD input
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, in)."""
        c = self.config
        _, H, W, _ = x.shape
        ws = c.window_size
        x = reflect_pad(x, -H % ws, -W % ws, edge=True)  # the original mirrors the edge pixel too
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype) if c.norm else None
        if mean is not None:
            x = x - mean
        first = self.conv_first(x)
        B, h, w, C = first.shape
        tokens = first.reshape(B, h * w, C)
        if "patch_embed" in self:
            tokens = self.patch_embed.norm(tokens)
        for layer in self.layers:
            tokens = layer(tokens, (h, w))
        y = sequential(self.conv_after_body, self.norm(tokens).reshape(first.shape)) + first
        y = run_head(self, c, y, x)
        if mean is not None:
            y = y + mean
        return y[:, : H * c.upscale, : W * c.upscale]
