"""SwinIR (Liang et al. 2021, "SwinIR: Image Restoration Using Swin Transformer"), A1111's "SwinIR 4x" upscaler.

A 3x3 conv embeds the image; residual Swin transformer blocks (RSTB: a group of Swin blocks, a conv, a skip) work at
the input size, attending within 8x8 (or 7x7) windows that every second block shifts by half a window (with a mask
that keeps the wrapped-around pixels apart); then one of four heads enlarges: "nearest+conv" (the real-world models,
A1111's default SwinIR-L), "pixelshuffle" (classical SR), "pixelshuffledirect" (lightweight) or none (restoration).
The image is padded by reflection to a multiple of the window, normalised by the DIV2K mean (x `img_range`, 255 for
the JPEG models), and cropped back at the end, as the original code does.

Parameter paths follow the published checkpoints; the activations inside their `nn.Sequential`s keep their indices
(`conv_after_body.0/.2/.4`, `upsample.0/.2`) as parameter-free modules. Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import window_attention
from .esrgan import upsample_repeat
from .layers import Conv2d, LayerNorm, linear, linear_plus, pixel_shuffle, pixel_unshuffle

UPSAMPLERS = ("nearest+conv", "pixelshuffle", "pixelshuffledirect", "")
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)  # the training set's RGB mean, subtracted before the network
MASKED = -100.0  # the original's additive mask between pixels a shift brought into one window


@dataclass(frozen=True)
class SwinIRConfig:
    in_channels: int = 3
    out_channels: int = 3
    embed_dim: int = 180
    depths: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    num_heads: tuple[int, ...] = (6, 6, 6, 6, 6, 6)
    window_size: int = 8
    mlp_ratio: float = 2.0
    upsampler: str = "nearest+conv"
    upscale: int = 4  # of the network after any unshuffling
    resi_connection: str = "1conv"  # or "3conv"
    num_feat: int = 64  # channels of the "nearest+conv" and "pixelshuffle" heads
    img_range: float = 1.0
    start_unshuffle: int = 1
    img_size: int = 64  # the training size; windows larger than it shrink to it (the original's rule)

    @property
    def scale(self) -> int:
        return self.upscale // self.start_unshuffle


class LeakyReLU(nn.Module):
    def __init__(self, slope: float):
        super().__init__()
        self._slope = slope

    def __call__(self, x: mx.array) -> mx.array:
        return nn.leaky_relu(x, self._slope)


class PixelShuffle(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self._r = r

    def __call__(self, x: mx.array) -> mx.array:
        return pixel_shuffle(x, self._r)


def sequential(layers, x: mx.array) -> mx.array:
    """A module, or a list of them applied in order (torch's nn.Sequential, its indices kept)."""
    for layer in layers if isinstance(layers, list) else [layers]:
        x = layer(x)
    return x


def residual_convs(dim: int, kind: str):
    """The conv closing a residual group: one 3x3 ("1conv"), or 3x3 to dim/4, 1x1, 3x3 back ("3conv", a list with
    LeakyReLU 0.2 between)."""
    if kind == "1conv":
        return Conv2d(dim, dim, 3, padding=1)
    quarter = dim // 4
    return [Conv2d(dim, quarter, 3, padding=1), LeakyReLU(0.2), Conv2d(quarter, quarter, 1), LeakyReLU(0.2),
            Conv2d(quarter, dim, 3, padding=1)]  # fmt: skip


def pixelshuffle_stages(num_feat: int, scale: int) -> list:
    """The original's `Upsample` (SwinIR's and DAT's "pixelshuffle" head): a conv to 4x the channels and a 2x pixel
    shuffle per octave, or one conv to 9x and a 3x shuffle; as one list, its Sequential indices kept."""
    if scale == 3:
        return [Conv2d(num_feat, 9 * num_feat, 3, padding=1), PixelShuffle(3)]
    stage = lambda: [Conv2d(num_feat, 4 * num_feat, 3, padding=1), PixelShuffle(2)]  # noqa: E731
    return [m for _ in range(scale.bit_length() - 1) for m in stage()]


@lru_cache(maxsize=16)
def relative_position_index(height: int, width: int) -> np.ndarray:
    """(N, N) index into the bias table of every pair of positions in a height x width window (N = height x width):
    the table lists the offsets (dy, dx), dy major, each from -(side - 1) to side - 1."""
    coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (height - 1, width - 1)
    return rel[..., 0] * (2 * width - 1) + rel[..., 1]


def shift_regions(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """(nW, window[0] x window[1]) region of every pixel of each window of a map rolled back by `shift`: the map cut
    at -window and -shift on each axis into 3 x 3 regions, numbered row by row (the original's `img_mask`)."""
    regions = np.zeros((height, width), np.float32)
    cuts = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(window, shift, strict=True)]
    for i, (h, w) in enumerate((h, w) for h in cuts[0] for w in cuts[1]):
        regions[h, w] = i
    wh, ww = window
    return regions.reshape(height // wh, wh, width // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)


@lru_cache(maxsize=16)
def shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int]) -> np.ndarray:
    """(nW, N, N) additive mask of the windows (window[0] x window[1] pixels) of a map rolled back by `shift`: 0
    within a region, -100 between regions (the original's `calculate_mask`)."""
    windows = shift_regions(height, width, window, shift)
    return np.where(windows[:, None, :] != windows[:, :, None], MASKED, 0.0).astype(np.float32)


