"""SeemoRe (Zamfir et al. 2024, "See More Details: Efficient Image Super-Resolution by Experts Mining"): the SeemoRe
upscalers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

The image minus the DIV2K mean through a 3x3 conv, then residual groups of: a mixture of low-rank experts (a conv
pair to two halves, optionally channel-shuffled; one half through striped depthwise convs (1 x 3, 3 x 1) and GELU,
the other "calibrated": plus its strided-depthwise-pooled, convolved and bilinearly restored self; a router picks
each image's top experts from the pooled first half and adds their weighted low-rank products), then a striped
conv-former (GELU'd 1x1 to two halves, one through 1 x k, k x 1 depthwise convs, times the other, a 1x1); each
behind a channel LayerNorm with its residual and followed by a gated conv feed-forward. A LayerNorm, a conv, the
long residual and a pixel-shuffle head; the mean added back.

Parameter paths follow the published checkpoints (spandrel's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..upscale import interpolate
from .dat import GELU, Placeholder
from .layers import Conv2d, LayerNorm, gelu
from .swinir import DIV2K_MEAN, PixelShuffle, sequential

LOW_DIMS = {"linear": lambda i: i + 2, "exp": lambda i: 2 ** (i + 1), "double": lambda i: 2 * i + 2}


@dataclass(frozen=True)
class SeemoReConfig:
    in_channels: int = 3
    embedding_dim: int = 64
    num_layers: int = 6
    num_experts: int = 6
    lr_space: str = "linear"  # the experts' low ranks: i + 2, 2^(i + 1) or 2i + 2
    topk: int = 1
    recursive: int = 2
    use_shuffle: bool = True
    global_kernel_size: int = 11
    upscale: int = 4

    @property
    def scale(self) -> int:
        return self.upscale


def norm(dim: int) -> LayerNorm:
    return LayerNorm(dim, eps=1e-6)


class StripedConv(nn.Module):
    """A depthwise 1 x k conv, then a k x 1 one."""

    def __init__(self, dim: int, k: int):
        super().__init__()
        self.conv = [Conv2d(dim, dim, (1, k), padding=(0, k // 2), groups=dim),
                     Conv2d(dim, dim, (k, 1), padding=(k // 2, 0), groups=dim)]  # fmt: skip

    def __call__(self, x: mx.array) -> mx.array:
        return sequential(self.conv, x)


class GatedFFN(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fn_1 = [Conv2d(dim, 2 * dim, 1), GELU()]
        self.fn_2 = [Conv2d(dim, dim, 1), GELU()]
        self.gate = Conv2d(dim, dim, 3, padding=1, groups=dim)

    def __call__(self, x: mx.array) -> mx.array:
        x, gate = mx.split(sequential(self.fn_1, x), 2, axis=-1)
        return sequential(self.fn_2, x * self.gate(gate))


class Expert(nn.Module):
    def __init__(self, dim: int, low: int):
        super().__init__()
        self.conv_1 = Conv2d(dim, low, 1)
        self.conv_2 = Conv2d(dim, low, 1)
        self.conv_3 = Conv2d(low, dim, 1)

    def __call__(self, x: mx.array, k: mx.array) -> mx.array:
        return self.conv_3(self.conv_2(k) * self.conv_1(x))


class Router(nn.Module):
    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.body = [Placeholder(), Placeholder(), nn.Linear(dim, experts, bias=False)]


class MoELayer(nn.Module):
    def __init__(self, c: SeemoReConfig):
        super().__init__()
        d = c.embedding_dim
        self.experts = [Expert(d, LOW_DIMS[c.lr_space](i)) for i in range(c.num_experts)]
        self.gate = Router(d, c.num_experts)
        self._topk = c.topk

    def __call__(self, x: mx.array, k: mx.array) -> mx.array:
        """x plus each image's top experts, weighted by the router's softmax (the original's inference path, one
        image at a time: its experts are chosen per image)."""
        weights = mx.softmax(self.gate.body[2](x.mean(axis=(1, 2)).astype(mx.float32)), axis=-1)  # (B, experts)
        order = mx.argsort(-weights, axis=-1)[:, : self._topk]
        mx.eval(order)
        out = []
        for b in range(x.shape[0]):
            y, kb = x[b : b + 1], k[b : b + 1]
            total = y
            for e in order[b].tolist():
                total = total + self.experts[e](y, kb) * weights[b, e].astype(x.dtype)
            out.append(total)
        return mx.concatenate(out)


class MoEBlock(nn.Module):
    def __init__(self, c: SeemoReConfig):
        super().__init__()
        d = c.embedding_dim
        self._recursive, self._shuffle = c.recursive, c.use_shuffle
        self.conv_1 = [Conv2d(d, d, 3, padding=1), GELU(), Conv2d(d, 2 * d, 1)]
        self.agg_conv = [Conv2d(d, d, 4, stride=4, groups=d), GELU()]
        self.conv = [Conv2d(d, d, 3, padding=1, groups=d), Conv2d(d, d, 1)]
        self.conv_2 = [StripedConv(d, 3), GELU()]
        self.moe_layer = MoELayer(c)
        self.proj = Conv2d(d, d, 1)

    def __call__(self, x: mx.array) -> mx.array:
        x = sequential(self.conv_1, x)
        if self._shuffle:  # channel_shuffle(groups=2): the halves' channels interleaved
            B, H, W, C = x.shape
            x = x.reshape(B, H, W, 2, C // 2).swapaxes(3, 4).reshape(B, H, W, C)
        x, k = mx.split(x, 2, axis=-1)
        pooled = k
        for _ in range(self._recursive):
            pooled = sequential(self.agg_conv, pooled)
        k = k + interpolate(sequential(self.conv, pooled), k.shape[1], k.shape[2])
        return self.proj(self.moe_layer(sequential(self.conv_2, x), k))


class StripedConvFormer(nn.Module):
    def __init__(self, dim: int, k: int):
        super().__init__()
        self.proj = Conv2d(dim, dim, 1)
        self.to_qv = [Conv2d(dim, 2 * dim, 1), GELU()]
        self.attn = StripedConv(dim, k)

    def __call__(self, x: mx.array) -> mx.array:
        q, v = mx.split(gelu(self.to_qv[0](x)), 2, axis=-1)
        return self.proj(self.attn(q) * v)


class Block(nn.Module):
    """norm_1 -> block, plus x; norm_2 -> the gated feed-forward, plus x (the original's RME and SME)."""

    def __init__(self, dim: int, block: nn.Module):
        super().__init__()
        self.norm_1 = norm(dim)
        self.block = block
        self.norm_2 = norm(dim)
        self.ffn = GatedFFN(dim)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.block(self.norm_1(x)) + x
        return self.ffn(self.norm_2(x)) + x


class ResGroup(nn.Module):
    def __init__(self, c: SeemoReConfig):
        super().__init__()
        d = c.embedding_dim
        self.local_block = Block(d, MoEBlock(c))
        self.global_block = Block(d, StripedConvFormer(d, c.global_kernel_size))

    def __call__(self, x: mx.array) -> mx.array:
        return self.global_block(self.local_block(x))


class SeemoRe(nn.Module):
    def __init__(self, config: SeemoReConfig):
        super().__init__()
        self.config = c = config
        d = c.embedding_dim
        self.conv_1 = Conv2d(c.in_channels, d, 3, padding=1)
        self.body = [ResGroup(c) for _ in range(c.num_layers)]
        self.norm = norm(d)
        self.conv_2 = Conv2d(d, d, 3, padding=1)
        self.upsampler = [Conv2d(d, c.in_channels * c.upscale**2, 3, padding=1), PixelShuffle(c.upscale)]

    dtype = mx.float32  # spandrel (and so A1111) runs SeemoRe in float32
    size_minimum = 16  # spandrel's
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, 3) in [0, 1], sides of at least 16 -> (B, H*scale, W*scale, 3)."""
        mean = mx.array(DIV2K_MEAN, x.dtype)
        first = self.conv_1(x - mean)
        y = self.conv_2(self.norm(sequential(self.body, first))) + first
        return sequential(self.upsampler, y) + mean
