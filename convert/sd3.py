"""Stability's SD3 / SD3.5 single files (`sd3_medium.safetensors`, `sd3.5_large.safetensors`, ...): the MMDiT.

    model.diffusion_model.x_embedder.proj                   -> pos_embed.proj (patch conv)
    model.diffusion_model.pos_embed                         -> pos_embed.pos_embed (the stored position table)
    model.diffusion_model.t_embedder.mlp.0|2                -> time_text_embed.timestep_embedder.linear_1|2
    model.diffusion_model.y_embedder.mlp.0|2                -> time_text_embed.text_embedder.linear_1|2
    model.diffusion_model.joint_blocks.N.x_block.*          -> transformer_blocks.N.* (image stream)
    model.diffusion_model.joint_blocks.N.context_block.*    -> transformer_blocks.N.* (text stream)
    model.diffusion_model.final_layer.*                     -> norm_out, proj_out

Fused `attn.qkv` projections are split into to_q/to_k/to_v (add_*_proj for the text stream). The original
AdaLayerNormContinuous projects to (shift, scale), diffusers' to (scale, shift), so the last block's text modulation
and the final layer's have their halves swapped (diffusers' `swap_scale_shift`). The config is read from the shapes,
as Stability's own sd3_infer.py does: heads of 64 channels, hidden width / 64 heads.

Every function here takes keys relative to the transformer's prefix (`mmdit_prefix` finds it: files that hold the
transformer alone may have none).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np

from mlx_sd.components import build, parameter_shapes
from mlx_sd.models import MMDiTConfig

from .diffusers import mmdit_config
from .families import SD3_REPOS, SD3_TRANSFORMERS
from .keymap import ConversionError, Rule, map_keys, read_mapped
from .ldm_detect import FLOW, normalize_prediction_type

PREFIX = "model.diffusion_model."
# A key every SD3-family MMDiT has (relative to the prefix), and no SD1/SD2/SDXL file does.
MARKER = "joint_blocks.0.x_block.attn.qkv.weight"
# Stability's MMDiT uses heads of 64 channels and hidden width = 64 x depth (sd3_infer.py: depth = width // 64).
HEAD_DIM = 64
# The training latents' size (diffusers' sample_size for every SD3/3.5 release); informational.
SAMPLE_SIZE = 128


def mmdit_prefix(keys: Iterable[str]) -> str | None:
    """The prefix the MMDiT's keys carry ("model.diffusion_model." or ""), or None when there is no MMDiT."""
    keys = set(keys)
    for prefix in (PREFIX, ""):
        if prefix + MARKER in keys:
            return prefix
    return None


def is_sd3(keys: Iterable[str]) -> bool:
    """Whether a checkpoint's keys hold an SD3 / SD3.5 MMDiT in Stability's layout."""
    return mmdit_prefix(keys) is not None


