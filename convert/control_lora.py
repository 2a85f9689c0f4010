"""Control-LoRA files (Stability AI's control-lora-canny/depth/recolor/sketch for SDXL, and others saved the same way)
-> a `ControlNet` holding an `mlx_sd.control_lora.ControlLoRA`, bound to the model's UNet when it runs.

The file is a ControlNet in the original ("cldm") names marked by a `lora_controlnet` tensor: the control image's
embedding (`input_hint_block.*`), the zero convolutions (`zero_convs.*`, `middle_block_out.*`) and whatever else was
trained outright as full tensors, and for the UNet encoder's layers `NAME.up` (out, rank[, 1, 1]) and `NAME.down`
(rank, in[, kh, kw]) pairs: NAME.weight = the UNet's + up @ down (ComfyUI's `ControlLoraOps`). The architecture is
read from the shapes, each pair standing for the weight it updates, as for a full ControlNet file; names are mapped
with the same rules and layouts changed here, once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.control_lora import ControlLoRA
from mlx_sd.controlnet import ControlNet
from mlx_sd.models import ControlNetModel

from .keymap import ConversionError, rename, to_mlx_layout

MARKER = "lora_controlnet"  # the tensor that marks a Control-LoRA (its value is not used)
OWN = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")  # never in a UNet


def is_control_lora(shapes) -> bool:
    return MARKER in shapes


def read_control_lora(path: Path, state, shapes: dict, dtype: mx.Dtype, name: str, short_hash: str) -> ControlNet:
    """Read a Control-LoRA (module docstring). Raises ConversionError naming what does not fit."""
    from mlx_sd.components import parameter_shapes

    from .controlnet import _hint, _single_file_config, ldm_rules

    pairs = {k[: -len(".down")] for k in shapes if k.endswith(".down")}
    lonely = sorted(k for k in shapes if k.endswith(".up") and k[: -len(".up")] not in pairs)
    lonely += sorted(f"{p}.down" for p in pairs if f"{p}.up" not in shapes)
    if lonely:
        raise ConversionError(f"{path.name}: LoRA halves without their pair ({', '.join(lonely[:4])}); the file may be "
                              "damaged")  # fmt: skip
    # the architecture from the shapes, each pair standing for the weight it updates
    stand_ins = {k: v for k, v in shapes.items() if k != MARKER and not k.endswith((".up", ".down"))}
    stand_ins |= {f"{p}.weight": (shapes[f"{p}.up"][0], *shapes[f"{p}.down"][1:]) for p in pairs}
    config = _single_file_config(path, stand_ins)
    config = replace(config, num_heads=(1,) * len(config.block_out_channels))  # the UNet's own when bound
    targets = parameter_shapes(ControlNetModel(config))
    rules = ldm_rules(config)
    tensors, deltas, problems = {}, {}, []
    for key in sorted(stand_ins):
        found = rename(key, rules)
        target = found[1] if found is not None and found[0].split is None else None
        if target not in targets:
            problems.append(key)
            continue
        shape = targets[target]
        if key in shapes:
            value = to_mlx_layout(np.asarray(state[key]), shape)
            if value.shape != shape:
                problems.append(f"{key} {value.shape}")
                continue
            tensors[target] = mx.array(value).astype(dtype)
        pair = key[: -len(".weight")]
        if pair in pairs:
            up, down = np.asarray(state[f"{pair}.up"]), np.asarray(state[f"{pair}.down"])
            rank = down.shape[0]
            if len(shape) == 4:
                down = down.transpose(0, 2, 3, 1) if down.ndim == 4 else down  # (r, in, kh, kw) -> (r, kh, kw, in)
                fits = (up.shape[0], *down.shape[1:]) == shape
            else:  # a Linear, or a 1x1 conv that is one here
                fits = (up.shape[0], int(np.prod(down.shape[1:]))) == shape
            if not fits:
                problems.append(f"{pair}.up/.down")
                continue
            deltas[target] = (mx.array(up.reshape(up.shape[0], rank)), mx.array(down.reshape(rank, -1)))
    missing = [k for k in targets if k.startswith(OWN) and k not in tensors]
    if problems or missing:
        found = f"tensors that fit no layer ({', '.join(problems[:4])})" if problems else ""
        gone = f"missing {', '.join(missing[:4])}" if missing else ""
        raise ConversionError(f"{path.name}: a Control-LoRA with " + "; ".join(x for x in (found, gone) if x) + ". "
                              + _hint(path))  # fmt: skip
    return ControlNet(None, name, short_hash, ControlLoRA(config, tensors, deltas))
