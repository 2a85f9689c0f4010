"""SD3's text towers, as component plans: CLIP-L, bigG and T5-XXL in transformers' layout, from inside a single file
(under `text_encoders.<tower>.transformer.`, convert/sd3_file.py) or from files of their own.

SD3 pools CLIP-L without its projection (Stability's sd3_infer.py and ComfyUI: return_projected_pooled=False);
diffusers' single-file loader gives that tower an identity `text_projection` so that its CLIPTextModelWithProjection
computes the same thing. So does this converter (a projection stored in the file is dropped, for that reason), which
makes the converted folder look like a diffusers folder's.

Files of their own: sd3.5_large.safetensors, sd3.5_large_turbo, sd3.5_medium and sd3_medium.safetensors hold the
MMDiT and the autoencoder only. Stability publishes the text encoders beside them, in the repos' text_encoders/ folder
(clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors), and UIs keep them
in a models/text_encoders/ (formerly models/clip/) folder. Each file is one tower in transformers' layout
(CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel), sometimes under a prefix (a tower cut out of an
`*_incl_clips` file keeps its `text_encoders.clip_l.transformer.`).

Which tower a file holds is read from its tensors, not its name: T5 by its `encoder.block.*`, the CLIP towers by
width (OpenAI CLIP-L/14: 768, OpenCLIP bigG/14: 1280). Towers of other widths (small test models) are told apart
only as a pair: the narrower is CLIP-L. Every tensor of a file must belong to its tower.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .diffusers import CLIP_RULES, t5_rules
from .families import T5_TOWER, family_config
from .keymap import ComponentPlan, ConversionError, Rule, rename
from .ldm import TOP_LEVEL_DROPS, KeyView, clip_config_from_shapes, plan_component, strip_prefix
from .readers import open_checkpoint

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
IDENTITY = "<identity>"  # the stand-in key of CLIP-L's identity projection (not a tensor of the file)
_LOGIT_SCALE = Rule(r"logit_scale", None, "CLIP's contrastive temperature; encoding text does not use it")
_CLIP_L_PROJECTION = Rule(
    r"text_projection\.weight",
    None,
    "SD3 pools CLIP-L without its projection (sd3_infer.py, ComfyUI); an identity projection is written instead, "
    "as diffusers' single-file loader does",
)

_T5_MARKER = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_MARKER = "encoder.layers.0.self_attn.q_proj.weight"
_OPEN_CLIP_MARKER = "transformer.resblocks.0.attn.in_proj_weight"
# The published widths: OpenAI CLIP ViT-L/14 (SD 1.x's, SD3's first tower) and OpenCLIP ViT-bigG/14 (SDXL's second).
_CLIP_WIDTHS = {768: "text_encoder", 1280: "text_encoder_2"}
# What each component folder holds, for messages.
TOWER_NAMES = {"text_encoder": "CLIP-L", "text_encoder_2": "bigG (CLIP-G)", "text_encoder_3": "T5-XXL"}
# Where Stability's repos (text_encoders/ beside the model file) and UIs' model folders keep the towers, and the
# file names they publish them under; T5 in fp16 first (the fp8 files are lossy copies of it).
PLACES = ("text_encoders", "../text_encoders", "../clip")
NAMES = {
    "text_encoder": ("clip_l.safetensors",),
    "text_encoder_2": ("clip_g.safetensors",),
    "text_encoder_3": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors"),
}


@dataclass(frozen=True)
class TowerFile:
    """One separately published text encoder: the file and its plan (component folder: `plan.name`)."""

    path: Path
    plan: ComponentPlan


# --- the towers ------------------------------------------------------------------------------------------------


class _WithIdentity(Mapping):
    """A tower's tensors plus one identity matrix under `IDENTITY` (CLIP-L's projection, see the module docstring)."""

    def __init__(self, view: KeyView, size: int):
        self._view, self._size = view, size

    def __getitem__(self, key: str) -> np.ndarray:
        return np.eye(self._size, dtype=np.float32) if key == IDENTITY else self._view[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._view
        yield IDENTITY

    def __len__(self) -> int:
        return len(self._view) + 1


def clip_l(checkpoint, shapes, prefix: str = CLIP_L_PREFIX) -> ComponentPlan:
    """CLIP-L (text_encoder) from the tensors under `prefix` (also a separate file's, convert/sd3_text_files.py)."""
    keys = strip_prefix(shapes, prefix)
    relative = {k: shapes[v] for k, v in keys.items()}
    width = clip_config_from_shapes(relative).hidden_size
    config = replace(clip_config_from_shapes(relative), projection_dim=width)
    rules = [_CLIP_L_PROJECTION, _LOGIT_SCALE, Rule(IDENTITY, "text_projection.weight"), *CLIP_RULES]
    source = _WithIdentity(KeyView(checkpoint, keys, shapes), width)
    shapes_with_identity = {**relative, IDENTITY: (width, width)}
    return ComponentPlan("text_encoder", prefix, config, source, rules, shapes=shapes_with_identity)


def clip_g(checkpoint, shapes, prefix: str = CLIP_G_PREFIX) -> ComponentPlan:
    """bigG (text_encoder_2) from the tensors under `prefix`."""
    keys = strip_prefix(shapes, prefix)
    relative = {k: shapes[v] for k, v in keys.items()}
    if "text_projection.weight" not in relative:
        raise ConversionError(f"text_encoder_2 ({prefix}*): no text_projection.weight; SD3's pooled text needs it")
    projection = relative["text_projection.weight"][0]  # a Linear's (out, in)
    # OpenCLIP bigG (as SDXL's second tower): gelu, not OpenAI CLIP's quick_gelu.
    config = replace(clip_config_from_shapes(relative), hidden_act="gelu", projection_dim=projection)
    rules = [_LOGIT_SCALE, *CLIP_RULES]
    return plan_component("text_encoder_2", prefix, config, KeyView(checkpoint, keys, shapes), rules)


def t5(checkpoint, shapes, prefix: str = T5_PREFIX) -> ComponentPlan:
    """T5-XXL's encoder (text_encoder_3) from the tensors under `prefix`."""
    from mlx_sd.models import T5Config

    keys = strip_prefix(shapes, prefix)
    relative = {k: shapes[v] for k, v in keys.items()}
    rules = t5_rules(relative)
    embedding = relative.get("shared.weight", relative.get("encoder.embed_tokens.weight"))
    bias = relative.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    query = relative.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if embedding is None or bias is None or query is None:
        raise ConversionError(
            f"text_encoder_3 ({prefix}*): no shared.weight, relative_attention_bias or q.weight of block 0; the T5 "
            "encoder in this file is incomplete"
        )
    blocks = {int(k.split(".")[2]) for k in relative if k.startswith("encoder.block.")}
    buckets, heads = bias
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in relative
    ff = relative.get(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight", (0,))[0]
    published = family_config("sd3", "text_encoder_3")
    config = T5Config(
        vocab_size=embedding[0],
        d_model=embedding[1],
        d_kv=query[0] // heads,
        d_ff=ff,
        num_layers=len(blocks),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        # Not in the shapes: T5 v1.1's (SD3's) values.
        relative_attention_max_distance=published["relative_attention_max_distance"],
        layer_norm_epsilon=published["layer_norm_epsilon"],
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return plan_component(T5_TOWER[0], prefix, config, KeyView(checkpoint, keys, shapes), rules)


# --- files of their own ----------------------------------------------------------------------------------------


def discover_text_encoders(model_file: Path) -> list[Path]:
    """The published CLIP-L, bigG and (if there) T5 files near an SD3 file without text encoders: the first of
    `PLACES` (relative to the file's folder) that holds both CLIP towers under their published names; [] if none."""
    for place in PLACES:
        folder = model_file.parent / place
        present = {slot: [folder / n for n in names if (folder / n).is_file()] for slot, names in NAMES.items()}
        if present["text_encoder"] and present["text_encoder_2"]:
            return [files[0] for files in present.values() if files]
    return []


def hub_text_encoders(model_file: Path, repo_id: str) -> list[Path] | None:
    """For an SD3 file of a hub repo that lacks the CLIP towers (stabilityai/stable-diffusion-3.5-large's
    sd3.5_large.safetensors): the towers the repo publishes in text_encoders/ (CLIP-L, bigG, T5 in fp16), fetched
    into the same snapshot as any hub file; None for any other file."""
    from .hub import fetch
    from .sd3 import is_sd3

    shapes = {key: open_checkpoint(model_file).info(key).shape for key in open_checkpoint(model_file)}
    if not is_sd3(shapes) or any(k.startswith((CLIP_L_PREFIX, CLIP_G_PREFIX)) for k in shapes):
        return None
    return [fetch(f"{repo_id}/text_encoders/{names[0]}")[0] for names in NAMES.values()]


def open_text_encoders(paths: Sequence[Path], known: Mapping[str, int] | None = None) -> dict[str, TowerFile]:
    """Plan each file's tower; component folder -> `TowerFile`. `known`: the widths of the model file's own CLIP
    towers (component folder -> width), which tell the files' apart when their widths are not the published ones.

    Raises:
        ConversionError for a file that is not one text tower in transformers' layout, towers that cannot be told
        apart, two files of one tower, or tensors that belong to no tower.
    """
    found: dict[str, TowerFile] = {}
    clips: list[tuple[Path, object, dict, str, int]] = []
    for path in paths:
        checkpoint = open_checkpoint(path)
        shapes = {key: checkpoint.info(key).shape for key in checkpoint}
        prefix = _prefix(shapes, _T5_MARKER)
        if prefix is not None:
            _add(found, TowerFile(path, t5(checkpoint, shapes, prefix)))
            _check_claimed(path, shapes, found["text_encoder_3"].plan)
            continue
        prefix = _prefix(shapes, _CLIP_MARKER)
        if prefix is None:
            raise ConversionError(f"{path}: {_what_else(shapes)}")
        prefix = prefix.removesuffix("text_model.")
        width = shapes[next(k for k in shapes if k.endswith(_CLIP_MARKER))][0]
        clips.append((path, checkpoint, shapes, prefix, width))
    builders = {"text_encoder": clip_l, "text_encoder_2": clip_g}
    for (path, checkpoint, shapes, prefix, _), slot in zip(clips, _clip_slots(clips, known or {})):
        _add(found, TowerFile(path, builders[slot](checkpoint, shapes, prefix)))
        _check_claimed(path, shapes, found[slot].plan)
    return found


def relative_name(path: Path, root: Path) -> str:
    """`path` as the manifest names source files: relative to the model file's folder."""
    return os.path.relpath(path, root)


def _prefix(shapes, marker: str) -> str | None:
    """What comes before `marker` in the key that ends with it (at a key boundary), or None."""
    for key in shapes:
        if key == marker or key.endswith("." + marker):
            return key[: len(key) - len(marker)]
    return None


def _what_else(shapes) -> str:
    if _prefix(shapes, _OPEN_CLIP_MARKER) is not None:
        return (
            "an OpenCLIP-layout text tower (transformer.resblocks.*); SD3's text encoders are read in transformers' "
            "layout, as Stability publishes them (text_encoders/clip_g.safetensors)"
        )
    shown = ", ".join(list(shapes)[:4])
    return (
        f"not a CLIP or T5 text encoder (no *{_CLIP_MARKER} or *{_T5_MARKER}; keys like {shown}); pass SD3's "
        "clip_l, clip_g and t5xxl files"
    )


def _clip_slots(clips, known: Mapping[str, int]) -> list[str]:
    """CLIP-L or bigG for each CLIP file: by the published widths, else by the widths of the model file's own towers
    (`known`: component folder -> width), else (two files) the narrower is CLIP-L."""
    widths = [width for *_, width in clips]
    if all(w in _CLIP_WIDTHS for w in widths):
        return [_CLIP_WIDTHS[w] for w in widths]
    by_width = {w: slot for slot, w in known.items()}
    if len(by_width) == len(known) and all(w in by_width for w in widths):
        return [by_width[w] for w in widths]
    if len(widths) == 2 and widths[0] != widths[1]:
        return ["text_encoder", "text_encoder_2"] if widths[0] < widths[1] else ["text_encoder_2", "text_encoder"]
    odd = next((path, w) for path, *_, w in clips if w not in _CLIP_WIDTHS or len(widths) != 2)
    raise ConversionError(
        f"{odd[0]}: a CLIP text tower {odd[1]} wide, neither CLIP-L (768) nor bigG (1280); SD3 conditions on those "
        "two (pass both files to tell towers of other widths apart: the narrower is CLIP-L)"
    )


def _add(found: dict[str, TowerFile], tower: TowerFile) -> None:
    slot = tower.plan.name
    if slot in found:
        raise ConversionError(
            f"{found[slot].path} and {tower.path} both hold {TOWER_NAMES[slot]}; pass one file per text encoder"
        )
    found[slot] = tower


def _check_claimed(path: Path, shapes, plan: ComponentPlan) -> None:
    claimed = {plan.prefix + k for k in plan.shapes}
    stray = sorted(k for k in shapes if k not in claimed and rename(k, TOP_LEVEL_DROPS) is None)
    if stray:
        shown = ", ".join(stray[:6]) + (f" and {len(stray) - 6} more" if len(stray) > 6 else "")
        raise ConversionError(
            f"{path}: {len(stray)} tensors are not {TOWER_NAMES[plan.name]}'s ({shown}); pass a file holding one "
            "text encoder"
        )
