"""Blocks shared by the UNet and the autoencoder, named as diffusers names them so checkpoints load by key.

Every tensor is channels-last: images (B, H, W, C), token sequences (B, N, C).
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import backend, cpu_kernels
from ..attention import attention
from .winograd import conv3x3_winograd

# --- elementwise activations -----------------------------------------------------------------------------------
#
# MLX's CPU exp, erf and sigmoid step through their polynomials with a libm fma call per step: 15-45 ns per element on
# x86, against ~2 ns in numpy or torch, which made GELU and SiLU cost seconds per UNet step. On CPU we use rational
# forms built from multiply, add, divide and clamp only, which mx.compile turns into vectorised loops (three kernels
# per activation, see _rational_kernels): ~3.7 ns per element against MLX's 32 (SiLU) and 54 (GELU). Both were fitted
# for mlx-sd (near-minimax on the clamped range, coefficients rounded to float32) and agree with the float64 functions
# to 4e-7 (erf) and 6e-7 (tanh) absolute, the accuracy of MLX's and torch's own float32 erf (5e-7);
# tests/test_kernels.py checks them against torch. GPUs keep MLX's built-ins, which are fast there.

# erf(x) = x P(x^2) / Q(x^2) on |x| <= 4; beyond, erf rounds to +-1 in float32.
_ERF_CLAMP = 4.0
_ERF_P = (1.1283792, 0.18552221, 0.054201037, 0.003841643, 0.00037293759, 4.5019879e-06, -1.2291238e-08)
_ERF_Q = (1.0, 0.49774817, 0.11395016, 0.015423552, 0.0012968917, 6.1367333e-05)
# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9; beyond, tanh rounds to +-1 in float32.
_TANH_CLAMP = 9.0
_TANH_P = (1.0, -0.15890644, 0.031549331, 0.0077162161, 0.00019396561, 6.5160975e-07, -9.5282782e-10, 1.453393e-12)
_TANH_Q = (1.0, 0.17442687, -0.043641653, 0.023880256, 0.0015170234, 1.5605103e-05)


def _estrin(coefficients: tuple[float, ...], t: mx.array) -> mx.array:
    """c0 + c1 t + c2 t^2 + ... in Estrin's scheme: pairs c_2i + c_2i+1 t, then pairs of those times t^2, t^4. Its
    dependency chain is log-deep instead of Horner's linear one, which keeps a degree-7 rational within MLX's fusion
    depth (11): one kernel."""
    terms: list = list(coefficients)
    power = t
    while len(terms) > 1:
        terms = [a + b * power for a, b in zip(terms[::2], terms[1::2], strict=False)] + terms[len(terms) & ~1 :]
        power = power * power
    return terms[0]


def _odd_rational(y: mx.array, p: tuple[float, ...], q: tuple[float, ...]) -> mx.array:
    t = y * y
    return y * _estrin(p, t) / _estrin(q, t)


def _rational_kernels(scale: float, clamp: float, p: tuple[float, ...], q: tuple[float, ...]):
    """x -> f(scale * x) for the odd rational f = y P(y^2) / Q(y^2) on |y| <= clamp, as two compiled CPU kernels.

    Split by hand because of how MLX's CPU JIT compiles a fused loop: its maximum/minimum (hence clip) test for NaN,
    a branch that GCC if-converts in a short loop but not in a long one, and a loop with a branch runs scalar (~7 ns
    per element instead of ~1.4). A chain deeper than its fusion depth is cut in two, and the second kernel then reads
    the first's broadcast constants as stride-0 arrays and runs its strided, scalar loop. So the clamp is a kernel of
    its own, and the polynomials (Estrin form) another: both vectorise.
    """
    clamped = mx.compile(lambda x: mx.clip(x.astype(mx.float32) * scale, -clamp, clamp))
    rational = mx.compile(lambda y: _odd_rational(y, p, q))
    return lambda x: rational(clamped(x))


# Every kernel here is traced per input shape (cheap; cached), not shapeless: the C++ kernels MLX generates and compiles
# do not depend on the shape, so a new image size compiles nothing new, while shapeless tracing adds a broadcast per
# operand, which counts against the fusion depth.
# erf(x / sqrt(2)) for GELU; tanh(x / 2) for sigmoid(x) = (1 + tanh(x / 2)) / 2 (SiLU); tanh(1.702 x / 2) for CLIP's
# quick GELU. Float32 inside (the rational forms need its range and precision).
_erf_scaled = _rational_kernels(0.7071067811865476, _ERF_CLAMP, _ERF_P, _ERF_Q)
_tanh_half = _rational_kernels(0.5, _TANH_CLAMP, _TANH_P, _TANH_Q)
_tanh_quick = _rational_kernels(0.851, _TANH_CLAMP, _TANH_P, _TANH_Q)
_tanh = _rational_kernels(1.0, _TANH_CLAMP, _TANH_P, _TANH_Q)
# The last kernel: x (1 + r) / 2 with r = erf or tanh above, times the GEGLU's value; in the input's dtype.
_gated = mx.compile(lambda x, r: (x.astype(mx.float32) * (0.5 + 0.5 * r)).astype(x.dtype))
_gated_product = mx.compile(
    lambda value, x, r: (value.astype(mx.float32) * (x.astype(mx.float32) * (0.5 + 0.5 * r))).astype(value.dtype)
)


def _silu_cpu(x: mx.array) -> mx.array:
    return _gated(x, _tanh_half(x))


# --- row blocks across CPU cores ----------------------------------------------------------------------------------
#
# Below this many elements a row-wise operation runs whole: splitting costs a join (one copy) and stream hand-offs.
ROW_BLOCK_MIN_ELEMENTS = 2**18


def rowwise(fn, x: mx.array) -> mx.array:
    """fn(x) for an fn that treats every row (last axis) independently, in one row block per CPU core.

    MLX computes an elementwise CPU kernel on one thread; the blocks run on their own CPU streams, concurrently, and
    are joined. Measured on 2 cores at SD's 64x64-latent sizes: LayerNorm 2.3x and GEGLU 1.7x faster, join included.
    """
    streams = backend.row_block_streams()
    if len(streams) < 2 or x.size < max(ROW_BLOCK_MIN_ELEMENTS, len(streams) * x.shape[-1]):
        return fn(x)
    flat = x.reshape(-1, x.shape[-1])
    bounds = [flat.shape[0] * i // len(streams) for i in range(len(streams) + 1)]
    blocks = []
    for stream, start, stop in zip(streams, bounds[:-1], bounds[1:]):
        with mx.stream(stream):
            blocks.append(fn(flat[start:stop]))
    out = mx.concatenate(blocks, axis=0)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x)."""
    return _silu_cpu(x) if backend.activations() == "cpu" else nn.silu(x)