def shifted_windows(attn, y: mx.array, window: int, shift: int, masks=shift_mask) -> mx.array:
    """Swin's (shifted) window attention over a (B, H, W, C) map (sides multiples of the window): the map rolled back
    by `shift`, cut into window x window windows, `attn(windows, mask)` with the shift's mask (None unshifted), the
    windows put back and the map rolled forward again (attn may change the channels: ATD's takes q, k and v). SwinIR's,
    HAT's, DRCT's, ATD's and SRFormer's blocks; `masks(H, W, (window, window), (shift, shift))` makes the mask
    (SRFormer's keys are pooled: its own)."""
    B, H, W, C = y.shape
    ws, s = window, shift
    if s:
        y = mx.roll(y, (-s, -s), axis=(1, 2))
    windows = y.reshape(B, H // ws, ws, W // ws, ws, C).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
    mask = mx.array(masks(H, W, (ws, ws), (s, s))) if s else None
    y = attn(windows, mask).reshape(B, H // ws, W // ws, ws, ws, -1).transpose(0, 1, 3, 2, 4, 5).reshape(B, H, W, -1)
    return mx.roll(y, (s, s), axis=(1, 2)) if s else y


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = mx.zeros(((2 * window - 1) ** 2, heads))

    def __call__(self, x: mx.array, mask: mx.array | None) -> mx.array:
        """x: (B*nW, N, C) windows; mask: (nW, N, N) or None."""
        N = x.shape[1]
        bias = self.relative_position_bias_table[
            mx.array(relative_position_index(self.window, self.window).reshape(-1))
        ]
        bias = bias.reshape(N, N, self.heads).transpose(2, 0, 1)
        out = window_attention(*mx.split(linear(self.qkv, x), 3, axis=-1), self.heads, bias, mask)
        return linear(self.proj, out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        """residual + fc2(gelu(fc1(x)))."""
        return linear_plus(self.fc2, linear(self.fc1, x, "gelu"), residual)


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        """x: (B, H*W, C) tokens of an H x W map (multiples of the window)."""
        B, L, C = x.shape
        y = shifted_windows(self.attn, self.norm1(x).reshape(B, *size, C), self.window, self.shift)
        x = x + y.reshape(B, L, C)
        return self.mlp(self.norm2(x), x)


class ResidualGroup(nn.Module):
    """`depth` Swin blocks (`block`: SwinIR's, or Swin2SR's V2 ones), every second one shifted by half a window;
    windows larger than the training size shrink to it, unshifted (the original's rule)."""

    def __init__(self, c, depth: int, heads: int, block=None):
        super().__init__()
        window = min(c.window_size, c.img_size)
        shift = window // 2 if c.img_size > c.window_size else 0
        block = block or SwinTransformerBlock
        self.blocks = [block(c.embed_dim, heads, window, shift if i % 2 else 0, c.mlp_ratio) for i in range(depth)]

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        for block in self.blocks:
            x = block(x, size)
        return x


class RSTB(nn.Module):
    """Residual Swin transformer block: Swin blocks, back to a map, a conv, back to tokens, plus the input
    (`block`: SwinIR's, or SRFormer's permuted-attention ones)."""

    def __init__(self, c: SwinIRConfig, depth: int, heads: int, block=None):
        super().__init__()
        self.residual_group = ResidualGroup(c, depth, heads, block)
        self.conv = residual_convs(c.embed_dim, c.resi_connection)

    def __call__(self, x: mx.array, size: tuple[int, int]) -> mx.array:
        B, L, C = x.shape
        y = sequential(self.conv, self.residual_group(x, size).reshape(B, *size, C))
        return y.reshape(B, L, C) + x


class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = LayerNorm(dim)


class PixelShuffleTrunk(nn.Module):
    """The trunk HAT and DRCT share with SwinIR's "pixelshuffle" models: a 3x3 conv embeds the (normalised) image,
    token layers run at its size after the optional patch norm, a LayerNorm and a 3x3 conv (or none) plus the
    embedding, then the pixel-shuffle head (conv and LeakyReLU 0.01, the 2x / 3x stages, a last conv). Subclasses
    call `_build` with their layers and `_run` on their padded, mean-subtracted input."""

    def _build(self, c, layers: list) -> None:
        """c: a config with in_channels, embed_dim, num_feat, upscale, patch_norm, resi_connection."""
        d, f = c.embed_dim, c.num_feat
        self.conv_first = Conv2d(c.in_channels, d, 3, padding=1)
        if c.patch_norm:
            self.patch_embed = PatchEmbed(d)
        self.layers = layers
        self.norm = LayerNorm(d)
        if c.resi_connection == "1conv":
            self.conv_after_body = Conv2d(d, d, 3, padding=1)
        self.conv_before_upsample = [Conv2d(d, f, 3, padding=1), LeakyReLU(0.01)]  # torch's default slope
        self.upsample = pixelshuffle_stages(f, c.upscale)
        self.conv_last = Conv2d(f, c.in_channels, 3, padding=1)

    def _run(self, x: mx.array) -> mx.array:
        """(B, H, W, in) -> (B, H*scale, W*scale, in), the mean not yet added back."""
        first = self.conv_first(x)
        B, H, W, C = first.shape
        tokens = first.reshape(B, H * W, C)
        if "patch_embed" in self:
            tokens = self.patch_embed.norm(tokens)
        for layer in self.layers:
            tokens = layer(tokens, (H, W))
        y = self.norm(tokens).reshape(first.shape)
        y = (self.conv_after_body(y) if "conv_after_body" in self else y) + first
        return self.conv_last(sequential(self.upsample, sequential(self.conv_before_upsample, y)))


class SwinIR(nn.Module):
    def __init__(self, config: SwinIRConfig):
        super().__init__()
        self.config = c = config
        d = c.embed_dim
        self.conv_first = Conv2d(c.in_channels * c.start_unshuffle**2, d, 3, padding=1)
        self.patch_embed = PatchEmbed(d)
        self.layers = [RSTB(c, depth, heads) for depth, heads in zip(c.depths, c.num_heads, strict=True)]
        self.norm = LayerNorm(d)
        self.conv_after_body = residual_convs(d, c.resi_connection)
        build_head(self, c, c.out_channels)

    @property
    def dtype(self) -> mx.Dtype:
        return self.conv_first.weight.dtype

    size_minimum = 16  # spandrel's smallest SwinIR input
    a1111_tiling = "average"  # A1111 runs SwinIR through `upscale_2` (tiles averaged in float), see model_upscaler

    @property
    def size_multiple(self) -> int:
        return self.config.start_unshuffle**2

    def _features(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        tokens = self.patch_embed.norm(x.reshape(B, H * W, C))
        for layer in self.layers:
            tokens = layer(tokens, (H, W))
        return self.norm(tokens).reshape(B, H, W, C)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, in) in [0, 1] -> (B, H*scale, W*scale, out)."""
        c = self.config
        _, H, W, _ = x.shape
        ws = c.window_size
        x = reflect_pad(x, -H % ws, -W % ws)
        mean = mx.array(DIV2K_MEAN if c.in_channels == 3 else (0.0,), x.dtype)
        x = (x - mean) * c.img_range
        if c.start_unshuffle > 1:
            x = pixel_unshuffle(x, c.start_unshuffle)
        first = self.conv_first(x)
        y = run_head(self, c, sequential(self.conv_after_body, self._features(first)) + first, x)
        y = y / c.img_range + mean
        return y[:, : H * c.upscale, : W * c.upscale]


def build_head(net: nn.Module, c, out: int) -> None:
    """SwinIR's four heads (Swin2SR's too), by `c.upsampler`: "pixelshuffle" (a conv with LeakyReLU 0.01, the 2x /
    3x stages, a last conv), "pixelshuffledirect" (one conv and shuffle), "nearest+conv" (per octave a nearest 2x
    and a conv, then conv_hr and the last conv, LeakyReLU 0.2 between) or none (a last conv, added to the input)."""
    d, f = c.embed_dim, c.num_feat
    if c.upsampler in ("nearest+conv", "pixelshuffle"):
        net.conv_before_upsample = [Conv2d(d, f, 3, padding=1), LeakyReLU(0.01)]  # torch's default slope
    if c.upsampler == "pixelshuffle":
        net.upsample = pixelshuffle_stages(f, c.upscale)
        net.conv_last = Conv2d(f, out, 3, padding=1)
    elif c.upsampler == "pixelshuffledirect":
        net.upsample = [Conv2d(d, c.upscale**2 * out, 3, padding=1), PixelShuffle(c.upscale)]
    elif c.upsampler == "nearest+conv":
        for i in range(c.upscale.bit_length() - 1):
            setattr(net, f"conv_up{i + 1}", Conv2d(f, f, 3, padding=1))
        net.conv_hr = Conv2d(f, f, 3, padding=1)
        net.conv_last = Conv2d(f, out, 3, padding=1)
    else:
        net.conv_last = Conv2d(d, out, 3, padding=1)


def run_head(net: nn.Module, c, y: mx.array, x: mx.array) -> mx.array:
    """The head `build_head` made, on the trunk's output `y`; `x` is the normalised input (the residual of none)."""
    if c.upsampler == "pixelshuffle":
        return net.conv_last(sequential(net.upsample, sequential(net.conv_before_upsample, y)))
    if c.upsampler == "pixelshuffledirect":
        return sequential(net.upsample, y)
    if c.upsampler == "nearest+conv":
        y = sequential(net.conv_before_upsample, y)
        for i in range(c.upscale.bit_length() - 1):
            y = nn.leaky_relu(getattr(net, f"conv_up{i + 1}")(upsample_repeat(y, 2)), 0.2)
        return net.conv_last(nn.leaky_relu(net.conv_hr(y), 0.2))
    return x + net.conv_last(y)


def reflect_pad(x: mx.array, ph: int, pw: int, edge: bool = False) -> mx.array:
    """torch's F.pad(mode="reflect") on the bottom and right (pads smaller than the size); with `edge`, the mirror
    that repeats the edge pixel (`cat([x, flip(x)])`, ATD's; pads up to the size)."""
    first = 1 if edge else 2
    for axis, p in ((1, ph), (2, pw)):
        if p:
            n = x.shape[axis]
            x = mx.take(x, mx.array([*range(n), *(n - first - k for k in range(p))]), axis=axis)
    return x
