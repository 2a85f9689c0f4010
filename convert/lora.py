"""LoRA files -> `mlx_sd.lora.LoRA`: every dialect's key names mapped onto our parameter names, strictly.

Dialects (a file may mix the two text-encoder/UNet halves of one dialect, not dialects):

    kohya / A1111       lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha   (lora_te_, lora_te1_, lora_te2_)
        <module> is a module path with "." written "_", in one of two namings:
        diffusers names  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q  (kohya's SD1 files)
        original names   lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q            (kohya's SDXL files,
                         A1111/LyCORIS; blocks renumbered with `ldm_unet.block_table`, resnets' in_layers_2 ->
                         conv1 ...). Text encoders use transformers' names (lora_te1_text_model_encoder_layers_0_...).
    diffusers / PEFT    unet.<module>.lora_A.weight, .lora_B.weight (text_encoder., text_encoder_2. prefixes;
                        `lora_adapter_metadata` in the safetensors header holds lora_alpha / alpha_pattern)
    older diffusers     <module>.processor.to_q_lora.down.weight (attention processors, UNet only when unprefixed),
                        <module>.lora.down.weight, text_encoder.<module>.to_q_lora.down.weight,
                        <module>.lora_linear_layer.down.weight, optional per-module <module>.alpha

Since "_" also occurs inside names (`to_q`, `transformer_blocks`), underscore names are never split by rule: they
are looked up in tables built from the model's own layer paths, so a name either denotes exactly one layer or is
an error. Every key of the file is consumed or the load fails naming it (LyCORIS LoHa/LoKr/DoRA/Tucker tensors
included: they are different maths, not LoRA). Torch layouts become MLX's here: conv downs (r, in, kh, kw) ->
(r, kh, kw, in), 1x1-conv LoRAs on layers we hold as Linear (SD1's proj_in/proj_out) are flattened.

Scale: alpha / rank per layer, alpha from the `.alpha` tensor or PEFT's adapter config (`use_rslora`:
alpha / sqrt(rank)); no alpha means scale 1 (diffusers' and A1111's convention).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.lora import COMPONENTS, LoRA, LoRALayer, LoRATargets

from .keymap import ConversionError, rename
from .ldm_unet import RESNET_LEAVES, block_table, unet_rules
from .readers import open_checkpoint

_SHOWN = 8
_KOHYA_PREFIXES = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                   "lora_te2": "text_encoder_2"}  # fmt: skip
_KOHYA = re.compile(r"(lora_unet|lora_te[12]?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
_PREFIX = r"(?:(unet|text_encoder|text_encoder_2)\.)?"
_DIFFUSERS = re.compile(_PREFIX + r"(.+?)\.(" + "|".join(re.escape(r) for r in _ROLES) + ")")
# Attention-processor LoRAs (diffusers < 0.21): named after the attention, not the projection.
_PROCESSOR = re.compile(_PREFIX + r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PROCESSOR_TARGETS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# Tensors of networks that are not LoRA (LyCORIS and DoRA): named in the error instead of "unknown key".
_OTHER_NETWORKS = re.compile(r".*\.(hada_\w+|lokr_\w+|lora_mid\.weight|dora_scale|lora_magnitude_vector\S*|oft_\w+|"
                             r"diff|diff_b|w_norm|b_norm|a1\.weight|a2\.weight|b1\.weight|b2\.weight)")  # fmt: skip
PEFT_METADATA_KEY = "lora_adapter_metadata"
# Hints for "made for another family": the cross-attention key/value input width of each family's UNet.
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass
class _Entry:
    """The tensors of one adapted layer, by role, with their source keys for messages."""

    keys: dict[str, str]


def map_lora(
    state: Mapping[str, np.ndarray],
    targets: LoRATargets,
    metadata: Mapping[str, str] | None = None,
    name: str = "lora",
) -> dict[str, dict[str, LoRALayer]]:
    """Map a LoRA state dict onto a model's layers.

    Args:
        state: key -> array as stored (torch layout).
        targets: the model's layers (`mlx_sd.lora.lora_targets(model)`).
        metadata: the safetensors header's `__metadata__` (PEFT's adapter config lives there), or None.
        name: the LoRA's name, for messages.
    Returns:
        component -> module path -> LoRALayer (MLX layout, the file's dtype; bfloat16 read as float32).
    Raises:
        ConversionError naming every key that is unknown, unmatched, incomplete or of the wrong shape, with the
        family the LoRA looks made for when it is not the model's.
    """
    tables = _Tables(targets)
    entries: dict[tuple[str, str], _Entry] = {}
    unknown, unmatched, other = [], [], []
    for key in state:
        parsed = _parse_key(key)
        if parsed is None:
            (other if _OTHER_NETWORKS.fullmatch(key) else unknown).append(key)
            continue
        component, module, role, naming = parsed
        path = tables.resolve(component, module, naming)
        if path is None:
            unmatched.append(key)
            continue
        entry = entries.setdefault((component, path), _Entry({}))
        if role in entry.keys:
            unmatched.append(f"{key} (a second {role} for {component}.{path}, after {entry.keys[role]})")
            continue
        entry.keys[role] = key

    hint = _family_hint(state, targets)
    problems = []
    if other:
        problems.append(
            f"{len(other)} tensors belong to network types other than LoRA (LyCORIS LoHa/LoKr/Tucker, DoRA, ...), "
            f"which mlx-sd does not apply ({_summary(other)})"
        )
    if unknown:
        problems.append(f"{len(unknown)} keys are not LoRA keys of a known format ({_summary(unknown)})")
    if unmatched:
        problems.append(f"{len(unmatched)} keys name no layer of this model ({_summary(unmatched)})")
    incomplete = [f"{c}.{p} has only {sorted(e.keys)}" for (c, p), e in entries.items() if {"down", "up"} - set(e.keys)]
    if incomplete:
        problems.append(f"{len(incomplete)} layers lack a down or up matrix ({_summary(incomplete)})")
    if problems:
        raise ConversionError(f"LoRA {name}: " + "; ".join(problems) + hint)
    if not entries:
        raise ConversionError(f"LoRA {name}: the file holds no LoRA tensors")

    alphas = _PeftAlphas(metadata)
    layers: dict[str, dict[str, LoRALayer]] = {}
    misshaped = []
    for (component, path), entry in entries.items():
        shape = targets.shapes[component][path]
        try:
            layer = _layer(state, entry, shape, alphas.alpha(component, path), alphas.rslora(component))
        except ValueError as error:
            misshaped.append(f"{component}.{path}: {error}")
            continue
        layers.setdefault(component, {})[path] = layer
    if misshaped:
        count = len(misshaped)
        raise ConversionError(f"LoRA {name}: {count} layers have the wrong shape ({_summary(misshaped)}){hint}")
    return layers


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, module name, role, naming) of a LoRA key; naming is "underscore" or "dotted"."""
    if m := _KOHYA.fullmatch(key):
        role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m.group(3)]
        return _KOHYA_PREFIXES[m.group(1)], m.group(2), role, "underscore"
    if m := _PROCESSOR.fullmatch(key):
        component = m.group(1) or "unet"
        kind = "unet" if component == "unet" else "text"
        return component, f"{m.group(2)}.{_PROCESSOR_TARGETS[kind][m.group(3)]}", m.group(4), "dotted"
    if m := _DIFFUSERS.fullmatch(key):
        return m.group(1) or "unet", m.group(2), _ROLES[m.group(3)], "dotted"
    return None


