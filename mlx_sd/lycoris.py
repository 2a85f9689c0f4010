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

Scale (A1111's calc_scale): the layer's `.scale` tensor when the file has one; else alpha / dim, where dim is w1b's row
count for LoHa; for LoKr w2b's, else w1b's; 1 when the file has no alpha or (LoKr with two full matrices, full) no
low-rank factor.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation") rescales the adapted weight to stored
magnitudes. Three rules exist in the files people download, told apart by the magnitudes' shape and key (`DoRA`):

    per input channel   LyCORIS's dora_scale (1, in), its default before wd_on_out; beside any kind, as A1111 applies
                        it (network.py apply_weight_decompose): the scaled update merged into the current weight, each
                        input column renormalised, the difference scaled by the multiplier:
                            W' = W + multiplier * (dora_scale * (W + scale * dW) / ||W + scale * dW||_col - W)
    per output channel  LyCORIS's dora_scale (out, 1) (wd_on_out=True, the default of recent LyCORIS LoCon/LoRA
                        training), as ComfyUI applies it (comfy/weight_adapter/base.py weight_decompose; A1111 divides
                        these by the input columns' norms, a bug there). ComfyUI divides each output row by the row's
                        norm in the weight *before* the update (plus float32's eps) and scales the difference by the
                        strength, as A1111 does:
                            W' = W + strength * (dora_scale * (W + scale * dW) / (||W||_row + eps) - W)
                        (LyCORIS trains with ||W + scale * dW||_row; ComfyUI's own pull request #15458 would change
                        this, and mlx-sd follows ComfyUI as released.)
    PEFT                lora_magnitude_vector (out,) of a diffusers/PEFT DoRA adapter (use_dora), as PEFT's DoRA layer
                        computes it (peft/tuners/lora/dora.py): the strength (diffusers' set_adapters weight) scales
                        PEFT's scaling, so it acts inside the norm, which is of the layer's own weight W0:
                            W' = magnitude * (W + strength * scale * dW) / ||W0 + strength * scale * dW||_row

(||.||_col: the norm over every axis but the input channel's; ||.||_row: over every axis but the output channel's.)
A1111's and ComfyUI's change is the multiplier times a fixed difference (DoRA's weight minus W), not times
scale * dW; PEFT's is not linear in the strength at all. Each rule sees the weight W as the networks before it left it
(`mlx_sd.lora` applies a layer's networks in order, as A1111, ComfyUI and PEFT do).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


class NetworkLayer:
    """What every kind of network layer offers `mlx_sd.lora`: the adapted weight's `shape` (MLX layout), `delta()`
    (scale * dW in float32, that layout), an optional `dora` (`DoRA`) and bias update `bias` (out,)."""

    shape: tuple[int, ...]
    dora: DoRA | None = None
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
    dora: DoRA | None = None

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
    dora: DoRA | None = None

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
    `bias` (out,) (diff_b); A1111 scales the diff by 1 (dim is None), or by the file's `.scale`, the bias never."""

    shape: tuple[int, ...]
    diff: mx.array
    bias: mx.array | None = None
    scale: float = 1.0
    dora: DoRA | None = None

    def delta(self) -> mx.array:
        return self.scale * to_mlx_layout(self.diff.astype(mx.float32), self.shape)


DORA_RULES = ("a1111", "comfyui", "peft")
# ComfyUI adds torch.finfo(weight.dtype).eps to the row norms; it patches weights in float32.
COMFYUI_EPS = float(mx.finfo(mx.float32).eps)


@dataclass(frozen=True, eq=False)
class DoRA:
    """DoRA's magnitudes and the rule that applies them (see the module docstring).

    magnitude: (in,) for "a1111" (LyCORIS's dora_scale per input channel), (out,) for "comfyui" (dora_scale per
        output channel, wd_on_out) and "peft" (lora_magnitude_vector).
    rule: one of `DORA_RULES`, named after the program whose formula it follows.
    """

    magnitude: mx.array
    rule: str

    def __post_init__(self):
        if self.rule not in DORA_RULES:
            raise ValueError(f"DoRA rule {self.rule!r} is not one of {DORA_RULES}")

    def change(self, weight: mx.array, current: mx.array, update: mx.array, multiplier: float) -> mx.array:
        """What the layer's DoRA network adds to `current`. All float32 in MLX layout (input channels last):
        weight: the layer's own weight W0; current: W0 plus the networks before this one; update: scale * dW."""
        magnitude = self.magnitude.astype(mx.float32)
        if self.rule == "a1111":  # A1111 apply_weight_decompose: per input column of the merged weight, no epsilon
            merged = current + update
            return multiplier * (merged * (magnitude / _norm(merged, keep=-1)) - current)
        rows = magnitude.reshape(-1, *[1] * (current.ndim - 1))  # (out, 1[, 1, 1])
        if self.rule == "comfyui":  # ComfyUI weight_decompose, wd_on_output_axis: rows of the weight before
            merged = current + update
            return multiplier * (merged * (rows / (_norm(current, keep=0) + COMFYUI_EPS)) - current)
        # PEFT DoraLinearLayer / _DoraConvNdLayer: scaling (strength inside) in the rows' norm of the base weight
        merged = current + multiplier * update
        return merged * (rows / _norm(weight + multiplier * update, keep=0)) - current


def _norm(weight: mx.array, keep: int) -> mx.array:
    """The L2 norm over every axis but `keep`, kept as size-1 axes for broadcasting."""
    axes = tuple(a for a in range(weight.ndim) if a != keep % weight.ndim)
    return mx.sqrt(mx.sum(mx.square(weight), axis=axes, keepdims=True))