_from_tanh = mx.compile(lambda x, r: (0.5 + 0.5 * r).astype(x.dtype))


def tanh(x: mx.array) -> mx.array:
    """tanh(x), on CPU by the rational form (MLX's CPU tanh: ~29 ns an element, 16 ms for DITN's 0.55 M per layer)."""
    return _tanh(x).astype(x.dtype) if backend.activations() == "cpu" else mx.tanh(x)


def sigmoid(x: mx.array) -> mx.array:
    """1 / (1 + e^-x), on CPU as (1 + tanh(x / 2)) / 2 (the rational tanh; MLX's CPU sigmoid: 12x torch's time)."""
    return _from_tanh(x, _tanh_half(x)) if backend.activations() == "cpu" else mx.sigmoid(x)


def mish(x: mx.array) -> mx.array:
    """x tanh(softplus(x)); on a Linux CPU in float32 by numba's kernel (cpu_kernels.mish)."""
    if backend.row_kernels(x.dtype) == "numba":
        return cpu_kernels.mish(x)
    return nn.mish(x)


def gelu(x: mx.array) -> mx.array:
    """Exact (erf) GELU, as torch's default."""
    return _gated(x, _erf_scaled(x)) if backend.activations() == "cpu" else nn.gelu(x)


def quick_gelu(x: mx.array) -> mx.array:
    """x * sigmoid(1.702 x), the GELU approximation OpenAI's CLIP was trained with."""
    return _gated(x, _tanh_quick(x)) if backend.activations() == "cpu" else x * mx.sigmoid(1.702 * x)


# OpenAI's CLIP was trained with x * sigmoid(1.702 x), an approximation of GELU; OpenCLIP and SwinIR use exact GELU.
ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def geglu(value: mx.array, gate: mx.array) -> mx.array:
    """value * gelu(gate), the GEGLU feed-forward's gating (Shazeer 2020)."""
    return _gated_product(value, gate, _erf_scaled(gate)) if backend.activations() == "cpu" else value * nn.gelu(gate)