def _need(shapes: Mapping[str, tuple], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ConversionError(f"transformer: no {key} in the checkpoint; is this an SD3 / SD3.5 MMDiT?")
    return tuple(shapes[key])


def mmdit_config_from_checkpoint(shapes: Mapping[str, tuple]) -> MMDiTConfig:
    """The MMDiT's config, inferred from its tensor shapes (keys relative to the prefix)."""
    D, C, p, _ = _need(shapes, "x_embedder.proj.weight")  # torch conv layout (O, I, kH, kW)
    if D % HEAD_DIM:
        raise ConversionError(f"transformer: width {D} is not a multiple of the {HEAD_DIM}-channel heads")
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
    if not blocks or blocks != set(range(len(blocks))):
        raise ConversionError(f"transformer: joint_blocks are not numbered 0..{len(blocks) - 1}: {sorted(blocks)}")
    positions = _need(shapes, "pos_embed")[1]
    side = math.isqrt(positions)
    if side * side != positions:
        raise ConversionError(f"transformer: pos_embed holds {positions} positions, not a square table")
    caption_out, caption_in = _need(shapes, "context_embedder.weight")
    dual = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.x_block\.attn2\.", k))})
    try:
        return MMDiTConfig(
            sample_size=SAMPLE_SIZE,
            patch_size=p,
            in_channels=C,
            num_layers=len(blocks),
            attention_head_dim=HEAD_DIM,
            num_attention_heads=D // HEAD_DIM,
            joint_attention_dim=caption_in,
            caption_projection_dim=caption_out,
            pooled_projection_dim=_need(shapes, "y_embedder.mlp.0.weight")[1],
            out_channels=_need(shapes, "final_layer.linear.weight")[0] // (p * p),
            pos_embed_max_size=side,
            dual_attention_layers=tuple(dual),
            qk_norm="rms_norm" if any(".attn.ln_q." in k for k in shapes) else None,
        )
    except ValueError as e:  # e.g. a text width unlike the image's
        raise ConversionError(f"transformer: {e}") from e


def _qkv(names: tuple[str, str, str], param: str):
    """Split a fused (3 * inner, ...) projection into three named parameters."""
    return lambda value: {f"{n}.{param}": part for n, part in zip(names, np.split(value, 3, axis=0), strict=True)}


def _swap_halves(value: np.ndarray) -> dict[str, np.ndarray]:
    """(shift, scale) -> (scale, shift) along the output axis (diffusers' swap_scale_shift)."""
    shift, scale = np.split(value, 2, axis=0)
    return {"": np.concatenate([scale, shift], axis=0)}


_IMAGE_QKV, _TEXT_QKV = ("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj")
_B = r"joint_blocks\.(\d+)"
_T = r"transformer_blocks.\1"
_P = r"(weight|bias)"


def mmdit_rules(config: MMDiTConfig) -> list[Rule]:
    """Stability's MMDiT keys (relative to the prefix) -> our (diffusers') names. The last block's text modulation
    is the one AdaLayerNormContinuous among the blocks: its rule is written for its index, before the general one."""
    last = config.num_layers - 1
    rules = [
        Rule(r"x_embedder\.proj\.(weight|bias)", r"pos_embed.proj.\1"),
        Rule(r"pos_embed", r"pos_embed.pos_embed"),
        Rule(r"t_embedder\.mlp\.0\.(weight|bias)", r"time_text_embed.timestep_embedder.linear_1.\1"),
        Rule(r"t_embedder\.mlp\.2\.(weight|bias)", r"time_text_embed.timestep_embedder.linear_2.\1"),
        Rule(r"y_embedder\.mlp\.0\.(weight|bias)", r"time_text_embed.text_embedder.linear_1.\1"),
        Rule(r"y_embedder\.mlp\.2\.(weight|bias)", r"time_text_embed.text_embedder.linear_2.\1"),
        Rule(r"context_embedder\.(weight|bias)", r"context_embedder.\1"),
        Rule(r"final_layer\.linear\.(weight|bias)", r"proj_out.\1"),
        Rule(r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"norm_out.linear.\1", split=_swap_halves),
        Rule(
            rf"joint_blocks\.({last})\.context_block\.adaLN_modulation\.1\.{_P}",
            r"transformer_blocks.\1.norm1_context.linear.\2",
            split=_swap_halves,
        ),
    ]
    for stream, attn, qkv, out, norm, mlp in (
        ("x_block", "attn", _IMAGE_QKV, "attn.to_out.0", ("attn.norm_q", "attn.norm_k"), "ff"),
        (
            "context_block",
            "attn",
            _TEXT_QKV,
            "attn.to_add_out",
            ("attn.norm_added_q", "attn.norm_added_k"),
            "ff_context",
        ),
        ("x_block", "attn2", _IMAGE_QKV, "attn2.to_out.0", ("attn2.norm_q", "attn2.norm_k"), None),
    ):
        src = rf"{_B}\.{stream}\.{attn}"
        rules += [
            Rule(rf"{src}\.qkv\.weight", rf"{_T}.{attn}.", split=_qkv(qkv, "weight")),
            Rule(rf"{src}\.qkv\.bias", rf"{_T}.{attn}.", split=_qkv(qkv, "bias")),
            Rule(rf"{src}\.proj\.{_P}", rf"{_T}.{out}.\2"),
            Rule(rf"{src}\.ln_q\.weight", rf"{_T}.{norm[0]}.weight"),
            Rule(rf"{src}\.ln_k\.weight", rf"{_T}.{norm[1]}.weight"),
        ]
        if mlp:
            norm1 = "norm1" if stream == "x_block" else "norm1_context"
            rules += [
                Rule(rf"{_B}\.{stream}\.adaLN_modulation\.1\.{_P}", rf"{_T}.{norm1}.linear.\2"),
                Rule(rf"{_B}\.{stream}\.mlp\.fc1\.{_P}", rf"{_T}.{mlp}.net.0.proj.\2"),
                Rule(rf"{_B}\.{stream}\.mlp\.fc2\.{_P}", rf"{_T}.{mlp}.net.2.\2"),
            ]
    return rules


def convert_mmdit(
    state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> tuple[MMDiTConfig, dict[str, np.ndarray]]:
    """A single file's MMDiT -> (config, our parameters in MLX layout), strictly: every tensor under the prefix is
    mapped, every parameter filled; other components of the file (`first_stage_model.*`, `text_encoders.*`) are not
    looked at.

    Args:
        state: key -> array; a lazy mapping is read one tensor at a time.
        shapes: key -> shape of the whole file (e.g. keymap.tensor_shapes), so that planning reads nothing; by
            default taken from `state`'s values.
    """
    prefix = mmdit_prefix(state)
    if prefix is None:
        raise ConversionError(f"transformer: no {PREFIX}{MARKER}; this is not an SD3 / SD3.5 checkpoint")
    keys = {k[len(prefix) :]: k for k in state if k.startswith(prefix)}
    shapes = {k: tuple(shapes[full] if shapes is not None else np.shape(state[full])) for k, full in keys.items()}
    config = mmdit_config_from_checkpoint(shapes)
    label = f"transformer ({prefix}*)" if prefix else "transformer"
    plan = map_keys(label, shapes, mmdit_rules(config), parameter_shapes(build(config)))
    return config, {name: read_mapped({m.key: state[keys[m.key]]}, m) for name, m in plan.items()}


# --- what every SD3 source shares -------------------------------------------------------------------------


def release(config: MMDiTConfig) -> str | None:
    """Which published release ("sd3-medium", "sd3.5-large", "sd3.5-medium") has this transformer, if any."""
    for name, published in SD3_TRANSFORMERS.items():
        if replace(mmdit_config(published), sample_size=config.sample_size) == config:
            return name
    return None


def release_evidence(config: MMDiTConfig) -> str:
    name = release(config)
    if name is None:
        return f"a {config.num_layers}-block MMDiT, {config.inner_dim} wide (no published release has this shape)"
    return f"the transformer of {name} ({SD3_REPOS[name]})"


def check_overrides(family: str | None, prediction_type: str | None, kind: str | None, found: str) -> None:
    """Refuse the overrides that make no sense for an SD3 model: `found` says what the source is, for messages."""
    if family is not None and family != "sd3":
        raise ConversionError(f"{found} is an SD3 / SD3.5 model, not {family}: drop the family override (--family)")
    if prediction_type is not None and normalize_prediction_type(prediction_type) != FLOW:
        raise ConversionError(
            f"{found}: SD3 models are rectified-flow models (prediction type flow), not {prediction_type}: drop the "
            "prediction type override (--prediction-type)"
        )
    if kind == "lcm":
        raise ConversionError(f"{found}: there are no LCM-distilled SD3 models; drop kind lcm (--kind)")
