"""LyCORIS networks (LoHa, LoKr, full) and DoRA's weight decomposition, as AUTOMATIC1111's built-in Lora extension
applies them (extensions-builtin/Lora: network_hada.py, network_lokr.py, network_full.py, lyco_helpers.py, and
network.py's `finalize_updown` / `apply_weight_decompose`).

A LoRA's update is a product of two thin matrices, which can also run unfused. These networks only exist as a dense
update dW of the whole weight, so `delta()` materialises it: in float32, computed in torch's (out, in[, kh, kw])
layout as the file stores the factors, then transposed once to the layer's MLX layout, (out, in) or (out, kh, kw, in):

    LoHa (Hyeon-Woo et al. 2022, "FedPara")   dW = (w1a @ w1b) * (w2a @ w2b)   (Hadamard product of two low-rank
                                              products); with Tucker cores t1/t2 (3x3 convolutions) each product is
                                              einsum("ijkl,ip,jr->prkl", t, wa, wb), wa (r, out), wb (r, in)
    LoKr (Yeh et al. 2023, "LyCORIS")         dW = kron(w1, w2), each factor a full matrix, a product a @ b, or (w2)
                                              a Tucker rebuild of t2, w2a, w2b; w1 is (out_a, in_a), w2 (out_b, in_b
                                              [, kh, kw]) with out = out_a * out_b, in = in_a * in_b
    full ("diff")                             dW = diff, and the bias gains diff_b

Scale (A1111's calc_scale): alpha / dim, where dim is w1b's row count for LoHa; for LoKr w2b's, else w1b's; 1 when the
file has no alpha or (LoKr with two full matrices, full) no low-rank factor.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), a `dora_scale` beside any kind: A1111 merges
the scaled update into the current weight, renormalises each input column to the stored magnitude and takes the
difference, which the multiplier then scales:

    W' = W + multiplier * (dora_scale * (W + scale * dW) / ||W + scale * dW||_col - W)

(||.||_col: the norm over every axis but the input channel's). It is not linear in the multiplier, and the W it sees
includes the networks applied before it (`mlx_sd.lora` applies them in order, as A1111 does).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


class NetworkLayer:
    """What every kind of network layer offers `mlx_sd.lora`: the adapted weight's `shape` (MLX layout), `delta()`
    (scale * dW in float32, that layout), an optional DoRA magnitude `dora_scale` (in,) and bias update `bias`
    (out,)."""

    shape: tuple[int, ...]
    dora_scale: mx.array | None = None
    bias: mx.array | None = None

    @property
    def low_rank(self) -> bool:
        """True when the update can run unfused as two thin matmuls (a LoRA without DoRA)."""
        return False

    def delta(self) -> mx.array:
        raise NotImplementedError


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An MLX weight shape in torch's layout: (out, kh, kw, in) -> (out, in, kh, kw); a Linear's is the same."""
    return (shape[0], shape[-1], *shape[1:-1]) if len(shape) == 4 else tuple(shape)


def to_mlx_layout(update: mx.array, shape: tuple[int, ...]) -> mx.array:
    """A torch-layout update with as many elements as the weight (A1111 reshapes to the weight's shape: a 1x1 conv's
    update fits a Linear, a flattened (out, in * kh * kw) one a convolution) -> the MLX weight `shape`."""
    update = update.reshape(torch_shape(shape))
    return update.transpose(0, 2, 3, 1) if len(shape) == 4 else update


def rebuild_tucker(t: mx.array, wa: mx.array, wb: mx.array) -> mx.array:
    """Tucker/CP rebuild (lyco_helpers.make_weight_cp): core t (r1, r2, kh, kw), wa (r1, out), wb (r2, in) ->
    (out, in, kh, kw)."""
    return mx.einsum("ijkl,ip,jr->prkl", t, wa, wb)


