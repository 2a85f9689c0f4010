"""Scaled dot-product attention for every model, token-major in and out.

The kernel is chosen here, once, per backend (see `backend.py`): MLX's fused attention serves Metal and CUDA and
is the reference formulation on CPU. Models call `attention()` and never reshape heads themselves.
"""

from __future__ import annotations

import mlx.core as mx


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, mask: mx.array | str | None = None) -> mx.array:
    """softmax(q k^T / sqrt(d)) v over `heads` heads of width d = C / heads.

    Args:
        q: (B, N, C) queries.
        k, v: (B, M, C) keys and values.
        heads: number of heads.
        mask: None, "causal", or an additive/boolean array broadcastable to (B, heads, N, M).
    Returns:
        (B, N, C).
    """
    B, N, C = q.shape
    M = k.shape[1]
    d = C // heads
    q = q.reshape(B, N, heads, d).transpose(0, 2, 1, 3)  # (B, h, N, d)
    k = k.reshape(B, M, heads, d).transpose(0, 2, 1, 3)  # (B, h, M, d)
    v = v.reshape(B, M, heads, d).transpose(0, 2, 1, 3)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5, mask=mask)
    return out.transpose(0, 2, 1, 3).reshape(B, N, C)