class _Tables:
    """Module names of every naming -> our module paths, per component, built from the model's layers."""

    def __init__(self, targets: LoRATargets):
        self.targets = targets
        self._underscore: dict[str, dict[str, str]] = {}
        for component, shapes in targets.shapes.items():
            names = {p: p for p in shapes}
            if component == "unet":
                names |= _original_unet_names(targets.unet_config, shapes)
            else:
                names |= {f"text_model.{p}": p for p in shapes}  # transformers' CLIPTextModel prefix
            table: dict[str, str] = {}
            for name, path in names.items():
                flat = name.replace(".", "_")
                if table.setdefault(flat, path) != path:
                    raise ConversionError(f"{component}: layers {table[flat]} and {path} are both named {flat}")
            self._underscore[component] = table

    def resolve(self, component: str, module: str, naming: str) -> str | None:
        shapes = self.targets.shapes.get(component)
        if shapes is None:
            return None
        if naming == "underscore":
            return self._underscore[component].get(module)
        if component != "unet":
            module = module.removeprefix("text_model.")
        return module if module in shapes else None


def _original_unet_names(config, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    """Original-LDM module path ("input_blocks.1.0.in_layers.2") -> ours ("down_blocks.0.resnets.0.conv1").

    Candidate original names come from `ldm_unet.block_table`; each is renamed by the converter's own key map, so
    LoRA names and checkpoint conversion cannot disagree.
    """
    rules = unet_rules(config)
    candidates = ["time_embed.0", "time_embed.2", "label_emb.0.0", "label_emb.0.2", "out.2"]
    for src, dst, kind in block_table(config):
        if kind == "resnet":
            candidates += [f"{src}.{leaf}" for leaf in RESNET_LEAVES]
        elif kind == "attention":
            candidates += [src + path[len(dst) :] for path in shapes if path.startswith(dst + ".")]
        else:
            candidates.append(src)
    names = {}
    for candidate in candidates:
        found = rename(f"{candidate}.weight", rules)
        if found and found[1]:
            ours = found[1][: -len(".weight")]
            if ours in shapes:
                names[candidate] = ours
    return names


class _PeftAlphas:
    """alpha per layer from PEFT's adapter config in the safetensors metadata (`lora_alpha`, `alpha_pattern`)."""

    def __init__(self, metadata: Mapping[str, str] | None):
        self.config: dict = {}
        raw = (metadata or {}).get(PEFT_METADATA_KEY)
        if raw:
            try:
                self.config = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ConversionError(f"LoRA metadata {PEFT_METADATA_KEY} is not valid JSON ({error})") from None
        for component in COMPONENTS:
            if self.config.get(f"{component}.use_dora"):
                raise ConversionError(f"{component}: this is a DoRA adapter (use_dora), which mlx-sd does not apply")

    def rslora(self, component: str) -> bool:
        return bool(self.config.get(f"{component}.use_rslora"))

    def alpha(self, component: str, path: str) -> float | None:
        pattern = self.config.get(f"{component}.alpha_pattern") or {}
        for key, value in pattern.items():
            # PEFT matches pattern keys against the end of the module path, or as a regex on the whole path.
            if path == key or path.endswith(f".{key}") or re.fullmatch(key, path):
                return float(value)
        value = self.config.get(f"{component}.lora_alpha")
        return None if value is None else float(value)


def _layer(state, entry: _Entry, target: tuple[int, ...], config_alpha: float | None, rslora: bool) -> LoRALayer:
    down = np.asarray(state[entry.keys["down"]])
    up = np.asarray(state[entry.keys["up"]])
    rank = down.shape[0]
    if up.ndim == 4:
        if up.shape[2:] != (1, 1):
            raise ValueError(f"up {up.shape} must be a 1x1 convolution")
        up = up.reshape(up.shape[:2])
    if up.ndim != 2 or up.shape[1] != rank or down.ndim not in (2, 4):
        raise ValueError(f"down {down.shape} and up {up.shape} do not form a rank-{rank} update")
    if len(target) == 4:  # a convolution (out, kh, kw, in)
        down = down.reshape(rank, down.shape[1], 1, 1) if down.ndim == 2 else down
        down = down.transpose(0, 2, 3, 1)
    elif down.ndim == 4:
        if down.shape[2:] != (1, 1):
            raise ValueError(f"down {down.shape} is a {down.shape[2]}x{down.shape[3]} convolution, the layer a Linear")
        down = down.reshape(rank, -1)
    made = (up.shape[0], *down.shape[1:])
    if made != tuple(target):
        raise ValueError(f"the LoRA makes {made}, the layer is {tuple(target)}")
    alpha = float(np.asarray(state[entry.keys["alpha"]]).reshape(())) if "alpha" in entry.keys else config_alpha
    scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)
    return LoRALayer(mx.array(np.ascontiguousarray(down)), mx.array(np.ascontiguousarray(up)), scale)