def _product(a: mx.array, b: mx.array) -> mx.array:
    """a @ b with both flattened to matrices (lyco_helpers.rebuild_conventional): (out, r) @ (r, in * ...)."""
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)


def _f32(*arrays):
    return [None if a is None else a.astype(mx.float32) for a in arrays]


@dataclass(frozen=True, eq=False)
class LoHaLayer(NetworkLayer):
    """LyCORIS LoHa, tensors as the file stores them: without Tucker w1a (out, r), w1b (r, in * kh * kw) (and the
    same for w2a, w2b); with Tucker cores t1, t2 (r, r, kh, kw), w1a (r, out), w1b (r, in)."""

    shape: tuple[int, ...]
    w1a: mx.array
    w1b: mx.array
    w2a: mx.array
    w2b: mx.array
    t1: mx.array | None = None
    t2: mx.array | None = None
    scale: float = 1.0
    dora_scale: mx.array | None = None

    def delta(self) -> mx.array:
        w1a, w1b, w2a, w2b, t1, t2 = _f32(self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2)
        out_in = torch_shape(self.shape)
        one = (_product(w1a, w1b) if t1 is None else rebuild_tucker(t1, w1a, w1b)).reshape(out_in)
        two = (_product(w2a, w2b) if t2 is None else rebuild_tucker(t2, w2a, w2b)).reshape(out_in)
        return self.scale * to_mlx_layout(one * two, self.shape)


@dataclass(frozen=True, eq=False)
class LoKrLayer(NetworkLayer):
    """LyCORIS LoKr, tensors as the file stores them: w1 (out_a, in_a) or its factors w1a (out_a, r), w1b (r, in_a);
    w2 (out_b, in_b[, kh, kw]), or w2a (out_b, r), w2b (r, in_b * kh * kw), or with Tucker t2 (r, r, kh, kw),
    w2a (r, out_b), w2b (r, in_b)."""

    shape: tuple[int, ...]
    w1: mx.array | None = None
    w1a: mx.array | None = None
    w1b: mx.array | None = None
    w2: mx.array | None = None
    w2a: mx.array | None = None
    w2b: mx.array | None = None
    t2: mx.array | None = None
    scale: float = 1.0
    dora_scale: mx.array | None = None

    def delta(self) -> mx.array:
        w1, w1a, w1b, w2, w2a, w2b, t2 = _f32(self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2)
        if w1 is None:
            w1 = w1a @ w1b
        if w2 is None:
            w2 = _product(w2a, w2b) if t2 is None else rebuild_tucker(t2, w2a, w2b)
        if w2.ndim == 4:  # (out_b, in_b, kh, kw): w1 acts as a 1x1 kernel (network_lokr.make_kron)
            w1 = w1[:, :, None, None]
        return self.scale * to_mlx_layout(mx.kron(w1, w2), self.shape)


@dataclass(frozen=True, eq=False)
class FullLayer(NetworkLayer):
    """LyCORIS full network: the weight's difference `diff` as the file stores it (torch layout), and the bias's,
    `bias` (out,) (diff_b); A1111 scales neither (dim is None, so scale 1)."""

    shape: tuple[int, ...]
    diff: mx.array
    bias: mx.array | None = None
    dora_scale: mx.array | None = None

    def delta(self) -> mx.array:
        return to_mlx_layout(self.diff.astype(mx.float32), self.shape)


def weight_decompose(weight: mx.array, update: mx.array, dora_scale: mx.array) -> mx.array:
    """DoRA as A1111 applies it (network.py apply_weight_decompose): the update that takes `weight` to
    `dora_scale * merged / ||merged||_col`, merged = weight + update. All float32, MLX layout, input channels last;
    dora_scale (in,). No epsilon, as A1111."""
    merged = weight + update
    norm = mx.sqrt(mx.sum(mx.square(merged), axis=tuple(range(merged.ndim - 1))))  # (in,)
    return merged * (dora_scale.astype(mx.float32) / norm) - weight