# --- normalisation ----------------------------------------------------------------------------------------------

# torch's CPU GroupNorm folds the statistics and the affine into one scale and shift per channel,
# y = x * (rstd * weight) + (bias - mean * rstd * weight); so do we, as one compiled pass over x.
_affine = mx.compile(lambda x, scale, shift: x * scale + shift, shapeless=True)
_affine_silu = mx.compile(lambda x, scale, shift: nn.silu(x * scale + shift), shapeless=True)
_centred_square = mx.compile(lambda x, mean: mx.square(x - mean), shapeless=True)
# Per-channel sums run over row blocks of this many pixels first, then over the blocks: float32 sums of a million
# values (a 512x512 VAE group) keep ~1e-7 relative accuracy this way instead of drifting with one long running sum.
_SUM_BLOCK = 1024


def _channel_sums(x: mx.array) -> mx.array:
    """(B, P, C) -> (B, C) sums over P, in float32."""
    B, P, C = x.shape
    if P > _SUM_BLOCK and P % _SUM_BLOCK == 0:
        return x.reshape(B, P // _SUM_BLOCK, _SUM_BLOCK, C).sum(axis=2).sum(axis=1)
    return x.sum(axis=1)


def _silu_numpy_inplace(y: mx.array) -> mx.array:
    """y * sigmoid(y) into y's own buffer by numpy across cores; y must be fresh and referenced nowhere else."""
    mx.eval(y)
    backend.cpu_map_inplace(_silu_block, np.asarray(y).reshape(-1))
    return y


# Elements per piece: four passes over each, finding it in L2 (256 KB and its temporary). Smaller pieces mean more
# numpy calls, and with one worker per core each call may wait for Python's GIL: on 2 cores 2**14 ran at 2.1-2.8 ns
# per element, 2**16 at 0.9-1.0.
_SILU_PIECE = 2**16


def _silu_block(x: np.ndarray) -> None:
    for start in range(0, x.size, _SILU_PIECE):
        chunk = x[start : start + _SILU_PIECE]
        t = np.negative(chunk)
        with np.errstate(over="ignore"):  # exp(-x) = inf for x < -88 gives x / inf = -0, as torch's silu
            np.exp(t, out=t)
        t += 1
        np.divide(chunk, t, out=chunk)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters); on CPU by numba's kernel or in row blocks across cores (see rowwise)."""

    def __call__(self, x: mx.array) -> mx.array:
        if "weight" in self and "bias" in self and backend.row_kernels(x.dtype) == "numba":
            return cpu_kernels.layer_norm(x, self.weight, self.bias, self.eps)
        return rowwise(super().__call__, x)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over channels-last input, statistics in float32, optionally followed by SiLU.

    Two-pass variance (mean first, then the mean of squared deviations): the one-pass E[x^2] - E[x]^2 loses
    ~4e-5 relative accuracy at full-size VAE resolutions, where groups hold millions of values. Statistics are
    reduced per channel (a contiguous column sum, ~5x faster in MLX than reducing a group's strided channels) and
    then per group; normalisation and affine are one pass, SiLU a second one by numpy on CPU (see activations).
    float32 on a Linux CPU runs numba's kernel instead (cpu_kernels.group_norm: one read for the statistics, one
    pass with the SiLU fused).
    """

    def __init__(self, num_groups: int, dims: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = mx.ones((dims,))
        self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        if backend.row_kernels(x.dtype) == "numba":
            return cpu_kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, silu)
        shape = x.shape
        B, C, G = shape[0], shape[-1], self.num_groups
        flat = x.reshape(B, -1, C).astype(mx.float32)  # (B, P, C)
        count = flat.shape[1] * (C // G)

        def per_channel(group_values: mx.array) -> mx.array:  # (B, G) -> (B, 1, C)
            return mx.repeat(group_values, C // G, axis=-1)[:, None, :]

        mean = per_channel(_channel_sums(flat).reshape(B, G, -1).sum(axis=-1) / count)
        var = _channel_sums(_centred_square(flat, mean)).reshape(B, G, -1).sum(axis=-1) / count
        scale = per_channel(mx.rsqrt(var + self.eps)) * self.weight.astype(mx.float32)  # (B, 1, C)
        shift = self.bias.astype(mx.float32) - mean * scale
        if not silu:
            return _affine(flat, scale, shift).astype(x.dtype).reshape(shape)
        mode = backend.activations()
        if mode == "cpu" and x.dtype == mx.float32:
            return _silu_numpy_inplace(_affine(flat, scale, shift)).reshape(shape)
        if mode == "cpu":
            return _silu_cpu(_affine(flat, scale, shift)).astype(x.dtype).reshape(shape)
        return _affine_silu(flat, scale, shift).astype(x.dtype).reshape(shape)


# MLX's CPU convolution unfolds its input (im2col) into a (B*H*W, 9*C) buffer: 94 MB for one 3x3 conv of a SD UNet's
# 64x64x320 batch-2 activation, 4.8 GB for a 1024x1024x128 VAE one, written by one thread at a few GB/s. On CPU a
# 3x3 conv runs as nine products instead, one per tap, read in place from the zero-padded input: flattened to rows,
# the tap (dy, dx) of output pixel p is padded input row p + dy * (W + 2) + dx, so each tap is one BLAS call on a
# contiguous slice, accumulated into one output (the two padding columns of each output row are computed and
# dropped: 6% extra arithmetic at 64x64). Below TAPS_MIN_PIXELS (B*H*W) or TAPS_MIN_CHANNELS inputs, the unfold is
# small and MLX's single product (K = 9C instead of C) wins. Measured on 2 cores, per SD1.5 VAE decode: convolutions
# 22.1 -> 17.7 s (1.25-1.35x at 256x256 and 512x512, level at 128x128); 64x64 UNet convs ~15% faster. Memory: the
# padded input and output rows instead of the unfold (a 1024x1024 decode peaks 0.5 GB above the row strips below).
# In float32 (the CPU's dtype) Winograd F(4x4, 3x3) (models/winograd.py) does a quarter of the taps' products and
# runs 1.3-2x faster than them, at 3-7x a direct convolution's rounding error; below WINOGRAD_MIN_PIXELS its filter
# transform (4x the weight) costs more than it saves. Its input and output transforms: as BLAS products they cost more
# than they save with fewer than WINOGRAD_MIN_CHANNELS input or output channels (the VAE's 3-channel ends); as the
# numba kernels (cpu_kernels.winograd_conv) they cost less whatever the outputs (ESRGAN's 32-channel dense convs: 1.4x
# faster than the taps, 64 -> 3 channels at 768x768 1.9x), given WINOGRAD_MIN_INPUTS input channels and
# WINOGRAD_MIN_WORK pixels x input channels (below, as at 48x48 by 32 channels, MLX's conv is faster).
WINOGRAD_MIN_PIXELS = 1024
WINOGRAD_MIN_CHANNELS = 64
WINOGRAD_MIN_INPUTS = 32
WINOGRAD_MIN_WORK = 2**18
TAPS_MIN_PIXELS = 8192
TAPS_MIN_CHANNELS = 64
# Elsewhere (GPUs; small CPU convs) MLX's conv runs, and above this many unfold bytes a 3x3 stride-1 conv runs over
# row strips (each with a one-row halo), which bounds the unfold buffer at no cost in speed.
CONV_UNFOLD_BYTES = 256 * 2**20


def _winograd_pays(pixels: int, inputs: int, outputs: int) -> bool:
    if pixels < WINOGRAD_MIN_PIXELS:
        return False
    if backend.row_kernels(mx.float32) == "numba":  # the transforms as numba kernels (see above)
        return inputs >= WINOGRAD_MIN_INPUTS and pixels * inputs >= WINOGRAD_MIN_WORK
    return min(inputs, outputs) >= WINOGRAD_MIN_CHANNELS


def conv3x3_taps(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """3x3, stride-1, padding-1 convolution of (B, H, W, C) by an (O, 3, 3, C) weight as nine accumulated products."""
    B, H, W, C = x.shape
    O = weight.shape[0]
    row = W + 2
    xp = mx.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)]).reshape(-1, C)  # (B * (H + 2) * row, C)
    taps = mx.contiguous(weight.transpose(1, 2, 3, 0)).reshape(9, C, O)  # tap-major (C, O) matrices
    rows = xp.shape[0] - 2 * row - 2  # every output pixel's nine rows lie inside xp
    out = mx.zeros((1, O), x.dtype) if bias is None else bias.astype(x.dtype)[None]
    for t in range(9):
        start = (t // 3) * row + t % 3
        out = mx.addmm(out, xp[start : start + rows], taps[t])  # BLAS accumulates in place (the sum is donated)
    pixels = mx.as_strided(out, (B, H, W, O), ((H + 2) * row * O, row * O, O, 1))
    return mx.contiguous(pixels)


def circular_pad(x: mx.array, ph: int, pw: int) -> mx.array:
    """torch's F.pad(mode="circular") of (B, H, W, C) by ph rows and pw columns on each side."""
    if ph:
        x = mx.concatenate([x[:, -ph:], x, x[:, :ph]], axis=1)
    if pw:
        x = mx.concatenate([x[:, :, -pw:], x, x[:, :, :pw]], axis=2)
    return x