def _family_hint(state: Mapping[str, np.ndarray], targets: LoRATargets) -> str:
    """ "; this LoRA is for <family> ..." when its text encoders or cross-attention width say it was made for
    another model family than `targets`' (else "")."""
    keys = list(state)
    model = f"the model is {targets.family}"
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) and "text_encoder_2" not in targets.shapes:
        return f"; this LoRA is for SDXL (it adapts a second text encoder), {model}"
    if any(k.startswith("lora_te_") for k in keys) and "text_encoder_2" in targets.shapes:
        return f"; this LoRA is for SD1/SD2 models (one text encoder, lora_te_ keys), {model}"
    widths = Counter()
    for key in keys:
        if re.search(r"attn2[._](processor[._])?to_[kv](\.lora_A\.weight|\.lora_down\.weight|_lora\.down\.weight|"
                     r"\.lora\.down\.weight)$", key):  # fmt: skip
            widths[np.shape(state[key])[-1] if np.ndim(state[key]) == 2 else np.shape(state[key])[1]] += 1
    ours = targets.unet_config.cross_attention_dim
    if widths and (width := widths.most_common(1)[0][0]) != ours:
        family = _CONTEXT_WIDTHS.get(width, "another family's")
        return f"; this LoRA is for {family} models (cross-attention width {width}), {model} (width {ours})"
    return ""


def _summary(items: list[str]) -> str:
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


# --- files --------------------------------------------------------------------------------------------------


def lora_hash(path: str | Path) -> str:
    """A1111's LoRA hash (sha256 hex): of the bytes after the header for safetensors (kohya's "addnet" hash, so
    editing the metadata keeps it), of the whole file otherwise."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        size = Path(path).stat().st_size
        is_safetensors = len(head) == 8 and 8 + length <= size and f.read(1) == b"{"
        f.seek(8 + length if is_safetensors else 0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora(path: str | Path, targets: LoRATargets, name: str | None = None) -> LoRA:
    """Read a LoRA file (`.safetensors`, or a pickle through the safe reader) and map it onto a model.

    Args:
        path: the file.
        targets: the model's layers, `mlx_sd.lora.lora_targets(model)`.
        name: the name to show and record (default: the file name without extension).
    Raises:
        ConversionError for an unreadable, unsafe or non-matching file (see `map_lora`).
    """
    path = Path(path)
    name = name or path.stem
    checkpoint = open_checkpoint(path)
    layers = map_lora(checkpoint, targets, checkpoint.metadata, name)
    return LoRA(name, layers, lora_hash(path), targets.family, str(path))


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT` (the CLI's --lora) -> (file, weight); a Windows drive letter is not a weight."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0
