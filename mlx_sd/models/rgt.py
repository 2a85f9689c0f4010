"""RGT (Chen et al. 2024, "Recursive Generalization Transformer for Image Super-Resolution"): the RGT upscalers A1111
(1.8+, through spandrel) runs from `models/ESRGAN`.

DAT's skeleton (`mlx_sd.models.dat`: mean shift, conv, residual groups of token blocks, LayerNorm, conv, pixel-
shuffle head) with other blocks, alternating:
- L-SA: DAT's two window branches (height x width and width x height windows on half the channels each, the dynamic
  position bias, the same shifted blocks and masks) plus a depthwise conv of the values;
- RG-SA, the recursive-generalization attention: every pixel's query attends to a few representative tokens, made by
  a depthwise 4x4 stride-4 conv applied recursively (twice below 1024-pixel sides: H / 16 x W / 16 tokens), a
  depthwise conv, a 1x1 conv to c_ratio x the channels, LayerNorm and GELU; the values get a depthwise conv of
  themselves (a position encoding).
Each block adds its input times a learned layer scale after both residuals. The feed-forward is DAT's spatial-gate
one.

Parameter paths follow the published checkpoints (spandrel's, the original's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import attention
from .dat import DAT, GELU, SGFN, DATConfig, WindowBranches, depthwise
from .layers import Conv2d, LayerNorm, linear, linear_plus
from .swinir import sequential

LAYER_SCALE = 1e-4  # the blocks' `gamma` initial value (the files hold their trained values)


@dataclass(frozen=True)
class RGTConfig(DATConfig):
    """DAT's fields (its pixel-shuffle head; `expansion_factor` is RGT's mlp_ratio) and RG-SA's channel ratio."""

    c_ratio: float = 0.5


class LSA(WindowBranches):
    def __init__(self, c: RGTConfig, heads: int, shifted: bool):
        super().__init__(c.embed_dim, heads, c.split_size, c.qkv_bias, shifted)
        self.get_v = depthwise(c.embed_dim)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        B, L, C = x.shape
        attended, qkv = self.attend(x, size)
        return linear_plus(self.proj, (attended + self.get_v(qkv[..., 2, :])).reshape(B, L, C), residual)


class RGSA(nn.Module):
    def __init__(self, c: RGTConfig, heads: int):
        super().__init__()
        dim = c.embed_dim
        self.heads = heads
        reduced = int(dim * c.c_ratio)
        self.scale = (dim // heads * c.c_ratio) ** -0.5
        self.reduction1 = Conv2d(dim, dim, 4, stride=4, groups=dim)
        self.dwconv = depthwise(dim)
        self.conv = Conv2d(dim, reduced, 1)
        self.norm_act = [LayerNorm(reduced), GELU()]
        self.q = nn.Linear(dim, reduced, bias=c.qkv_bias)
        self.k = nn.Linear(reduced, reduced, bias=c.qkv_bias)
        self.v = nn.Linear(reduced, dim, bias=c.qkv_bias)
        self.cpe = depthwise(dim)
        self.proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, size: tuple[int, int], residual: mx.array) -> mx.array:
        (H, W), (B, _, C) = size, x.shape
        # the original's test-time recursion count: at least 2, more from 1024-pixel sides
        times = max(2, int(math.log(H // 16, 4)), int(math.log(W // 16, 4)))
        if min(H, W) < 4**times:  # the original's convs fail there too
            raise ValueError(f"RGT cannot run a {H}x{W} tile: its longer side makes the recursive attention shrink "
                             f"both sides {4**times}x; use tiles of at most 1023 pixels (A1111's are 192)")  # fmt: skip
        tokens = x.reshape(B, H, W, C)
        for _ in range(times):
            tokens = self.reduction1(tokens)
        tokens = sequential(self.norm_act, self.conv(self.dwconv(tokens)))  # (B, h, w, reduced)
        h, w = tokens.shape[1:3]
        tokens = tokens.reshape(B, h * w, -1)
        v = linear(self.v, tokens)
        v = v + self.cpe(v.reshape(B, h, w, C)).reshape(B, h * w, C)
        out = attention(linear(self.q, x), linear(self.k, tokens), v, self.heads, scale=self.scale)
        return linear_plus(self.proj, out, residual)


class Block(nn.Module):
    def __init__(self, c: RGTConfig, heads: int, group: int, index: int):
        super().__init__()
        d = c.embed_dim
        self.norm1 = LayerNorm(d)
        if index % 2 == 0:
            # the original (as DAT) shifts blocks 2, 6, 10, ... of even groups and 0, 4, 8, ... of odd ones
            self.attn = LSA(c, heads, index % 4 == 2 if group % 2 == 0 else index % 4 == 0)
        else:
            self.attn = RGSA(c, heads)
        self.mlp = SGFN(d, int(d * c.expansion_factor))
        self.norm2 = LayerNorm(d)
        self.gamma = mx.full((d,), LAYER_SCALE)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        y = self.attn(self.norm1(x), size, x)
        return self.mlp(self.norm2(y), size, y) + x * self.gamma


class RGT(DAT):
    block = Block