def set_circular(model: nn.Module, circular: bool) -> None:
    """Switch every convolution of `model` to circular padding (torch's padding_mode="circular") or back to zeros:
    A1111's "Tiling", which makes images that tile seamlessly."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.circular = circular


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters) whose 3x3, stride-1, padding-1 convolutions run on CPU as Winograd F(4x4, 3x3)
    (float32) or nine per-tap products (see conv3x3_taps), and in row strips elsewhere when large. With `circular`
    set (`set_circular`) it pads circularly instead of with zeros."""

    circular = False

    def __call__(self, x: mx.array) -> mx.array:
        if self.circular and self.padding != (0, 0):
            return self._circular(x)
        if self.weight.shape[1:3] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1:
            # a 1x1 convolution is a product over the pixels: MLX's CPU conv took 1.25-1.85x longer (SD1.5's
            # proj_in/proj_out at 64x64, the VAE's shortcuts, SCUNet's 1x1s)
            O, C = self.weight.shape[0], x.shape[-1]
            y = x.reshape(-1, C) @ self.weight.reshape(O, C).T
            return (y + self.bias if "bias" in self else y).reshape(*x.shape[:-1], O)
        K = self.weight.shape[1]
        valid = self.padding == (0, 0) and self.stride == (1, 1) and self.groups == 1 and self.dilation in (1, (1, 1))
        if valid and self.weight.shape[1:3] == (3, 3):
            # a "valid" 3x3 conv (Real-CUGAN's) is the same-padded one's interior: the fast paths, one border dropped
            return self._same3x3(x)[:, 1:-1, 1:-1]
        same = K % 2 == 1 and self.weight.shape[2] == K and self.padding == (K // 2, K // 2)
        plain = not same or self.stride != (1, 1) or self.dilation not in (1, (1, 1))
        if self.groups != 1 or plain:
            if self._same_depthwise(x) and backend.row_kernels(x.dtype) == "numba":  # MLX's grouped conv is slow on CPU
                d = self.dilation if isinstance(self.dilation, int) else self.dilation[0]
                return cpu_kernels.depthwise(x, self.weight, self.get("bias"), d)
            return super().__call__(x)
        if K != 3:
            return super().__call__(x)
        return self._same3x3(x)

    def _same_depthwise(self, x: mx.array) -> bool:
        """A depthwise, stride-1 conv with an odd kernel (any shape, any one dilation) padded to keep the size."""
        O, KH, KW, _ = self.weight.shape
        d = self.dilation if isinstance(self.dilation, tuple) else (self.dilation, self.dilation)
        same = KH % 2 == KW % 2 == 1 and self.padding == (d[0] * (KH // 2), d[1] * (KW // 2))
        return self.groups == x.shape[-1] == O and self.stride == (1, 1) and d[0] == d[1] and same

    def _circular(self, x: mx.array) -> mx.array:
        x = circular_pad(x, *self.padding)
        if self.weight.shape[1:3] == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1):
            # the zero-padded fast paths on the wrapped input: its inner outputs read only real (wrapped) pixels
            return self._same3x3(x)[:, 1:-1, 1:-1]
        y = mx.conv2d(x, self.weight, self.stride, 0, self.dilation, self.groups)
        return y + self.bias if "bias" in self else y

    def _same3x3(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        kernel = backend.conv3x3_kernel(x.dtype)
        if kernel == "winograd" and _winograd_pays(B * H * W, C, self.weight.shape[0]):
            return conv3x3_winograd(x, self.weight, self.get("bias"))
        if kernel != "mlx" and B * H * W >= TAPS_MIN_PIXELS and C >= TAPS_MIN_CHANNELS:
            return conv3x3_taps(x, self.weight, self.get("bias"))
        unfold = B * H * W * C * 9 * x.dtype.size
        if unfold <= CONV_UNFOLD_BYTES:
            y = mx.conv2d(x, self.weight, padding=1)  # padding 1 whatever the layer's (see the valid convs above)
            return y + self.bias if "bias" in self else y
        rows = max(1, H * CONV_UNFOLD_BYTES // unfold)
        xp = mx.pad(x, [(0, 0), (1, 1), (0, 0), (0, 0)])  # zero rows above and below; columns padded by the conv
        strips = []
        for r in range(0, H, rows):
            strips.append(mx.conv2d(xp[:, r : r + rows + 2], self.weight, padding=(0, 1)))
            mx.eval(strips[-1])  # MLX keeps a conv's unfolded buffer until its evaluation ends: one strip at a time
        y = mx.concatenate(strips, axis=1)  # (B, H, W, O)
        return y + self.bias if "bias" in self else y


class TextContext:
    """One request's text conditioning, with each cross-attention layer's keys and values kept after their first
    use. The context is the same at every sampling step, so `to_k(context)` and `to_v(context)` are too: computed
    once per request instead of once per step (SDXL at 512x512: 140 products of 154 x 2048 tokens, ~0.4 s of each
    guided step on a 2-core CPU). The pipeline makes one per request; modules do not change during a request (LoRAs
    are fused or wrapped before it starts), which is what makes the keys of `id(layer)` safe.
    """

    def __init__(self, array: mx.array, image=None):
        self.array = array
        # an IP-Adapter's image tokens (mlx_sd.ip_adapter.ImageContext): `image.keys_values(layer)` -> (k, v, scale)
        # for the cross-attention layers it adapts, None for the others
        self.image = image
        # reference-only control (mlx_sd.reference.Reference) while a model call uses it, else None
        self.reference = None
        self._keys_values: dict[int, tuple[mx.array, mx.array]] = {}

    def keys_values(self, layer: Attention) -> tuple[mx.array, mx.array]:
        kv = self._keys_values.get(id(layer))
        if kv is None:
            kv = self._keys_values[id(layer)] = (layer.to_k(self.array), layer.to_v(self.array))
        return kv


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

    def __call__(
        self, x: mx.array, context: mx.array | TextContext | None = None, residual: mx.array | None = None
    ) -> mx.array:
        """Attention of x to context (x itself if None), plus `residual` if given. A `TextContext` holding an
        IP-Adapter's image tokens adds scale * attention(q, image keys, image values) before the output projection."""
        image = None
        if isinstance(context, TextContext):
            k, v = context.keys_values(self)
            image = context.image.keys_values(self) if context.image is not None else None
        else:
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
        q = self.to_q(x)
        out = attention(q, k, v, self.heads)
        if image is not None:
            k_image, v_image, scale = image
            out = out + scale * attention(q, k_image, v_image, self.heads)
        return self.to_out[0](out) if residual is None else linear_plus(self.to_out[0], out, residual)


def linear(layer: nn.Module, x: mx.array, activation: str | None = None) -> mx.array:
    """layer(x), then `activation` ("gelu", "quick_gelu") if given; a plain float32 Linear on a Linux CPU adds its
    bias (and applies the activation, in the same pass) by numba's kernel (cpu_kernels.linear)."""
    if type(layer) is nn.Linear and "bias" in layer and backend.row_kernels(x.dtype) == "numba":
        return cpu_kernels.linear(layer, x, activation=activation)
    return layer(x) if activation is None else ACTIVATIONS[activation](layer(x))


def linear_plus(layer: nn.Module, x: mx.array, residual: mx.array) -> mx.array:
    """residual + layer(x), as one BLAS call seeded with residual + bias (addmm) for a plain Linear; on a Linux CPU
    with numba, the product alone and then one kernel adding bias and residual in place (cpu_kernels.linear).

    layer(x) + residual would copy the broadcast bias into the product's output first and add the residual in a pass
    of its own: measured on CPU at 8192 x 320 (a SD 64x64 level's tokens), 13.1 -> 11.0 ms. `residual` may have
    another shape with the same number of elements (tokens against pixels); the result has its shape.
    """
    if type(layer) is not nn.Linear:  # quantized, or wrapped by a LoRA
        return residual + layer(x).reshape(residual.shape)
    if backend.row_kernels(x.dtype) == "numba":
        return cpu_kernels.linear(layer, x, residual)
    seed = residual + layer.bias if "bias" in layer else residual
    rows = seed.reshape(-1, seed.shape[-1])
    return mx.addmm(rows, x.reshape(-1, x.shape[-1]), layer.weight.T).reshape(residual.shape)


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
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(self.norm1(x, silu=True))
        if temb is not None:
            h = h + self.time_emb_proj(silu(temb))[:, None, None, :]  # (B, 1, 1, C)
        h = self.conv2(self.norm2(h, silu=True))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. The VAE encoder pads right/bottom only (padding=0 plus an explicit (0, 1) pad)."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

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


def max_pool(x: mx.array, k: int, stride: int | None = None, padding: int = 0) -> mx.array:
    """torch's max_pool2d(kernel k, stride (default k), padding) of (B, H, W, C), separably: over rows, then
    columns. The padding is -inf, as torch's."""
    stride = stride or k
    if padding:
        x = mx.pad(x, [(0, 0), (padding, padding), (padding, padding), (0, 0)], constant_values=-float("inf"))
    _, H, W, _ = x.shape
    rows, cols = (H - k) // stride + 1, (W - k) // stride + 1
    if stride == k and H == rows * k and W == cols * k:  # whole windows: a reshape
        return x.reshape(x.shape[0], rows, k, cols, k, x.shape[-1]).max(axis=(2, 4))
    x = mx.max(mx.stack([x[:, i : i + stride * (rows - 1) + 1 : stride] for i in range(k)]), axis=0)
    return mx.max(mx.stack([x[:, :, i : i + stride * (cols - 1) + 1 : stride] for i in range(k)]), axis=0)


def pixel_unshuffle(x: mx.array, r: int) -> mx.array:
    """torch's pixel_unshuffle in NHWC: (B, H, W, C) -> (B, H/r, W/r, C*r*r), channel c*r*r + i*r + j."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // r, r, W // r, r, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, H // r, W // r, C * r * r)


def pixel_shuffle(x: mx.array, r: int) -> mx.array:
    """torch's pixel_shuffle in NHWC: (B, H, W, C*r*r) -> (B, H*r, W*r, C), output (h*r + i, w*r + j, c) from input
    channel c*r*r + i*r + j."""
    B, H, W, C = x.shape
    x = x.reshape(B, H, W, C // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(B, H * r, W * r, C // (r * r))


def conv_transpose(x: mx.array, weight: mx.array, stride: int, padding: int = 0) -> mx.array:
    """torch's conv_transpose2d (no bias) of (B, H, W, C) x by an (C, k, k, O) weight (torch's (C, O, k, k) moved as
    every 4-D weight is at conversion): one product x W gives every pixel's k x k output patch; the patches are laid
    out in (k / stride)^2 non-overlapping blocks (the kernel zero-padded to a multiple of the stride), shifted and
    summed, then `padding` cropped off each side. MLX's CPU conv_transpose2d took 50-200x as long (Real-CUGAN's
    2x2 and 4x4 ones at 66x66: 0.4 and 1.6 s)."""
    B, H, W, C = x.shape
    k, O, s = weight.shape[1], weight.shape[-1], stride
    n = -(-k // s)  # blocks per side
    if n * s != k:
        weight = mx.pad(weight, ((0, 0), (0, n * s - k), (0, n * s - k), (0, 0)))
    patches = (x.reshape(-1, C) @ weight.reshape(C, -1)).reshape(B, H, W, n, s, n, s, O)
    out = None
    for u in range(n):
        for v in range(n):
            block = patches[:, :, :, u, :, v].transpose(0, 1, 3, 2, 4, 5).reshape(B, H * s, W * s, O)
            block = mx.pad(block, ((0, 0), (u * s, (n - 1 - u) * s), (v * s, (n - 1 - v) * s), (0, 0)))
            out = block if out is None else out + block
    rows, cols = (H - 1) * s + k, (W - 1) * s + k  # torch's size before the padding is cropped
    return out[:, padding : rows - padding, padding : cols - padding]


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

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
        return self.linear_2(silu(self.linear_1(x)))
