"""The tensors of one adapted layer -> its `mlx_sd` update (LoRA with DoRA or a Tucker mid, LoHa, LoKr, full), checked
against the layer's weight shape.

A layer's tensors are named by role, the file's suffix after the module name (kohya/LyCORIS key layout,
`lora_unet_<module>.<role>`): LoRA's down/up/mid (`lora_down.weight`, `lora_up.weight`, `lora_mid.weight`), LoHa's
`hada_w1_a` ... `hada_t2`, LoKr's `lokr_w1` ... `lokr_t2`, full's `diff` and `diff_b`, and `alpha`, `scale`,
`dora_scale` for any of them (PEFT's `lora_magnitude_vector` beside a LoRA, under diffusers names only). The kind
is decided by the roles present, in the order AUTOMATIC1111 tries its module types (LoRA, LoHa, LoKr, full); a role
the kind does not use is an error (A1111 would ignore it and apply something else than the file means). The factors
stay in the file's (torch) layout: `mlx_sd.lycoris` rebuilds dW as A1111 does and transposes the product once.

Scale, as A1111's calc_scale: the layer's `.scale` when the file has one (it replaces alpha / dim for every kind, the
full network's diff included; ComfyUI does not read it); else alpha / dim, dim from the kind's low-rank factor
(lora_down's rows; LoHa's hada_w1_b; LoKr's lokr_w2_b, else lokr_w1_b), 1 without alpha or without such a factor
(full; LoKr with two full matrices).

DoRA's `dora_scale` is read by its shape as ComfyUI reads it (`dora_magnitude`): one magnitude per output channel
(LyCORIS wd_on_out) follows ComfyUI's rule, one per input channel A1111's (`mlx_sd.lycoris.DoRA`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from mlx_sd.lycoris import DoRA, FullLayer, LoHaLayer, LoKrLayer, NetworkLayer, torch_shape

_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_COMMON = ("alpha", "scale", "dora_scale")
# Every role each kind may have: anything else beside them is refused by name. "magnitude" is PEFT's
# lora_magnitude_vector, a role of diffusers-named keys only.
KIND_ROLES = {
    "LoRA": {"down", "up", "mid", "magnitude", *_COMMON},
    "LoHa": {*_LOHA, "hada_t1", "hada_t2", *_COMMON},
    "LoKr": {*_LOKR, *_COMMON},
    "full": {"diff", "diff_b", *_COMMON},
}


def network_kind(roles: set[str]) -> str | None:
    """The kind of a layer's network from its roles (A1111's order: LoRA, LoHa, LoKr, full), None if incomplete."""
    if {"down", "up"} <= roles:
        return "LoRA"
    if set(_LOHA) <= roles:
        return "LoHa"
    has_1 = "lokr_w1" in roles or {"lokr_w1_a", "lokr_w1_b"} <= roles
    has_2 = "lokr_w2" in roles or {"lokr_w2_a", "lokr_w2_b"} <= roles
    if has_1 and has_2:
        return "LoKr"
    if "diff" in roles:
        return "full"
    return None


def lycoris_layer(kind: str, tensors: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> NetworkLayer:
    """The LoHa, LoKr or full update of a layer whose weight is `shape` (MLX layout), from its tensors by role.

    Raises:
        ValueError saying which tensors do not fit together or do not make the layer's shape.
    """
    t = {role: np.asarray(value) for role, value in tensors.items()}
    alpha = scalar(t["alpha"], "alpha") if "alpha" in t else None
    fixed = scalar(t["scale"], "scale") if "scale" in t else None  # A1111's calc_scale: .scale first
    dora = dora_magnitude(t["dora_scale"], shape) if "dora_scale" in t else None
    if kind == "LoHa":
        for i in ("1", "2"):
            _check_made(_rebuilt_shape(t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t.get(f"hada_t{i}")), shape, f"w{i}")
        scale = 1.0 if alpha is None else alpha / t["hada_w1_b"].shape[0]
        factors = (_mx(t.get(role)) for role in (*_LOHA, "hada_t1", "hada_t2"))
        return LoHaLayer(shape, *factors, scale=scale if fixed is None else fixed, dora=dora)
    if kind == "LoKr":
        return _lokr(t, shape, alpha, fixed, dora)
    diff = t["diff"]
    _check_made(diff.shape, shape, "diff")
    bias = t.get("diff_b")
    if bias is not None and bias.shape != (shape[0],):
        raise ValueError(f"diff_b {bias.shape} is not the layer's bias ({shape[0]},)")
    if dora is not None and dora.rule == "comfyui":
        raise ValueError(
            "dora_scale per output channel beside a full network (diff): ComfyUI ignores it there and A1111 would "
            "normalise input columns; LyCORIS does not write it"
        )
    return FullLayer(shape, _mx(diff), _mx(bias), 1.0 if fixed is None else fixed, dora)


def _lokr(t: dict[str, np.ndarray], shape: tuple[int, ...], alpha: float | None, fixed: float | None,
          dora: DoRA | None) -> LoKrLayer:  # fmt: skip
    if "lokr_w1" in t and ("lokr_w1_a" in t or "lokr_w1_b" in t):
        raise ValueError("it has both lokr_w1 and its factors lokr_w1_a/lokr_w1_b")
    if "lokr_w2" in t and ({"lokr_w2_a", "lokr_w2_b", "lokr_t2"} & set(t)):
        raise ValueError("it has both lokr_w2 and its factors lokr_w2_a/lokr_w2_b/lokr_t2")
    w1 = t["lokr_w1"].shape if "lokr_w1" in t else _rebuilt_shape(t["lokr_w1_a"], t["lokr_w1_b"], None)
    w2 = t["lokr_w2"].shape if "lokr_w2" in t else _rebuilt_shape(t["lokr_w2_a"], t["lokr_w2_b"], t.get("lokr_t2"))
    if len(w1) != 2 or len(w2) not in (2, 4):
        raise ValueError(f"w1 {tuple(w1)} and w2 {tuple(w2)} do not make a Kronecker product of a weight")
    made = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    _check_made(made, shape, "kron(w1, w2)")
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = fixed if fixed is not None else 1.0 if alpha is None or dim is None else alpha / dim
    return LoKrLayer(shape, *(_mx(t.get(role)) for role in _LOKR), scale=scale, dora=dora)


def _rebuilt_shape(wa: np.ndarray, wb: np.ndarray, core: np.ndarray | None) -> tuple[int, ...]:
    """The torch shape A1111 rebuilds from a factor pair: wa @ wb (flattened), or the Tucker form (out, in, kh, kw)."""
    if core is not None:
        if core.ndim != 4 or wa.ndim != 2 or wb.ndim != 2 or core.shape[:2] != (wa.shape[0], wb.shape[0]):
            raise ValueError(f"Tucker core {core.shape} does not join {wa.shape} and {wb.shape}")
        return (wa.shape[1], wb.shape[1], *core.shape[2:])
    if wa.ndim not in (2, 4) or wb.ndim not in (2, 4) or math.prod(wa.shape[1:]) != wb.shape[0]:
        raise ValueError(f"{wa.shape} @ {wb.shape} is not a matrix product")
    return (wa.shape[0], *wb.shape[1:])


def _check_made(made: tuple[int, ...], shape: tuple[int, ...], what: str) -> None:
    """A1111 reshapes an update to the weight when the element counts agree; the output channels must agree too."""
    made = tuple(made)
    if made[0] != shape[0] or math.prod(made) != math.prod(shape):
        raise ValueError(f"{what} makes {made}, the layer is {torch_shape(shape)} (torch layout)")


def dora_magnitude(value: np.ndarray, shape: tuple[int, ...]) -> DoRA:
    """LyCORIS's dora_scale for a layer whose weight is `shape` (MLX layout), its axis told by its shape as ComfyUI
    tells it (`wd_on_output_axis = dora_scale.shape[0] == weight.shape[0]`):

    - (out, 1) or (out, 1, 1, 1), one magnitude per output channel (LyCORIS wd_on_out): ComfyUI's rule. A1111 would
      divide these by the input columns' norms (a bug there), so mlx-sd follows ComfyUI for them.
    - (1, in) or (1, in, 1, 1), one per input channel (LyCORIS's default before wd_on_out): A1111's rule, which
      ComfyUI shares.

    Raises:
        ValueError for any other shape.
    """
    value = np.asarray(value)
    out, channels = shape[0], shape[-1]
    if value.ndim >= 2 and value.shape[0] == out and value.size == out:
        return DoRA(mx.array(np.ascontiguousarray(value.reshape(out))), "comfyui")
    if value.ndim >= 2 and value.shape[0] == 1 and value.shape[1] == channels and value.size == channels:
        return DoRA(mx.array(np.ascontiguousarray(value.reshape(channels))), "a1111")
    raise ValueError(
        f"dora_scale {value.shape} is neither one magnitude per output channel ({out}, 1) nor one per input channel "
        f"(1, {channels})"
    )


def peft_magnitude(value: np.ndarray, shape: tuple[int, ...]) -> DoRA:
    """PEFT's lora_magnitude_vector, (out,) for a Linear or (1, out, 1, 1) for a convolution, as PEFT's DoRA applies
    it (`mlx_sd.lycoris.DoRA`, rule "peft").

    Raises:
        ValueError when it is not one magnitude per output channel.
    """
    value = np.asarray(value)
    if value.size != shape[0] or max(value.shape, default=1) != shape[0]:
        raise ValueError(f"lora_magnitude_vector {value.shape} is not one magnitude per output channel ({shape[0]},)")
    return DoRA(mx.array(np.ascontiguousarray(value.reshape(shape[0]))), "peft")


def scalar(value: np.ndarray, what: str) -> float:
    """A one-element tensor (alpha, scale) as a float."""
    value = np.asarray(value)
    if value.size != 1:
        raise ValueError(f"{what} {value.shape} is not one number")
    return float(value.reshape(()))


def fold_mid(down: np.ndarray, mid: np.ndarray) -> np.ndarray:
    """A Tucker LoCon's down (r2, in[, 1, 1]) and mid (r1, r2, kh, kw) as one conv down (r1, in, kh, kw).

    A1111 rebuilds einsum("nmkl,in,mj->ijkl", mid, up, down); contracting mid with down first leaves up @ down', a
    LoRA of the layer's kernel, which then fuses or runs like any other.
    """
    down = down.reshape(down.shape[0], -1)
    if mid.ndim != 4 or mid.shape[1] != down.shape[0]:
        raise ValueError(f"lora_mid {mid.shape} does not follow lora_down {down.shape}")
    return np.einsum("nmkl,mj->njkl", mid.astype(np.float32), down.astype(np.float32))


def _mx(value: np.ndarray | None) -> mx.array | None:
    return None if value is None else mx.array(np.ascontiguousarray(value))
