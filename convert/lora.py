"""LoRA files -> `mlx_sd.lora.LoRA`: every dialect's key names mapped onto our parameter names, strictly.

Dialects (a file may mix the two text-encoder/UNet halves of one dialect, not dialects):

    kohya / A1111       lora_unet_<module>.lora_down.weight, .lora_up.weight, .alpha   (lora_te_, lora_te1_, lora_te2_)
        <module> is a module path with "." written "_", in one of two namings:
        diffusers names  lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q  (kohya's SD1 files)
        original names   lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q            (kohya's SDXL files,
                         A1111/LyCORIS; blocks renumbered with `ldm_unet.block_table`, resnets' in_layers_2 ->
                         conv1 ...). Text encoders use transformers' names (lora_te1_text_model_encoder_layers_0_...).
    diffusers / PEFT    unet.<module>.lora_A.weight, .lora_B.weight (text_encoder., text_encoder_2. prefixes;
                        `lora_adapter_metadata` in the safetensors header holds lora_alpha / alpha_pattern / use_dora),
                        .lora_magnitude_vector (a DoRA adapter: PEFT's magnitudes, applied by PEFT's rule)
    older diffusers     <module>.processor.to_q_lora.down.weight (attention processors, UNet only when unprefixed),
                        <module>.lora.down.weight, text_encoder.<module>.to_q_lora.down.weight,
                        <module>.lora_linear_layer.down.weight, optional per-module <module>.alpha

SD3 / SD3.5 (the MMDiT is the component "unet"; diffusers names its folder and its LoRA prefix "transformer"):

    diffusers / PEFT    transformer.transformer_blocks.0.attn.to_q.lora_A.weight (StableDiffusion3Pipeline's
                        save_lora_weights; text_encoder., text_encoder_2. for the CLIP towers), unprefixed or
                        base_model.model.<module> (PEFT's own state dicts)
    kohya (sd-scripts)  lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight: Stability's module names
                        (convert/sd3.py's table); lora_te1_/lora_te2_ CLIP towers, lora_te3_ T5
                        (lora_te3_encoder_block_0_layer_0_SelfAttention_q); OneTrainer: lora_transformer_<diffusers>
    ComfyUI             diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_up.weight (Stability's names, dotted)

A LoRA on Stability's fused attn.qkv has one down (r, in) and an up (3 inner, r): it is the three projections' LoRAs
sharing that down, each taking its third of the up's rows (W_qkv + s up @ down, split by rows as the converter
splits W_qkv; sd-scripts' split_qkv files store a block-diagonal up, which splits the same way). The
(shift, scale) modulations that convert/sd3.py swaps (final layer, last block's text stream) have their up's halves
swapped the same way. (diffusers 0.42 reads only its own format for SD3; ComfyUI and sd-scripts merge these files
into Stability's fused weights, which is what this split reproduces.)

LyCORIS networks, in kohya's key layout as A1111 reads them (convert/lycoris.py decides the kind and checks shapes):

    LoHa        lora_unet_<module>.hada_w1_a, .hada_w1_b, .hada_w2_a, .hada_w2_b (+ .hada_t1, .hada_t2: Tucker)
    LoKr        .lokr_w1 or .lokr_w1_a/.lokr_w1_b, .lokr_w2 or .lokr_w2_a/.lokr_w2_b (+ .lokr_t2: Tucker)
    full        .diff (+ .diff_b, the bias's difference)
    Tucker LoCon .lora_mid.weight beside lora_down/lora_up (folded into the down: still a LoRA)
    DoRA        .dora_scale beside any of them: one magnitude per input channel (A1111's rule) or per output
                channel (LyCORIS wd_on_out; ComfyUI's rule); `mlx_sd.lycoris.DoRA`
    scale       .scale beside any of them: A1111's calc_scale reads it in place of alpha / dim

Since "_" also occurs inside names (`to_q`, `transformer_blocks`), underscore names are never split by rule: they
are looked up in tables built from the model's own layer paths, so a name either denotes exactly one layer or is
an error. Every key of the file is consumed or the load fails naming it; networks mlx-sd does not apply (IA3,
GLoRA, OFT/BOFT, norm-layer networks) are refused by name. Torch layouts become MLX's here for LoRAs: conv downs
(r, in, kh, kw) -> (r, kh, kw, in), 1x1-conv LoRAs on layers we hold as Linear (SD1's proj_in/proj_out) are
flattened. LyCORIS factors keep the file's layout (their products mix input and kernel axes); `mlx_sd.lycoris`
transposes the rebuilt update once.

Scale: alpha / rank per layer, alpha from the `.alpha` tensor or PEFT's adapter config (`use_rslora`:
alpha / sqrt(rank)); no alpha means scale 1 (diffusers' and A1111's convention); a `.scale` tensor replaces it
(A1111). LyCORIS kinds: convert/lycoris.py.
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

from mlx_sd.lora import LoRA, LoRALayer, LoRATargets
from mlx_sd.lycoris import NetworkLayer

from .keymap import ConversionError, rename
from .ldm_unet import RESNET_LEAVES, block_table, unet_rules
from .lycoris import KIND_ROLES, dora_magnitude, fold_mid, lycoris_layer, network_kind, peft_magnitude, scalar
from .readers import open_checkpoint
from .sd3 import mmdit_rules

_SHOWN = 8
# The file's name of a network -> ours. "denoiser" (kohya's lora_unet, unprefixed diffusers keys) is the model's UNet
# or MMDiT; "unet" and "transformer" name one of the two (`_Tables.component`).
_KOHYA_PREFIXES = {"lora_unet": "denoiser", "lora_transformer": "transformer", "lora_te": "text_encoder",
                   "lora_te1": "text_encoder", "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}  # fmt: skip
# kohya/LyCORIS suffixes -> roles (`lycoris.KIND_ROLES`): LoRA's matrices, LyCORIS's tensors under their own names.
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid"}
_KOHYA_ROLES |= {role: role for roles in KIND_ROLES.values()
                 for role in sorted(roles - {"down", "up", "mid", "magnitude"})}  # fmt: skip
_KOHYA = re.compile(
    r"(lora_unet|lora_transformer|lora_te[123]?)_([^.]+)\.(" + "|".join(re.escape(r) for r in _KOHYA_ROLES) + ")"
)
_ROLES = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "lora_down.weight": "down",  # ComfyUI's dotted names (diffusion_model.joint_blocks...)
    "lora_up.weight": "up",
    "alpha": "alpha",
    "lora_magnitude_vector": "magnitude",  # PEFT's DoRA (get_peft_model_state_dict, diffusers' save_lora_weights)
}
_PREFIX = r"(?:(unet|transformer|text_encoder|text_encoder_2)\.)?"
_DIFFUSERS = re.compile(_PREFIX + r"(.+?)\.(" + "|".join(re.escape(r) for r in _ROLES) + ")")
# Attention-processor LoRAs (diffusers < 0.21): named after the attention, not the projection.
_PROCESSOR = re.compile(_PREFIX + r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_PROCESSOR_TARGETS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# Tensors of networks mlx-sd does not apply (as A1111 names them), named in the error instead of "unknown key".
_UNSUPPORTED = {
    "IA3": r"(lora_unet|lora_transformer|lora_te[123]?)_[^.]+\.(weight|on_input)",
    "GLoRA": r".*\.(a1|a2|b1|b2)\.weight",
    "OFT/BOFT": r".*\.(oft_\w+|boft_\w+)",
    "norm-layer networks": r".*\.(w_norm|b_norm)",
    "LyCORIS tensors A1111 does not read": r"(lora_unet|lora_transformer|lora_te[123]?)_[^.]+\.(hada_\w+|lokr_\w+)",
    # A1111 reads LyCORIS tensors in kohya's key layout only; PEFT's own LoHa/LoKr state dicts carry their scale in a
    # separate adapter config.
    "LyCORIS tensors under diffusers/PEFT names": r".*\.(hada_\w+|lokr_\w+|lora_mid\.weight|dora_scale|diff|diff_b)",
}
_UNSUPPORTED_KEY = {kind: re.compile(pattern) for kind, pattern in _UNSUPPORTED.items()}
PEFT_METADATA_KEY = "lora_adapter_metadata"
# Hints for "made for another family": the cross-attention key/value input width of each family's UNet.
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
# Keys only an SD3 (MMDiT) LoRA has, and keys only a UNet's has, in every dialect; for the "made for" hint.
_SD3_KEY = re.compile(
    r"transformer\.|lora_transformer_|lora_te3_|(lora_unet_|diffusion_model\.)joint_blocks|"
    r"(base_model\.model\.)?transformer_blocks\.\d+\.(attn\.add_|norm1_context|ff_context)"
)
_UNET_KEY = re.compile(
    r"unet\.|lora_unet_(down|up|mid|input|output|middle)_block|lora_te_|"
    r"(down|up|mid)_blocks?\.\d*\.?(attentions|resnets)"
)
LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass
class _Entry:
    """The tensors of one adapted layer, by role, with their source keys for messages; `named` is the file's name of
    the network (PEFT's adapter config is keyed by it: "unet", "transformer", "text_encoder", ...)."""

    keys: dict[str, str]
    named: str


def map_lora(
    state: Mapping[str, np.ndarray],
    targets: LoRATargets,
    metadata: Mapping[str, str] | None = None,
    name: str = "lora",
) -> dict[str, dict[str, NetworkLayer]]:
    """Map a LoRA state dict onto a model's layers.

    Args:
        state: key -> array as stored (torch layout).
        targets: the model's layers (`mlx_sd.lora.lora_targets(model)`).
        metadata: the safetensors header's `__metadata__` (PEFT's adapter config lives there), or None.
        name: the LoRA's name, for messages.
    Returns:
        component -> module path -> the layer's update: a LoRALayer (MLX layout, the file's dtype; bfloat16 read as
        float32), or for LyCORIS networks a LoHaLayer, LoKrLayer or FullLayer (`mlx_sd.lycoris`, the file's layout).
    Raises:
        ConversionError naming every key that is unknown, unmatched, incomplete, of a network mlx-sd does not apply
        or of the wrong shape, with the family the LoRA looks made for when it is not the model's.
    """
    tables = _Tables(targets)
    entries: dict[tuple[str, str], _Entry] = {}
    unknown, unmatched, other = [], [], {}
    for key in state:
        parsed = _parse_key(key)
        if parsed is None:
            kind = next((k for k, pattern in _UNSUPPORTED_KEY.items() if pattern.fullmatch(key)), None)
            if kind is None:
                unknown.append(key)
            else:
                other.setdefault(kind, []).append(key)
            continue
        named, module, role, naming = parsed
        component = tables.component(named)
        path = tables.resolve(component, module, naming)
        if path is None:
            unmatched.append(key)
            continue
        entry = entries.setdefault((component, path), _Entry({}, tables.peft_name(named)))
        if role in entry.keys:
            unmatched.append(f"{key} (a second {role} for {component}.{path}, after {entry.keys[role]})")
            continue
        entry.keys[role] = key

    hint = _family_hint(state, targets)
    problems = []
    if other:
        kinds = "; ".join(f"{kind}: {_summary(keys)}" for kind, keys in other.items())
        count = sum(len(keys) for keys in other.values())
        problems.append(f"{count} tensors belong to network types mlx-sd does not apply ({kinds})")
    if unknown:
        problems.append(f"{len(unknown)} keys are not LoRA keys of a known format ({_summary(unknown)})")
    if unmatched:
        problems.append(f"{len(unmatched)} keys name no layer of this model ({_summary(unmatched)})")
    kinds = {where: network_kind(set(e.keys)) for where, e in entries.items()}
    incomplete = [f"{c}.{p} has only {sorted(entries[c, p].keys)}" for (c, p), kind in kinds.items() if kind is None]
    if incomplete:
        problems.append(
            f"{len(incomplete)} layers lack a down or up matrix (or a LyCORIS network's: LoHa's four hada_w, LoKr's "
            f"lokr_w1 and lokr_w2 or their factors, full's diff) ({_summary(incomplete)})"
        )
    mixed = [f"{c}.{p}: a {kind} with {', '.join(sorted(extra))}" for (c, p), kind in kinds.items()
             if kind and (extra := set(entries[c, p].keys) - KIND_ROLES[kind])]  # fmt: skip
    if mixed:
        problems.append(f"{len(mixed)} layers hold tensors their network kind does not use ({_summary(mixed)})")
    alphas = _PeftAlphas(metadata)
    both = [f"{c}.{p}" for (c, p), e in entries.items() if {"dora_scale", "magnitude"} <= set(e.keys)]
    if both:
        problems.append(f"{len(both)} layers hold both LyCORIS's dora_scale and PEFT's lora_magnitude_vector "
                        f"({_summary(both)})")  # fmt: skip
    bare = [f"{c}.{p}" for (c, p), e in entries.items()
            if kinds[c, p] == "LoRA" and alphas.use_dora(e.named) and "magnitude" not in e.keys]  # fmt: skip
    if bare:
        problems.append(f"{len(bare)} layers of a DoRA adapter (use_dora) have no lora_magnitude_vector "
                        f"({_summary(bare)})")  # fmt: skip
    if problems:
        raise ConversionError(f"LoRA {name}: " + "; ".join(problems) + hint)
    if not entries:
        raise ConversionError(f"LoRA {name}: the file holds no LoRA tensors")

    layers: dict[str, dict[str, NetworkLayer]] = {}
    misshaped, twice = [], []
    for (component, path), entry in entries.items():
        fused = tables.fused.get(component, {}).get(path)
        shape = fused.shape if fused else targets.shapes[component][path]
        kind = kinds[component, path]
        try:
            if fused and (kind != "LoRA" or {"dora_scale", "magnitude"} & set(entry.keys)):
                what = "a LoRA with DoRA" if kind == "LoRA" else f"a {kind}"
                raise ValueError(f"Stability's fused layer takes LoRAs only, not {what} (its update cannot be split)")
            if kind != "LoRA":
                tensors = {role: state[key] for role, key in entry.keys.items()}
                updates = {path: lycoris_layer(kind, tensors, shape)}
            else:
                alpha, rslora = alphas.alpha(entry.named, path), alphas.rslora(entry.named)
                down, up, scale = _matrices(state, entry, shape, alpha, rslora)
                dora = None
                if "magnitude" in entry.keys:
                    dora = peft_magnitude(state[entry.keys["magnitude"]], shape)
                elif "dora_scale" in entry.keys:
                    dora = dora_magnitude(state[entry.keys["dora_scale"]], shape)
                down = mx.array(down)
                updates = {ours: LoRALayer(down, mx.array(np.ascontiguousarray(part)), scale, dora)
                           for ours, part in (fused.split_up(up) if fused else {path: up}).items()}  # fmt: skip
        except ValueError as error:
            misshaped.append(f"{component}.{path}: {error}")
            continue
        for ours, update in updates.items():
            if ours in layers.get(component, {}):
                twice.append(f"{component}.{ours} (from {path} and from another key)")
                continue
            layers.setdefault(component, {})[ours] = update
    if misshaped:
        count = len(misshaped)
        raise ConversionError(f"LoRA {name}: {count} layers have the wrong shape ({_summary(misshaped)}){hint}")
    if twice:
        raise ConversionError(f"LoRA {name}: {len(twice)} layers are adapted twice ({_summary(twice)})")
    return layers


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(the file's network name, module name, role, naming) of a LoRA key; naming is "underscore" or "dotted"."""
    if m := _KOHYA.fullmatch(key):
        return _KOHYA_PREFIXES[m.group(1)], m.group(2), _KOHYA_ROLES[m.group(3)], "underscore"
    if m := _PROCESSOR.fullmatch(key):
        named = m.group(1) or "denoiser"
        kind = "text" if named.startswith("text_encoder") else "unet"
        return named, f"{m.group(2)}.{_PROCESSOR_TARGETS[kind][m.group(3)]}", m.group(4), "dotted"
    if m := _DIFFUSERS.fullmatch(key):
        return m.group(1) or "denoiser", m.group(2), _ROLES[m.group(3)], "dotted"
    return None


@dataclass(frozen=True)
class _Fused:
    """A layer of Stability's MMDiT that is several (or re-ordered) layers of ours: attn.qkv -> to_q, to_k, to_v;
    the (shift, scale) modulations -> (scale, shift). Its LoRA's down is shared; `split` (convert/sd3.py's rule,
    which splits the checkpoint's weight the same way) divides the up's rows."""

    shape: tuple[int, ...]  # the fused layer's weight, MLX layout
    base: str  # the rule's renamed key; + each split suffix = our parameter
    split: object

    def split_up(self, up: np.ndarray) -> dict[str, np.ndarray]:
        return {(self.base + suffix).removesuffix(".weight"): part for suffix, part in self.split(up).items()}


class _Tables:
    """Module names of every naming -> our module paths, per component, built from the model's layers. Names of
    Stability's fused MMDiT layers resolve to themselves, with their split in `fused`."""

    def __init__(self, targets: LoRATargets):
        self.targets = targets
        self.sd3 = targets.family == "sd3"
        self._underscore: dict[str, dict[str, str]] = {}
        self.fused: dict[str, dict[str, _Fused]] = {}
        self._stability: dict[str, str] = {}  # Stability's dotted MMDiT names -> ours (or a fused name)
        for component, shapes in targets.shapes.items():
            names = {p: p for p in shapes}
            if component == "unet" and self.sd3:
                self._stability, self.fused["unet"] = _stability_mmdit_names(targets.unet_config, shapes)
                names |= self._stability
            elif component == "unet":
                names |= _original_unet_names(targets.unet_config, shapes)
            else:
                names |= {f"text_model.{p}": p for p in shapes}  # transformers' CLIPTextModel prefix
            table: dict[str, str] = {}
            for name, path in names.items():
                flat = name.replace(".", "_")
                if table.setdefault(flat, path) != path:
                    raise ConversionError(f"{component}: layers {table[flat]} and {path} are both named {flat}")
            self._underscore[component] = table

    def component(self, named: str) -> str | None:
        """Our component for the file's network name; None for the other kind of denoiser (a UNet LoRA's "unet."
        keys on SD3, an SD3 LoRA's "transformer." keys on a UNet model)."""
        if named == "denoiser":
            return "unet"
        if named in ("unet", "transformer"):
            return "unet" if (named == "transformer") == self.sd3 else None
        return named

    def peft_name(self, named: str) -> str:
        """The name PEFT's adapter config in the metadata gives the network (diffusers: "transformer" for SD3)."""
        return ("transformer" if self.sd3 else "unet") if named == "denoiser" else named

    def resolve(self, component: str | None, module: str, naming: str) -> str | None:
        shapes = self.targets.shapes.get(component)
        if shapes is None:
            return None
        if naming == "underscore":
            return self._underscore[component].get(module)
        if component != "unet":
            module = module.removeprefix("text_model.")
        elif self.sd3:
            module = module.removeprefix("base_model.model.")  # PEFT's own state dict of the transformer
            if module.startswith("diffusion_model."):  # ComfyUI: Stability's names
                return self._stability.get(module.removeprefix("diffusion_model."))
        return module if module in shapes else None


def _stability_mmdit_names(config, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, str], dict[str, _Fused]]:
    """Stability's MMDiT module names ("joint_blocks.0.x_block.attn.qkv") -> ours, renamed by convert/sd3.py's own
    rules so that LoRA names and checkpoint conversion cannot disagree; and the fused ones' splits."""
    candidates = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
                  "context_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1"]  # fmt: skip
    for i in range(config.num_layers):
        for stream in ("x_block", "context_block"):
            block = f"joint_blocks.{i}.{stream}"
            candidates += [f"{block}.{leaf}" for leaf in ("adaLN_modulation.1", "mlp.fc1", "mlp.fc2")]
            candidates += [f"{block}.{attn}.{leaf}" for attn in ("attn", "attn2") for leaf in ("qkv", "proj")]
    rules = mmdit_rules(config)
    names, fused = {}, {}
    for candidate in candidates:
        found = rename(f"{candidate}.weight", rules)
        if not found or not found[1]:
            continue
        rule, base = found
        if rule.split is None:
            if (ours := base.removesuffix(".weight")) in shapes:
                names[candidate] = ours
            continue
        parts = [(base + suffix).removesuffix(".weight") for suffix in rule.split(np.zeros((6, 1)))]
        if all(part in shapes for part in parts):  # a block without it (no attn2, no text output) has none
            first = shapes[parts[0]]
            fused[candidate] = _Fused((sum(shapes[p][0] for p in parts), *first[1:]), base, rule.split)
            names[candidate] = candidate
    return names, fused


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
    """PEFT's adapter config in the safetensors metadata: alpha per layer (`lora_alpha`, `alpha_pattern`),
    `use_rslora`, `use_dora`."""

    def __init__(self, metadata: Mapping[str, str] | None):
        self.config: dict = {}
        raw = (metadata or {}).get(PEFT_METADATA_KEY)
        if raw:
            try:
                self.config = json.loads(raw)
            except json.JSONDecodeError as error:
                raise ConversionError(f"LoRA metadata {PEFT_METADATA_KEY} is not valid JSON ({error})") from None

    def use_dora(self, component: str) -> bool:
        """True for a DoRA adapter: every layer then has a lora_magnitude_vector."""
        return bool(self.config.get(f"{component}.use_dora"))

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


