"""CRAFT (Li et al. 2023, "Feature Modulation Transformer: Cross-Refinement and Lite Transformer for Efficient
Image Super-Resolution"): the CRAFT upscalers chaiNNer, ComfyUI and A1111 (1.8+, through spandrel) run from
`models/ESRGAN`.

A 3x3 conv, residual groups (a group's blocks, a 3x3 conv, its input added) at the input size, a channel LayerNorm,
a 3x3 conv, the long residual and a one-step pixel-shuffle head. Each of a group's blocks (the original's CRFB step)
runs two branches on its input and fuses them:
- low frequencies: two shift rectangle-window attention blocks (SRWAB: DAT's two window branches on half the channels
  each, `dat.WindowBranches`, with their dynamic position bias; the second block's windows shifted by half a window
  and, as the original runs them, not masked), each with a depthwise conv of its values and an MLP;
- high frequencies (HFERB): a 3x3 conv of half the channels beside a 3x3 max pool and 1x1 conv of the other half,
  GELU, a 1x1 conv and the input added;
- fusion (HFB): channel attention (Restormer's: L2-normalised over the pixels, a learned temperature per head), the
  queries from the high-frequency map and keys and values from the normed low one, then Restormer's gated
  feed-forward.
The input is normalised by the DIV2K mean and mirrored (edge included) on the bottom and right to the next multiple
of the 16-pixel window strictly above its size, as the original pads it; spandrel first pads it to a multiple of 16
(`ModelUpscaler` does).

Parameter paths follow the published checkpoints (spandrel's). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import channel_attention
from .dat import WindowBranches, depthwise
from .layers import Conv2d, LayerNorm, gelu, linear_plus, max_pool
from .omnisr import GatedFeedForward
from .swinir import DIV2K_MEAN, Mlp, PixelShuffle, reflect_pad, sequential

HFB_EXPANSION = 2.66  # the fusion block's feed-forward width factor (fixed in the original)


@dataclass(frozen=True)
class CRAFTConfig:
    in_channels: int = 3
    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (6, 6, 6, 6)
    split_size: tuple[int, int] = (4, 16)  # the first branch's window (height, width); the second's is transposed
    mlp_ratio: float = 2.0
    qkv_bias: bool = True
    upscale: int = 4
    resi_connection: str = "1conv"  # or "identity"
    window_size: int = 16  # the padding multiple (the files do not record it; spandrel's and the original's 16)

    @property
    def scale(self) -> int:
        return self.upscale


class SRWAB(WindowBranches):
    """Shift rectangle-window attention block: the window branches plus a depthwise conv of the values, then the
    MLP; each with its LayerNorm and residual."""

    def __init__(self, c: CRAFTConfig, heads: int, shifted: bool):
        super().__init__(c.embed_dim, heads, c.split_size, c.qkv_bias, shifted, masked=False)
        dim = c.embed_dim
        self.norm1 = LayerNorm(dim)
        self.get_v = depthwise(dim)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * c.mlp_ratio))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, C = x.shape
        attended, qkv = self.attend(self.norm1(x), size)
        x = linear_plus(self.proj, (attended + self.get_v(qkv[..., 2, :])).reshape(B, L, C), x)
        return self.mlp(self.norm2(x), x)


class HFERB(nn.Module):
    """High-frequency enhancement residual block: a 3x3 conv of the first half of the channels, a max pool and 1x1
    conv of the second, both through GELU, then a 1x1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        mid = dim // 2
        self.last_fc = Conv2d(dim, dim, 1)
        self.fc = Conv2d(mid, mid, 1)
        self.conv = Conv2d(mid, mid, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        mid = self.fc.weight.shape[0]
        low = gelu(self.conv(x[..., :mid]))
        high = gelu(self.fc(max_pool(x[..., mid:], 3, 1, 1)))
        return x + self.last_fc(mx.concatenate([low, high], axis=-1))


class ChannelNorm(nn.Module):
    """The original's `LayerNorm` wrapper (its `body`): LayerNorm over the channels of every pixel."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = LayerNorm(dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.body(x)


class CrossAttention(nn.Module):
    """Channel attention whose queries come from the high-frequency map, keys and values from the low one."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = mx.ones((heads, 1, 1))
        self.q = Conv2d(dim, dim, 1, bias=False)
        self.q_dwconv = Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.kv = Conv2d(dim, 2 * dim, 1, bias=False)
        self.kv_dwconv = Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, bias=False)
        self.project_out = Conv2d(dim, dim, 1, bias=False)

    def __call__(self, low: mx.array, high: mx.array) -> mx.array:
        (B, H, W, C), h = low.shape, self.heads
        q = self.q_dwconv(self.q(high))
        k, v = mx.split(self.kv_dwconv(self.kv(low)), 2, axis=-1)
        q, k, v = (t.reshape(B, H * W, h, C // h).transpose(0, 2, 3, 1) for t in (q, k, v))  # (B, h, d, HW)
        out = channel_attention(q, k, v, self.temperature)
        return self.project_out(out.transpose(0, 3, 1, 2).reshape(B, H, W, C))


class HFB(nn.Module):
    """Hybrid fusion block: low + attention(norm low, high), then the gated feed-forward."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = ChannelNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm2 = ChannelNorm(dim)
        self.ffn = GatedFeedForward(dim, int(dim * HFB_EXPANSION))

    def __call__(self, low: mx.array, high: mx.array) -> mx.array:
        x = low + self.attn(self.norm1(low), high)
        return x + self.ffn(self.norm2(x))


class CRFB(nn.Module):
    """Cross-refinement fusion: per step, two SRWABs (unshifted, shifted) and an HFERB on the map, fused by an HFB."""

    def __init__(self, c: CRAFTConfig, depth: int, heads: int):
        super().__init__()
        self.srwa_blocks = [SRWAB(c, heads, shifted=i % 2 == 1) for i in range(2 * depth)]
        self.hfer_blocks = [HFERB(c.embed_dim) for _ in range(depth)]
        self.hf_blocks = [HFB(c.embed_dim, heads) for _ in range(depth)]

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        for i, (hfer, hf) in enumerate(zip(self.hfer_blocks, self.hf_blocks, strict=True)):
            low = x.reshape(B, H * W, C)  # (B, HW, C) tokens
            for block in self.srwa_blocks[2 * i : 2 * i + 2]:
                low = block(low, (H, W))
            x = hf(low.reshape(B, H, W, C), hfer(x))
        return x


class RCRFG(nn.Module):
    def __init__(self, c: CRAFTConfig, depth: int, heads: int):
        super().__init__()
        self.residual_group = CRFB(c, depth, heads)
        self.conv = Conv2d(c.embed_dim, c.embed_dim, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(self.residual_group(x)) + x


class CRAFT(nn.Module):
    def __init__(self, config: CRAFTConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.conv_first = Conv2d(c.in_channels, d, 3, padding=1)
        self.layers = [RCRFG(c, depth, heads) for depth, heads in zip(c.depths, c.num_heads, strict=True)]
        self.norm = ChannelNorm(d)
        if c.resi_connection == "1conv":
            self.conv_after_body = Conv2d(d, d, 3, padding=1)
        self.upsample = [Conv2d(d, c.upscale**2 * c.in_channels, 3, padding=1), PixelShuffle(c.upscale)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_first.weight.dtype

    size_minimum = 16  # spandrel's size requirement (the original's mirror padding needs it too)
    size_multiple = 16
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1], H and W at least 16 -> (B, H*scale, W*scale, in)."""
        c = self.config
        _, H, W, _ = x.shape
        w = c.window_size
        # the original's (h // w + 1) * w - h: a whole window more where the size is already a multiple
        x = reflect_pad(x, w - H % w, w - W % w, edge=True)
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype)
        first = self.conv_first(x - mean)
        y = self.norm(sequential(self.layers, first))
        if "conv_after_body" in self:
            y = self.conv_after_body(y)
        y = sequential(self.upsample, y + first) + mean
        return y[:, : H * c.upscale, : W * c.upscale]
