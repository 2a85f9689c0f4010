"""3x3 convolutions as Winograd F(4x4, 3x3) products, for the CPU.

A 3x3 convolution computes every 4x4 block of output pixels from the 6x6 input tile around it. Winograd's minimal
filtering algorithm (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) maps each tile and each
filter into a 6x6 "transform domain" where the convolution becomes an elementwise product: per tile, 36 products
over the channels instead of 16 x 9 = 144, a quarter of the arithmetic. Across a whole layer those 36 products are
36 matrix products (tiles x C) @ (C x O), which BLAS runs at full speed; the three transforms are small fixed
matrices applied by BLAS as well (kron(B^T, B^T) @ tiles, and the same for the output), with one strided gather and
one strided write around them.

The price is rounding. The transforms are built from interpolation points; the textbook ones (0, +-1, +-2) give ~11x
the RMS rounding error of a direct float32 convolution, the points (0, 1, -1, 2, -1/2) used here ~7x (RMS 2.4e-6
against 3.7e-6 and 3.3e-7 relative, 320 channels; the largest error is a third of the textbook points'; Barabasz et
al., "Error analysis and improving the accuracy of Winograd convolution for DNNs", 2020, on choosing points). The
input transform's rows are scaled to small integers and its output transform's entries are powers of two, so only
the filter transform (made once per call, in float32) rounds its coefficients. Only float32 takes this path
(`backend.conv3x3_kernel`): in float16 the error would be visible.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cache

import mlx.core as mx

from .. import backend, cpu_kernels

TILE = 4  # output pixels per tile side: F(4x4, 3x3), 6x6 input tiles
POINTS = (0, 1, -1, 2, Fraction(-1, 2))  # plus the point at infinity
# The transform-domain input (36 x tiles x C floats) of one strip of tile rows stays under this many bytes.
BLOCK_BYTES = 64 * 2**20  # 16-512 MB measured level in speed


def _vandermonde(points, cols: int) -> list[list[Fraction]]:
    """Evaluations of a polynomial with `cols` coefficients at the points and at infinity (its leading one)."""
    table = [[Fraction(p) ** k for k in range(cols)] for p in points]
    return table + [[Fraction(int(k == cols - 1)) for k in range(cols)]]


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse of a small nonsingular matrix."""
    n = len(matrix)
    rows = [list(row) + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [v / rows[col][col] for v in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                rows[r] = [a - rows[r][col] * b for a, b in zip(rows[r], rows[col], strict=True)]
    return [row[n:] for row in rows]


def transforms(m: int = TILE, points=POINTS) -> tuple[list, list, list]:
    """B^T (a x a), G (a x 3), A^T (m x a) of F(m x m, 3x3), a = m + 2, as exact fractions.

    The correlation y = A^T [(G g) * (B^T d)] is the transpose of Toom-Cook polynomial multiplication: A = V_m and
    G = V_3 evaluate at the points, B = V_a^-1 interpolates. Each row of B^T is scaled to coprime integers and G's row
    divided by the same factor, so the input transform is exact in float32.
    """
    a = m + 2
    bt = [list(col) for col in zip(*_inverse(_vandermonde(points, a)), strict=True)]
    g = _vandermonde(points, 3)
    for i, row in enumerate(bt):
        scale = Fraction(math.lcm(*(v.denominator for v in row)), math.gcd(*(v.numerator for v in row)))
        bt[i] = [v * scale for v in row]
        g[i] = [v / scale for v in g[i]]
    at = [list(col) for col in zip(*_vandermonde(points, m), strict=True)]
    return bt, g, at


def _kron(x: list[list[Fraction]], y: list[list[Fraction]]) -> list[list[float]]:
    return [[float(p * q) for p in row_x for q in row_y] for row_x in x for row_y in y]


@cache
def _matrices(dtype: mx.Dtype) -> tuple[mx.array, mx.array, mx.array]:
    """kron(B^T, B^T) (36 x 36), kron(G, G) (36 x 9) and kron(A^T, A^T) (16 x 36): the 2-D transforms, tile-major."""
    bt, g, at = transforms()
    return tuple(mx.array(_kron(t, t), dtype=dtype) for t in (bt, g, at))


def conv3x3_winograd(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """3x3, stride-1, padding-1 convolution of (B, H, W, C) by an (O, 3, 3, C) weight, as F(4x4, 3x3).

    Large inputs run in strips of tile rows, each evaluated before the next, so that the transform-domain buffers
    (2.25x the input and the output) stay within BLOCK_BYTES.
    """
    B, H, W, C = x.shape
    O = weight.shape[0]
    m, a = TILE, TILE + 2
    ty, tx = -(-H // m), -(-W // m)  # tiles per column and row; a ragged edge is padded and cropped
    xp = mx.pad(x, [(0, 0), (1, ty * m - H + 1), (1, tx * m - W + 1), (0, 0)])
    _, filter_t, _ = _matrices(x.dtype)
    taps = weight.astype(x.dtype).transpose(1, 2, 0, 3).reshape(9, O * C)  # tap-major
    u = (filter_t @ taps).reshape(a * a, O, C)  # (36, O, C); the products read it transposed
    bias = None if bias is None else bias.astype(x.dtype)
    rows = max(1, BLOCK_BYTES // (a * a * B * tx * max(C, O) * x.dtype.size))  # tile rows per strip
    if backend.row_kernels(x.dtype) == "numba":
        return cpu_kernels.winograd_conv(x, u, bias, rows)
    if rows >= ty:
        y = _strip(xp, u, bias)
    else:
        strips = []
        for t in range(0, ty, rows):
            strips.append(_strip(xp[:, t * m : (t + rows) * m + 2], u, bias))
            mx.eval(strips[-1])
        y = mx.concatenate(strips, axis=1)
    return y if (ty * m, tx * m) == (H, W) else y[:, :H, :W]


def _strip(xp: mx.array, u: mx.array, bias: mx.array | None) -> mx.array:
    """The convolution of a padded (B, 4 ty + 2, 4 tx + 2, C) input by transformed filters u: (B, 4 ty, 4 tx, O)."""
    B, hp, wp, C = xp.shape
    m, a = TILE, TILE + 2
    ty, tx, O = (hp - 2) // m, (wp - 2) // m, u.shape[1]
    input_t, _, output_t = _matrices(xp.dtype)
    # (a, a, B, ty, tx, C): element (i, j) of every tile, gathered into one row of the input transform's operand
    # (as_strided reads a strip of a batch > 1, not contiguous, through a contiguous copy).
    tiles = mx.as_strided(xp, (a, a, B, ty, tx, C), (wp * C, C, hp * wp * C, m * wp * C, m * C, 1))
    v = (input_t @ mx.contiguous(tiles).reshape(a * a, -1)).reshape(a * a, -1, C)  # (36, tiles, C)
    products = (v @ u.swapaxes(1, 2)).reshape(a * a, -1)  # (36, tiles * O)
    y = (output_t @ products).reshape(m, m, B, ty, tx, O).transpose(2, 3, 0, 4, 1, 5)  # (B, ty, m, tx, m, O)
    y = y + bias if bias is not None else mx.contiguous(y)  # the add writes the pixel-major copy
    return y.reshape(B, ty * m, tx * m, O)
