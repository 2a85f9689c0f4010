"""CPU kernels compiled by numba, where MLX runs on a Linux CPU: LayerNorm, the GEGLU gate, GroupNorm (+ SiLU), the
bias (+ residual) of Linear layers, and the input and output transforms of Winograd convolutions.

MLX computes each CPU elementwise operation on one thread, as a pass of its own: its LayerNorm is seven passes over
the activation (two reductions, five broadcasts), ~3.5 ns per element on one core, and the GEGLU gate three compiled
kernels; torch's fused, vectorised kernels take 0.2-0.5 ns. Here each row is one pass of one loop nest (the row,
at most 10 KB, stays in L1 between its mean, its variance and its output), vectorised by LLVM, and row blocks run on
the CPU worker threads (`backend.cpu_map`; numba releases the GIL). MLX's CPU addmm copies a Linear's broadcast bias
into its output with a general strided copy on one thread (~1.3 ns per element), so on this path the product runs
alone and a kernel adds the bias in place. `backend.row_kernels()` decides where all of this runs.

MLX cannot adopt a numpy buffer on CPU (`mx.from_dlpack(copy=False)` refuses), so each output is an MLX array made
by `mx.zeros` (one fill pass, on one thread), or a product's fresh output, which the kernel then writes through its
numpy view: such an array is referenced nowhere else, as the in-place SiLU in models/layers.py relies on too.

Kernels compile on first use (~4-12 s for all) and are cached on disk next to this file (or in numba's user-wide
cache where that is read-only); a later process still spends ~0.7 s starting numba, which `warm_up_in_background`
moves off the first step. `fastmath` allows reassociation (vectorised sums), but not the "no NaN / no inf"
assumptions, so non-finite inputs propagate as in torch.
"""

from __future__ import annotations

import threading
import types

import mlx.core as mx
import numpy as np

from . import backend

# erf(x) = x P(x^2) / Q(x^2) on |x| <= 4 (models/layers.py has the fit); float32 constants, so that nothing promotes.
_ERF_CLAMP = np.float32(4.0)
_ERF_P = np.array((1.1283792, 0.18552221, 0.054201037, 0.003841643, 0.00037293759, 4.5019879e-06, -1.2291238e-08),
                  np.float32)  # fmt: skip
_ERF_Q = np.array((1.0, 0.49774817, 0.11395016, 0.015423552, 0.0012968917, 6.1367333e-05), np.float32)
_SQRT_HALF = np.float32(0.7071067811865476)
# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 9 (models/layers.py), for SiLU.
_TANH_CLAMP = np.float32(9.0)
_TANH_P = np.array((1.0, -0.15890644, 0.031549331, 0.0077162161, 0.00019396561, 6.5160975e-07, -9.5282782e-10,
                    1.453393e-12), np.float32)  # fmt: skip
_TANH_Q = np.array((1.0, 0.17442687, -0.043641653, 0.023880256, 0.0015170234, 1.5605103e-05), np.float32)
# 2^f on [-1/2, 1/2] as 1 + f P(f) (Cephes' exp2f; 0.7 ulp here, numpy's exp2 0.5).
_EXP2_P = np.array((1.5353362e-04, 1.3398874e-03, 9.6184374e-03, 5.5503325e-02, 0.24022648, 0.69314720), np.float32)
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
# Below this many elements a kernel runs on the calling thread: a hand-off to the workers costs ~50 us.
SPLIT_MIN_ELEMENTS = 2**16
# GroupNorm's statistics read x in blocks of rows of about this size, twice each from L2 (see group_norm).
GROUP_NORM_BLOCK_BYTES = 2**17


_build_lock = threading.Lock()


def warm_up_in_background() -> None:
    """Import numba and load the kernels (or compile them, on a first run) on a daemon thread, so that a model's
    first step does not wait for it: ~0.7 s with the kernels cached, ~3 s without. Called when a model is loaded."""
    global _warm_up
    if _warm_up is None:
        _warm_up = threading.Thread(target=_warm_up_quietly, name="mlx_sd_numba_warm_up", daemon=True)
        _warm_up.start()


_warm_up = None


