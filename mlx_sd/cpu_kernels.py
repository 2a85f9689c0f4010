"""Row-wise CPU kernels compiled by numba: LayerNorm and the GEGLU gate, where MLX runs on a Linux CPU.

MLX computes each CPU elementwise operation on one thread, as a pass of its own: its LayerNorm is seven passes over
the activation (two reductions, five broadcasts), ~3.5 ns per element on one core, and the GEGLU gate three compiled
kernels; torch's fused, vectorised kernels take 0.2-0.5 ns. Here each row is one pass of one loop nest (the row,
at most 10 KB, stays in L1 between its mean, its variance and its output), vectorised by LLVM, and row blocks run on
the CPU worker threads (`backend.cpu_map`; numba releases the GIL). `backend.row_kernels()` decides where they run.

MLX cannot adopt a numpy buffer on CPU (`mx.from_dlpack(copy=False)` refuses), so each output is an MLX array made
by `mx.zeros` (one fill pass, on one thread) which the kernel then writes through its numpy view: the output is fresh
and referenced nowhere else, as the in-place SiLU in models/layers.py relies on too.

Kernels are compiled on first use (~0.5 s each) and cached on disk next to this file (or in numba's user-wide cache
where that is read-only); `fastmath` allows reassociation (vectorised sums), but not the "no NaN / no inf"
assumptions, so non-finite inputs propagate as in torch.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from . import backend

# erf(x) = x P(x^2) / Q(x^2) on |x| <= 4 (models/layers.py has the fit); float32 constants, so that nothing promotes.
_ERF_CLAMP = np.float32(4.0)
_ERF_P = np.array((1.1283792, 0.18552221, 0.054201037, 0.003841643, 0.00037293759, 4.5019879e-06, -1.2291238e-08),
                  np.float32)  # fmt: skip
_ERF_Q = np.array((1.0, 0.49774817, 0.11395016, 0.015423552, 0.0012968917, 6.1367333e-05), np.float32)
_SQRT_HALF = np.float32(0.7071067811865476)
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
# Below this many elements a kernel runs on the calling thread: a hand-off to the workers costs ~50 us.
SPLIT_MIN_ELEMENTS = 2**16


@functools.cache
def _kernels():
    import numba

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
    def geglu(h, out):  # h (R, 2n) = [value | gate] -> value * gelu(gate), (R, n)
        rows, n = out.shape
        p, q = _ERF_P, _ERF_Q
        for r in range(rows):
            for c in range(n):
                g = h[r, n + c]
                y = min(max(g * _SQRT_HALF, -_ERF_CLAMP), _ERF_CLAMP)
                t = y * y
                t2 = t * t
                t4 = t2 * t2  # Estrin's scheme, as models/layers.py: short dependency chains
                num = (p[0] + p[1] * t) + (p[2] + p[3] * t) * t2 + ((p[4] + p[5] * t) + p[6] * t2) * t4
                den = (q[0] + q[1] * t) + (q[2] + q[3] * t) * t2 + (q[4] + q[5] * t) * t4
                out[r, c] = h[r, c] * (g * (np.float32(0.5) + np.float32(0.5) * (y * num / den)))

    return layer_norm, geglu


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
    rows = out.shape[0]
    blocks = backend.cpu_threads() if out.size >= SPLIT_MIN_ELEMENTS else 1
    bounds = [rows * i // blocks for i in range(blocks + 1)]
    spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    backend.cpu_map(lambda s: kernel(*(x[s[0] : s[1]] for x in inputs), *args, out[s[0] : s[1]]), spans)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """torch.nn.functional.layer_norm over the last axis of a float32 x, with an affine."""
    xn = _rows(x)
    y, out = _fresh(xn.shape)
    kernel = _kernels()[0]
    w, b = (np.asarray(p.astype(mx.float32)) for p in (weight, bias))
    _over_rows(lambda xs, e, o: kernel(xs, w, b, e, o), (xn,), out, np.float32(eps))
    return y.reshape(x.shape)


def geglu(h: mx.array) -> mx.array:
    """value * gelu(gate) (exact GELU to float32 rounding) for h = [value | gate] on the last axis, float32."""
    hn = _rows(h)
    n = hn.shape[1] // 2
    y, out = _fresh((hn.shape[0], n))
    _over_rows(_kernels()[1], (hn,), out)
    return y.reshape(*h.shape[:-1], n)
