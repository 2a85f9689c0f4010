"""The T5 encoder: Stable Diffusion 3's third text encoder (google/t5-v1_1-xxl's encoder stack).

Reference: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer";
T5 v1.1 (gated-GELU feed-forward, no tied output head) as in transformers' T5EncoderModel, whose parameter paths
these are (`encoder.block.3.layer.0.SelfAttention.q`), so a transformers state dict loads by key.

Two things set T5 apart from the CLIP towers:
- Attention logits are q k^T with no 1/sqrt(d) factor (Mesh TensorFlow folds it into the initialisation of q), plus a
  learned bias per head and relative-position bucket. Only block 0 holds the bias table; every block reuses it.
- The norms are RMS norms without a bias, computed in float32.

Float16: T5 v1.1's feed-forward output overflows half precision (transformers keeps `wo` in float32,
`_keep_in_fp32_modules`, and clamps the hidden states). Here the residual stream is float32 whatever the weights'
dtype, and the feed-forward's gating product and `wo` run in float32: nothing half-precision ever holds a sum that
can grow with depth, so there is nothing to clamp. Everything else (norm outputs, attention, `wi`) runs in the
weights' dtype, as transformers does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..attention import attention
from .layers import tanh

FEED_FORWARD_PROJS = ("gated-gelu", "relu")  # T5 v1.1 (SD3) and the original T5


@dataclass(frozen=True)
class T5Config:
    """Defaults: SD3's T5-v1.1-XXL encoder. Field names follow transformers' T5Config."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64  # per-head width; heads x d_kv need not equal d_model
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # "gated-gelu": wo(gelu_new(wi_0 x) * wi_1 x), gelu_new the tanh approximation; "relu": wo(relu(wi x)).
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD_PROJS:
            raise ValueError(f"T5 feed_forward_proj {self.feed_forward_proj!r}: mlx-sd knows {FEED_FORWARD_PROJS}")


@lru_cache(maxsize=8)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bucket of key position j seen from query position i, bidirectional (the encoder's).

    transformers' `T5Attention._relative_position_bucket`: half the buckets for keys after the query; in each half,
    exact buckets for distances below num_buckets / 4, then logarithmic bins up to max_distance, the last bucket for
    anything farther. The logarithm runs in float32 as there: at distances where the bin edge is exact in real numbers
    (16, 32, 64 for SD3's 32 buckets over 128) float32 rounding decides the bucket, and transformers' decision is the
    one the weights were converted against.
    """
    position = np.arange(length)
    relative = position[None, :] - position[:, None]  # memory - query
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):  # log(0) at distance 0, which takes the exact branch
        log_ratio = np.log(distance.astype(np.float32) / np.float32(max_exact))
    scaled = log_ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact)
    large = max_exact + np.where(distance < max_exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


def gelu_new(x: mx.array) -> mx.array:
    """GELU's tanh approximation (transformers' "gelu_new", Hendrycks & Gimpel 2016); MLX's `gelu_approx` is another
    formula."""
    return 0.5 * x * (1 + tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


class T5LayerNorm(nn.Module):
    """weight * x / rms(x), no mean subtraction, no bias; statistics in float32, output in the weight's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        normed = mx.fast.rms_norm(x.astype(mx.float32), None, self.eps)
        return normed.astype(self.weight.dtype) * self.weight  # cast first, then scale: as transformers does


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.heads = cfg.num_heads
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        q, k, v = self.q(x), self.k(x), self.v(x)  # (B, L, heads * d_kv)
        # scale=1: T5's logits are unscaled (see the module docstring); the bias is (1, heads, L, L).
        return self.o(attention(q, k, v, self.heads, position_bias.astype(q.dtype), scale=1.0))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return x + self.SelfAttention(self.layer_norm(x), position_bias).astype(mx.float32)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        # The product and `wo` in float32 (a float32 input promotes a half-precision weight): T5 v1.1's wo output
        # exceeds float16's range (transformers issue 20287).
        h = gelu_new(self.wi_0(x).astype(mx.float32)) * self.wi_1(x).astype(mx.float32)  # (B, L, d_ff)
        return self.wo(h)


class T5DenseActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(nn.relu(self.wi(x)).astype(mx.float32))  # wo in float32, as in the gated form


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        gated = cfg.feed_forward_proj == "gated-gelu"
        self.DenseReluDense = T5DenseGatedActDense(cfg) if gated else T5DenseActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.DenseReluDense(self.layer_norm(x)).astype(mx.float32)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = [T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)]

    def __call__(self, x: mx.array, position_bias: mx.array) -> mx.array:
        return self.layer[1](self.layer[0](x, position_bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = [T5Block(cfg, has_relative_attention_bias=i == 0) for i in range(cfg.num_layers)]
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def position_bias(self, length: int) -> mx.array:
        """(1, heads, length, length): block 0's learned bias per relative-position bucket, shared by all blocks."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # (buckets, heads)
        return table[mx.array(buckets)].transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array) -> mx.array:
        """Encode token ids; every position attends to every other, padding included (SD3 passes no mask).

        Args:
            input_ids: (B, L) int token ids.
        Returns:
            last_hidden_state: (B, L, d_model), in the weights' dtype.
        """
        x = self.shared(input_ids).astype(mx.float32)  # (B, L, D), the float32 residual stream
        bias = self.position_bias(input_ids.shape[1])
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