def _warm_up_quietly() -> None:
    # Only a head start: if it fails (another process rewriting numba's cache at that moment, say), the first real
    # call loads or compiles its kernel itself, so the thread must not print a traceback over the user's output.
    try:
        _call_each_kernel()
    except Exception:
        pass


def _call_each_kernel() -> None:
    """Each kernel once on tiny arrays of the types the layers pass (C-contiguous float32), which loads it."""
    k = _kernels()
    x, v, out = np.ones((2, 8), np.float32), np.ones(8, np.float32), np.empty((2, 8), np.float32)
    k.layer_norm(x, v, v, np.float32(1e-5), out)
    k.geglu(np.ones((2, 16), np.float32), np.zeros(16, np.float32), out)
    k.channel_moments(x, 1, np.zeros(8), np.zeros(8))
    k.affine(x, v, v, True, out)
    k.add_into(out, v, x)
    k.add_bias_into(out, v)
    k.add_bias_gelu_into(out, v, False)
    k.exp2_rows(x)
    k.mish_from_exp(x, out)
    image = np.ones((1, 4, 4, 8), np.float32)
    k.depthwise(image, np.ones((3, 3, 8), np.float32), v, 1, 0, 0, 4, np.empty_like(image))
    tiles = np.empty((36, 1, 8), np.float32)
    k.winograd_tiles(np.ones((1, 4, 4, 8), np.float32), 0, 0, 1, 0, 1, tiles)
    k.winograd_untile(tiles, v, 0, 0, 1, 0, 1, np.empty((1, 4, 4, 8), np.float32))


_built = None


def _kernels() -> types.SimpleNamespace:
    global _built
    if _built is None:
        with _build_lock:  # the warm-up thread and the first layer may ask at once
            if _built is None:
                _built = _build_kernels()
    return _built