def _matrices(state, entry: _Entry, target: tuple[int, ...], config_alpha: float | None,
              rslora: bool) -> tuple[np.ndarray, np.ndarray, float]:  # fmt: skip
    """(down, up, scale) of one entry in MLX layout, checked against the layer's weight shape `target`. A Tucker
    LoCon's mid is folded into its down (`lycoris.fold_mid`); its scale's rank is still lora_down's (A1111's dim)."""
    down = np.asarray(state[entry.keys["down"]])
    up = np.asarray(state[entry.keys["up"]])
    dim = down.shape[0]
    if "mid" in entry.keys:
        down = fold_mid(down, np.asarray(state[entry.keys["mid"]]))
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
    alpha = scalar(state[entry.keys["alpha"]], "alpha") if "alpha" in entry.keys else config_alpha
    scale = 1.0 if alpha is None else alpha / (math.sqrt(dim) if rslora else dim)
    if "scale" in entry.keys:  # A1111's calc_scale: the file's .scale before alpha / dim
        scale = scalar(state[entry.keys["scale"]], "scale")
    return np.ascontiguousarray(down), up, scale


def _family_hint(state: Mapping[str, np.ndarray], targets: LoRATargets) -> str:
    """ "; this LoRA is for <family> ..." when its text encoders or cross-attention width say it was made for
    another model family than `targets`' (else "")."""
    keys = list(state)
    model = f"the model is {targets.family}"
    sd3 = sum(bool(_SD3_KEY.match(k)) for k in keys)
    unet = sum(bool(_UNET_KEY.match(k)) for k in keys)
    if targets.family == "sd3":
        return f"; this LoRA is for a UNet model (SD1/SD2/SDXL: {unet} UNet keys), {model}" if unet > sd3 else ""
    if sd3 > unet:
        return f"; this LoRA is for SD3 / SD3.5 (an MMDiT: {sd3} MMDiT keys), {model}"
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