def _build_kernels():
    import numba
    from llvmlite import ir
    from numba.extending import intrinsic

    global _float_from_bits

    @intrinsic
    def _float_from_bits(typingctx, bits):  # the float32 whose bits are an int32's (LLVM's bitcast, vectorisable)
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return numba.types.float32(numba.types.int32), codegen

    def jit(fn):
        options = dict(nogil=True, fastmath=_FASTMATH, error_model="numpy", boundscheck=False)
        try:
            return numba.njit(cache=True, **options)(fn)
        except RuntimeError:  # no writable cache location: compile in every process instead
            return numba.njit(**options)(fn)

    @jit
    def layer_norm(x, weight, bias, eps, out):  # (R, C) rows, (C,) affine
        rows, cols = x.shape
        n = np.float32(cols)
        for r in range(rows):
            total = np.float32(0)
            for c in range(cols):
                total += x[r, c]
            mean = total / n
            squares = np.float32(0)  # two passes over the row in L1: the variance of deviations, as torch
            for c in range(cols):
                d = x[r, c] - mean
                squares += d * d
            rstd = np.float32(1) / np.sqrt(squares / n + eps)
            for c in range(cols):
                out[r, c] = (x[r, c] - mean) * rstd * weight[c] + bias[c]

    @jit
    def geglu(h, bias, out):  # h (R, 2n) + bias (2n,) = [value | gate] -> value * gelu(gate), (R, n)
        rows, n = out.shape
        p, q = _ERF_P, _ERF_Q
        for r in range(rows):
            for c in range(n):
                g = h[r, n + c] + bias[n + c]
                y = min(max(g * _SQRT_HALF, -_ERF_CLAMP), _ERF_CLAMP)
                t = y * y
                t2 = t * t
                t4 = t2 * t2  # Estrin's scheme, as models/layers.py: short dependency chains
                num = (p[0] + p[1] * t) + (p[2] + p[3] * t) * t2 + ((p[4] + p[5] * t) + p[6] * t2) * t4
                den = (q[0] + q[1] * t) + (q[2] + q[3] * t) * t2 + (q[4] + q[5] * t) * t4
                out[r, c] = (h[r, c] + bias[c]) * (g * (np.float32(0.5) + np.float32(0.5) * (y * num / den)))

    @jit
    def add_into(y, bias, residual):  # y += bias (per column), then += residual (same shape), in place
        rows, cols = y.shape
        for r in range(rows):
            for c in range(cols):
                y[r, c] = (y[r, c] + bias[c]) + residual[r, c]

    @jit
    def add_bias_into(y, bias):
        rows, cols = y.shape
        for r in range(rows):
            for c in range(cols):
                y[r, c] += bias[c]

    @jit
    def add_bias_gelu_into(y, bias, quick):  # y = gelu(y + bias) in place; quick: x sigmoid(1.702 x) instead
        rows, cols = y.shape
        if quick:  # x (1 + tanh(0.851 x)) / 2, tanh's rational form (as affine's SiLU)
            p, q = _TANH_P, _TANH_Q
            for r in range(rows):
                for c in range(cols):
                    g = y[r, c] + bias[c]
                    u = min(max(g * np.float32(0.851), -_TANH_CLAMP), _TANH_CLAMP)
                    t = u * u
                    t2 = t * t
                    t4 = t2 * t2
                    num = (p[0] + p[1] * t) + (p[2] + p[3] * t) * t2 + ((p[4] + p[5] * t) + (p[6] + p[7] * t) * t2) * t4
                    den = (q[0] + q[1] * t) + (q[2] + q[3] * t) * t2 + (q[4] + q[5] * t) * t4
                    y[r, c] = g * (np.float32(0.5) + np.float32(0.5) * (u * num / den))
        else:  # x (1 + erf(x / sqrt 2)) / 2, erf's rational form (as geglu's)
            p, q = _ERF_P, _ERF_Q
            for r in range(rows):
                for c in range(cols):
                    g = y[r, c] + bias[c]
                    u = min(max(g * _SQRT_HALF, -_ERF_CLAMP), _ERF_CLAMP)
                    t = u * u
                    t2 = t * t
                    t4 = t2 * t2
                    num = (p[0] + p[1] * t) + (p[2] + p[3] * t) * t2 + ((p[4] + p[5] * t) + p[6] * t2) * t4
                    den = (q[0] + q[1] * t) + (q[2] + q[3] * t) * t2 + (q[4] + q[5] * t) * t4
                    y[r, c] = g * (np.float32(0.5) + np.float32(0.5) * (u * num / den))

    @jit
    def channel_moments(x, block, mean, m2):  # per-channel mean and sum of squared deviations over rows (float64)
        rows, cols = x.shape
        bmean = np.empty(cols, np.float32)
        bsq = np.empty(cols, np.float32)
        n = 0
        for r0 in range(0, rows, block):  # a block of rows is read twice from the cache, once from memory
            r1 = min(r0 + block, rows)
            nb = r1 - r0
            bmean[:] = 0
            for r in range(r0, r1):
                for c in range(cols):
                    bmean[c] += x[r, c]
            for c in range(cols):
                bmean[c] /= np.float32(nb)
            bsq[:] = 0
            for r in range(r0, r1):
                for c in range(cols):
                    d = x[r, c] - bmean[c]
                    bsq[c] += d * d
            total = n + nb
            for c in range(cols):  # Chan et al.'s update: merge the block's moments into the running ones
                delta = np.float64(bmean[c]) - mean[c]
                mean[c] += delta * nb / total
                m2[c] += np.float64(bsq[c]) + delta * delta * n * nb / total
            n = total

    @jit
    def affine(x, scale, shift, with_silu, out):  # x * scale + shift per channel, optionally then SiLU
        rows, cols = x.shape
        p, q = _TANH_P, _TANH_Q
        if with_silu:  # y sigmoid(y) = y (1 + tanh(y / 2)) / 2, tanh's rational form (models/layers.py), inline:
            for r in range(rows):  # a jitted helper made the cached kernel recompile in every process
                for c in range(cols):
                    y = x[r, c] * scale[c] + shift[c]
                    u = min(max(y * np.float32(0.5), -_TANH_CLAMP), _TANH_CLAMP)
                    t = u * u
                    t2 = t * t
                    t4 = t2 * t2
                    num = (p[0] + p[1] * t) + (p[2] + p[3] * t) * t2 + ((p[4] + p[5] * t) + (p[6] + p[7] * t) * t2) * t4
                    den = (q[0] + q[1] * t) + (q[2] + q[3] * t) * t2 + (q[4] + q[5] * t) * t4
                    out[r, c] = y * (np.float32(0.5) + np.float32(0.5) * (u * num / den))
        else:
            for r in range(rows):
                for c in range(cols):
                    out[r, c] = x[r, c] * scale[c] + shift[c]

    @jit
    def depthwise(x, w, bias, d, b, first, last, y):  # rows first..last of image b; w (KH, KW, C), dilation d
        _, H, W, C = x.shape
        KH, KW = w.shape[0], w.shape[1]
        ph, pw = d * (KH // 2), d * (KW // 2)  # the zero padding that keeps the size
        acc = np.empty(C, np.float32)
        for i in range(first, last):
            for j in range(W):
                acc[:] = bias
                for dy in range(KH):
                    row = i + dy * d - ph
                    if row < 0 or row >= H:
                        continue
                    for dx in range(KW):
                        col = j + dx * d - pw
                        if col < 0 or col >= W:
                            continue
                        for c in range(C):
                            acc[c] += w[dy, dx, c] * x[b, row, col, c]
                y[b, i, j, :] = acc

    @jit
    def exp2_rows(x):  # 2^x in place: 2^n (exponent bits) x 2^f (polynomial), n = round(x); inf from 128, 0 below
        rows, cols = x.shape
        p0, p1, p2, p3, p4, p5 = _EXP2_P[0], _EXP2_P[1], _EXP2_P[2], _EXP2_P[3], _EXP2_P[4], _EXP2_P[5]
        for r in range(rows):
            for c in range(cols):
                v = x[r, c]
                n = min(max(np.floor(v + np.float32(0.5)), np.float32(-126)), np.float32(128))
                f = v - n
                p = np.float32(1) + f * (p5 + f * (p4 + f * (p3 + f * (p2 + f * (p1 + f * p0)))))
                # 2^n as 2 x 2^(n - 1) for n > 0: 2^128 has no float32 exponent, 2^127.9 a value
                up = n > np.float32(0)
                p = p * np.float32(2) if up else p
                m = np.int32(n) - np.int32(1) if up else np.int32(n)
                p = p * _float_from_bits((m + np.int32(127)) << 23)
                p = np.float32(np.inf) if v >= np.float32(128) else p  # NaN stays NaN: both tests fail
                x[r, c] = np.float32(0) if v < np.float32(-126.5) else p

    @jit
    def mish_from_exp(x, e):  # e holds e^min(x, 20); -> x tanh(softplus(x)) = x n / (n + 2), n = e (e + 2), in e
        rows, cols = x.shape
        for r in range(rows):
            for c in range(cols):
                n = e[r, c] * (e[r, c] + np.float32(2))
                e[r, c] = x[r, c] * (n / (n + np.float32(2)))

    # Winograd F(4x4, 3x3)'s transforms written out (models/winograd.transforms(): B^T's integer rows, A^T's powers of
    # two), so that each pass is one loop over the channels with straight-line arithmetic that LLVM vectorises.
    @jit
    def winograd_tiles(x, b, first, last, start, rows, v):  # tile rows first..last of image b, as v's columns
        _, H, W, C = x.shape
        tiles_per_row = (W + 3) // 4
        band = np.zeros((6, 4 * tiles_per_row + 2, C), np.float32)  # six input rows, zero-padded as the conv pads
        t = np.empty((36, C), np.float32)
        two, three, four, five = np.float32(2), np.float32(3), np.float32(4), np.float32(5)
        for i in range(first, last):
            for r in range(6):
                row = 4 * i + r - 1
                if row >= 0 and row < H:
                    band[r, 1 : W + 1] = x[b, row]
                else:
                    band[r] = 0
            for j in range(tiles_per_row):
                k = (b * rows + i - start) * tiles_per_row + j
                for r in range(6):  # t = d B: row r of the tile through B^T's rows
                    d = band[r, 4 * j : 4 * j + 6]
                    for c in range(C):
                        d0, d1, d2, d3, d4, d5 = d[0, c], d[1, c], d[2, c], d[3, c], d[4, c], d[5, c]
                        t[6 * r, c] = two * d0 + three * d1 - four * d2 - three * d3 + two * d4
                        t[6 * r + 1, c] = two * d1 + five * d2 + d3 - two * d4
                        t[6 * r + 2, c] = two * d1 + d2 - five * d3 + two * d4
                        t[6 * r + 3, c] = -d1 - two * d2 + d3 + two * d4
                        t[6 * r + 4, c] = -two * d1 + d2 + two * d3 - d4
                        t[6 * r + 5, c] = two * d1 + three * d2 - four * d3 - three * d4 + two * d5
                for q in range(6):  # v = B^T t, element (p, q) to row 6p + q
                    for c in range(C):
                        d0, d1, d2, d3 = t[q, c], t[6 + q, c], t[12 + q, c], t[18 + q, c]
                        d4, d5 = t[24 + q, c], t[30 + q, c]
                        v[q, k, c] = two * d0 + three * d1 - four * d2 - three * d3 + two * d4
                        v[6 + q, k, c] = two * d1 + five * d2 + d3 - two * d4
                        v[12 + q, k, c] = two * d1 + d2 - five * d3 + two * d4
                        v[18 + q, k, c] = -d1 - two * d2 + d3 + two * d4
                        v[24 + q, k, c] = -two * d1 + d2 + two * d3 - d4
                        v[30 + q, k, c] = two * d1 + three * d2 - four * d3 - three * d4 + two * d5

    @jit
    def winograd_untile(m, bias, b, first, last, start, rows, y):  # m's columns as winograd_tiles lays them out
        _, H, W, O = y.shape
        tiles_per_row = (W + 3) // 4
        t = np.empty((24, O), np.float32)
        two, four, eight = np.float32(2), np.float32(4), np.float32(8)
        half, quarter, eighth = np.float32(0.5), np.float32(0.25), np.float32(0.125)
        edge = np.empty((4, O), np.float32)
        for i in range(first, last):
            for j in range(tiles_per_row):
                k = (b * rows + i - start) * tiles_per_row + j
                for q in range(6):  # t = A^T m: column q of the tile through A^T's rows
                    for o in range(O):
                        m0, m1, m2, m3 = m[q, k, o], m[6 + q, k, o], m[12 + q, k, o], m[18 + q, k, o]
                        m4, m5 = m[24 + q, k, o], m[30 + q, k, o]
                        t[q, o] = m0 + m1 + m2 + m3 + m4
                        t[6 + q, o] = m1 - m2 + two * m3 - half * m4
                        t[12 + q, o] = m1 + m2 + four * m3 + quarter * m4
                        t[18 + q, o] = m1 - m2 + eight * m3 - eighth * m4 + m5
                cols = min(4, W - 4 * j)  # y = t A + bias, cropped to the image
                for a in range(min(4, H - 4 * i)):
                    out = y[b, 4 * i + a, 4 * j : 4 * j + 4] if cols == 4 else edge
                    for o in range(O):
                        m0, m1, m2, m3 = t[6 * a, o], t[6 * a + 1, o], t[6 * a + 2, o], t[6 * a + 3, o]
                        m4, m5 = t[6 * a + 4, o], t[6 * a + 5, o]
                        out[0, o] = m0 + m1 + m2 + m3 + m4 + bias[o]
                        out[1, o] = m1 - m2 + two * m3 - half * m4 + bias[o]
                        out[2, o] = m1 + m2 + four * m3 + quarter * m4 + bias[o]
                        out[3, o] = m1 - m2 + eight * m3 - eighth * m4 + m5 + bias[o]
                    if cols < 4:
                        y[b, 4 * i + a, 4 * j : 4 * j + cols] = edge[:cols]

    return types.SimpleNamespace(
        layer_norm=layer_norm,
        geglu=geglu,
        channel_moments=channel_moments,
        affine=affine,
        add_into=add_into,
        add_bias_into=add_bias_into,
        add_bias_gelu_into=add_bias_gelu_into,
        exp2_rows=exp2_rows,
        depthwise=depthwise,
        mish_from_exp=mish_from_exp,
        winograd_tiles=winograd_tiles,
        winograd_untile=winograd_untile,
    )


def exp2(x: np.ndarray) -> np.ndarray:
    """2^x in place for a C-contiguous float32 array, on the calling thread: the attention's softmax weights
    (attention.py), as numpy's exp2 but vectorised (numpy's float32 exp2 is scalar here: 3.8 against 1.3 ns per
    element on this AMD EPYC), within 0.7 ulp; inf from 128 up, 0 below -126.5 (where numpy's are subnormal), NaN
    kept."""
    _kernels().exp2_rows(x.reshape(-1, x.shape[-1]))
    return x


def mish(x: mx.array) -> mx.array:
    """x tanh(softplus(x)) (PLKSR's activation; MLX's CPU exp and log are scalar: 8x torch's time), float32: e^x by
    the exp2 kernel on min(x, 20) log2(e) (torch's softplus is x from 20 on), then x n / (n + 2) with n = e^x (e^x + 2),
    tanh(log(1 + e^x)) written out; per row block on the worker threads."""
    src = _rows(x)
    y, out = _fresh(x.shape)
    out = out.reshape(src.shape)
    k = _kernels()

    def run(span: tuple[int, int, int]) -> None:
        _, lo, hi = span
        block = out[lo:hi]
        np.minimum(src[lo:hi], np.float32(20), out=block)
        block *= np.float32(1.4426950408889634)
        k.exp2_rows(block)
        k.mish_from_exp(src[lo:hi], block)

    backend.cpu_map(run, _image_rows(1, src.shape[0], src.size))
    return y


def _rows(x: mx.array) -> np.ndarray:
    """x as an evaluated (rows, last axis) float32 numpy view."""
    x = x.reshape(-1, x.shape[-1])
    mx.eval(x)
    return np.asarray(x)


def _fresh(shape: tuple[int, ...]) -> tuple[mx.array, np.ndarray]:
    """A new float32 MLX array and a writable numpy view of its memory."""
    y = mx.zeros(shape, mx.float32)
    mx.eval(y)
    view = np.asarray(y)
    if not (view.flags.writeable and view.flags.c_contiguous and view.shape == tuple(shape)):
        raise RuntimeError("this MLX version does not expose a fresh array's memory; set MLX_SD_NUMBA=0")
    return y, view


def _over_rows(kernel, inputs: tuple[np.ndarray, ...], out: np.ndarray, *args) -> None:
    """kernel(*row block of each input, *args, row block of out) in one row block per worker thread."""
    spans = [(lo, hi) for _, lo, hi in _image_rows(1, out.shape[0], out.size)]
    backend.cpu_map(lambda s: kernel(*(x[s[0] : s[1]] for x in inputs), *args, out[s[0] : s[1]]), spans)


def _image_rows(images: int, rows: int, size: int, start: int = 0) -> list[tuple[int, int, int]]:
    """(image, first row, end row) tasks: each image's rows start..start + rows in one span per worker thread (one
    span where the work, `size` elements, is too small to split)."""
    parts = backend.cpu_threads() if size >= SPLIT_MIN_ELEMENTS else 1
    bounds = [start + rows * i // parts for i in range(parts + 1)]
    return [(n, lo, hi) for n in range(images) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """torch.nn.functional.layer_norm over the last axis of a float32 x, with an affine."""
    xn = _rows(x)
    y, out = _fresh(xn.shape)
    kernel = _kernels().layer_norm
    w, b = (np.asarray(p.astype(mx.float32)) for p in (weight, bias))
    _over_rows(lambda xs, e, o: kernel(xs, w, b, e, o), (xn,), out, np.float32(eps))
    return y.reshape(x.shape)


def geglu(h: mx.array, bias: mx.array | None = None) -> mx.array:
    """value * gelu(gate) (exact GELU to float32 rounding) for [value | gate] = h + bias on the last axis, float32.

    The projection's bias is added here rather than by its addmm: MLX's CPU addmm first copies the broadcast bias
    into its output with a general strided copy on one thread, ~1.3 ns per element (26 ms of a SD 64x64 level's
    82 ms GEGLU projection)."""
    hn = _rows(h)
    n = hn.shape[1] // 2
    b = _vector(bias, 2 * n)
    y, out = _fresh((hn.shape[0], n))
    kernel = _kernels().geglu
    _over_rows(lambda hs, o: kernel(hs, b, o), (hn,), out)
    return y.reshape(*h.shape[:-1], n)


def product(x: mx.array, weight: mx.array) -> mx.array:
    """x @ weight.T over x's rows, (rows, out): a Linear's product without its bias."""
    return x.reshape(-1, x.shape[-1]) @ weight.T


def linear(layer, x: mx.array, residual: mx.array | None = None, activation: str | None = None) -> mx.array:
    """layer(x) (+ residual) for a plain float32 nn.Linear: the product alone by MLX's BLAS, then bias and residual
    added in place by one kernel across the workers (the product's output is fresh), where MLX's addmm would copy
    the broadcast bias first (see geglu) and a residual take a pass of its own. `residual` may have another shape
    with as many elements (tokens against pixels); the result then has its shape. `activation` ("gelu" or
    "quick_gelu", without a residual) is applied by the bias's kernel, in the same pass."""
    y = product(x, layer.weight)
    mx.eval(y)
    yn = np.asarray(y)
    if not (yn.flags.writeable and yn.flags.c_contiguous):
        raise RuntimeError("this MLX version does not expose a product's memory; set MLX_SD_NUMBA=0")
    b = _vector(layer.bias if "bias" in layer else None, yn.shape[1])
    kernels = _kernels()
    if activation is not None:
        quick = {"gelu": False, "quick_gelu": True}[activation]
        _over_rows(lambda o: kernels.add_bias_gelu_into(o, b, quick), (), yn)
        return y.reshape(*x.shape[:-1], yn.shape[1])
    if residual is None:
        if "bias" in layer:
            _over_rows(lambda o: kernels.add_bias_into(o, b), (), yn)
        return y.reshape(*x.shape[:-1], yn.shape[1])
    rn = _rows(residual.reshape(-1, yn.shape[1]))
    _over_rows(lambda rs, o: kernels.add_into(o, b, rs), (rn,), yn)
    return y.reshape(residual.shape)


def _vector(v: mx.array | None, n: int) -> np.ndarray:
    return np.zeros(n, np.float32) if v is None else np.asarray(v.astype(mx.float32))


def group_norm(x: mx.array, groups: int, weight: mx.array, bias: mx.array, eps: float, silu: bool) -> mx.array:
    """torch.nn.GroupNorm over a channels-last float32 x (B, ..., C), optionally followed by SiLU.

    One read of x for the statistics: blocks of rows that fit in L2 are read twice from there (their mean, then their
    squared deviations) and merged in float64 (Chan et al. 1979), per channel, then per group; as exact as two passes
    over the whole of x, at the memory traffic of one. Then one pass writes x * scale + shift per channel (statistics
    and affine folded, as torch's CPU kernel does), with the SiLU fused in. Both passes split rows across workers.
    """
    shape, B, C = x.shape, x.shape[0], x.shape[-1]
    xn = _rows(x).reshape(B, -1, C)
    P, per_group = xn.shape[1], C // groups
    kernels = _kernels()
    tasks = _image_rows(B, P, xn[0].size)
    means, m2s = np.zeros((len(tasks), C)), np.zeros((len(tasks), C))
    block_rows = max(1, GROUP_NORM_BLOCK_BYTES // (4 * C))

    def moments(i: int) -> None:
        b, lo, hi = tasks[i]
        kernels.channel_moments(xn[b, lo:hi], block_rows, means[i], m2s[i])

    backend.cpu_map(moments, list(range(len(tasks))))
    # Merge the tasks' and then the group's channels' moments (equal counts within a task and within a group).
    counts = np.array([hi - lo for _, lo, hi in tasks], np.float64)[:, None]
    mean, var = np.empty((B, groups)), np.empty((B, groups))
    for b in range(B):
        mine = [i for i, t in enumerate(tasks) if t[0] == b]
        n = counts[mine]
        channel_mean = (means[mine] * n).sum(axis=0) / n.sum()  # (C,)
        channel_m2 = (m2s[mine] + n * (means[mine] - channel_mean) ** 2).sum(axis=0)
        grouped_mean = channel_mean.reshape(groups, per_group)
        mean[b] = grouped_mean.mean(axis=1)
        spread = P * ((grouped_mean - mean[b][:, None]) ** 2).sum(axis=1)
        var[b] = (channel_m2.reshape(groups, per_group).sum(axis=1) + spread) / (P * per_group)
    mean_c, rstd_c = (np.repeat(v, per_group, axis=-1) for v in (mean, 1 / np.sqrt(var + eps)))  # (B, C)
    gamma, beta = (np.asarray(p.astype(mx.float32)).astype(np.float64) for p in (weight, bias))
    scale = (rstd_c * gamma).astype(np.float32)
    shift = (beta - mean_c * rstd_c * gamma).astype(np.float32)
    y, out = _fresh(xn.shape)

    def normalise(task: tuple[int, int, int]) -> None:
        b, lo, hi = task
        kernels.affine(xn[b, lo:hi], scale[b], shift[b], silu, out[b, lo:hi])

    backend.cpu_map(normalise, tasks)
    return y.reshape(shape)


def kernel_call(kernel, *head, tail):
    """fn(task) = kernel(*head, *task, tail), for backend.cpu_map."""
    return lambda task: kernel(*head, *task, tail)


def winograd_conv(x: mx.array, u: mx.array, bias: mx.array | None, strip_rows: int) -> mx.array:
    """The F(4x4, 3x3) convolution of a float32 (B, H, W, C) x by transformed filters u (36, O, C) (models/winograd.py),
    with its input and output transforms here: each tile read from x in place (its zero padding implied, no padded
    copy), transformed as B^T d B in two passes of written-out arithmetic over the channels, and the products' tiles
    turned back into pixels (A^T m A) plus the bias, written straight into the (B, H, W, O) output. As 36 x 36 and
    16 x 36 BLAS products after a strided gather, these cost more than the 36 channel products themselves when O is
    small (ESRGAN's 32-channel dense convs: 18 of 30 ms at 192x192). Strips of `strip_rows` tile rows bound the
    transform-domain buffers."""
    xn = _rows(x).reshape(x.shape)
    B, H, W, C = x.shape
    O = u.shape[1]
    kernels = _kernels()
    y, out = _fresh((B, H, W, O))
    b = _vector(bias, O)
    ut = u.swapaxes(1, 2)  # (36, C, O)
    tile_rows, tiles_per_row = -(-H // 4), -(-W // 4)
    for start in range(0, tile_rows, strip_rows):
        rows = min(strip_rows, tile_rows - start)
        tasks = [(*task, start, rows) for task in _image_rows(B, rows, x.size, start)]
        v, vn = _fresh((36, B * rows * tiles_per_row, C))
        backend.cpu_map(kernel_call(kernels.winograd_tiles, xn, tail=vn), tasks)
        m = v @ ut
        mx.eval(m)
        backend.cpu_map(kernel_call(kernels.winograd_untile, np.asarray(m), b, tail=out), tasks)
    return y


def depthwise(x: mx.array, weight: mx.array, bias: mx.array | None, dilation: int = 1) -> mx.array:
    """A depthwise stride-1 convolution with an odd KH x KW kernel, `dilation`, and the zero padding that keeps the
    size (dilation x (K // 2) per side) of a float32 (B, H, W, C) x by a (C, KH, KW, 1) weight: one pass over x, each
    pixel's taps accumulated across the channels, rows split across the workers. MLX's grouped conv on CPU took 15x
    torch's time (DAT's 180-channel 3x3s at 96x96: 100 ms against 6.6; MoSR's 7x7s; SeemoRe's 1 x 11 stripes, DITN's
    dilated 7x7s)."""
    xn = _rows(x).reshape(x.shape)
    B, H, W, C = x.shape
    KH, KW = weight.shape[1:3]
    taps = np.ascontiguousarray(np.asarray(weight.astype(mx.float32)).reshape(C, KH, KW).transpose(1, 2, 0))
    y, out = _fresh((B, H, W, C))
    tasks = _image_rows(B, H, x.size * KH * KW // 9)
    backend.cpu_map(kernel_call(_kernels().depthwise, xn, taps, _vector(bias, C), dilation, tail=out), tasks)
    return y
