"""Published ControlNets -> a loaded `mlx_sd.controlnet.ControlNet`, read at run time like a LoRA.

Three layouts are in the field, all read strictly (every tensor mapped or dropped for a stated reason):

- a diffusers folder (`config.json` + `diffusion_pytorch_model[.fp16].safetensors` or `.bin`), e.g.
  lllyasviel/control_v11p_sd15_canny or diffusers/controlnet-canny-sdxl-1.0;
- an original ("cldm") file, as A1111 users download them (control_v11p_sd15_canny.pth, control_sd15_canny.pth,
  the fp16 .safetensors prunes): the UNet encoder in `ldm` names (`input_blocks.*`, `middle_block.*`, `time_embed.*`)
  plus `input_hint_block.*` (the image embedding), `zero_convs.*` and `middle_block_out.*`, with or without a
  `control_model.` prefix (ControlNet 1.0's files bundle the SD model they were trained with: only the tensors under
  the prefix are read);
- a diffusers-named single file (SDXL ControlNets are often shared so), whose config is read from its shapes;
- a Control-LoRA (Stability's SDXL control-lora files: the original names, the UNet encoder's layers as low-rank
  updates of the model's own): `convert/control_lora.py`, bound to the model's UNet when it runs;
- a diffusers SD3ControlNetModel folder (InstantX's SD3 ControlNets, diffusers' conversions of Stability's SD3.5 large
  ones), our names being diffusers'; or an SD3 ControlNet file: Stability's `sd3.5_large_controlnet_*.safetensors`
  (fused `attn.qkv`, `mlp.fc1/fc2`, `adaLN_modulation.1` in otherwise diffusers names: diffusers'
  scripts/convert_sd3_controlnet_to_diffusers.py as a table) or a diffusers-named one. A file's architecture comes
  from its shapes (64 channels per head, as every SD3 network); no shape tells whether the network takes a zero
  pooled vector and unshifted latents (`force_zeros_for_pooled_projection`): joint networks (InstantX's) do,
  image-only ones (Stability's) do not, as their diffusers configs say.

The architecture comes from shapes where no config.json exists: widths and depths from the tensors, the head count
from the family (768-wide cross-attention: SD 1.x, 8 heads; otherwise 64 channels per head), as for checkpoints
(convert/ldm_unet.py). Only ControlNet 1.1 "shuffle" averages its residuals (`global_pool_conditions`), which no shape
shows: a file whose name says "shuffle" is taken for one, as A1111's extension does with its yaml files.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.controlnet import ControlNet
from mlx_sd.models import ControlNetConfig, ControlNetModel, SD3ControlNetConfig, SD3ControlNetModel, UNetConfig
from mlx_sd.models.t2i_adapter import ADAPTER_TYPES, T2IAdapter, T2IAdapterConfig

from .control_lora import is_control_lora, read_control_lora
from .diffusers import MMDIT_SETTINGS, ConversionError, _check_settings, unet_config
from .keymap import Rule, load_mapped, tensor_shapes
from .ldm_unet import HEAD_CHANNELS, SD1_HEADS, unet_config_from_shapes, unet_rules
from .readers import open_checkpoint

# what `mlx-sd convert` says when given one
USE_AS_IT_IS = (
    "a ControlNet, used as it is: mlx-sd generate --controlnet PATH IMAGE (or --controlnet-dir); nothing to convert"
)
CONTROLNET_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
SD1_CONTEXT = 768  # CLIP ViT-L/14's width: SD 1.x's cross-attention
SDXL_TIME_EMBED = 256  # SDXL's addition_time_embed_dim (its yaml's adm embedding per micro-conditioning number)
CONTROL_PREFIX = "control_model."
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)
_CONTROLNET_KEYS = {
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order",
    "global_pool_conditions",
}


def _read_adapter(path: Path, state, shapes: dict, config: T2IAdapterConfig | None, dtype, name) -> ControlNet:
    """A T2I-Adapter (folder, diffusers-named or original TencentARC file) as a unit's model."""
    if config is None:
        config = adapter_config_from_shapes(path, shapes)
    model = T2IAdapter(config)
    rules = ADAPTER_RULES if any(k.startswith("adapter.") for k in shapes) else original_adapter_rules(config)
    hint = f"{path.name} does not fit the {config.adapter_type} its shapes describe; the file may be damaged"
    load_mapped("t2i_adapter", model, state, rules, dtype, hint, shapes)
    if path.is_dir():
        return ControlNet(model, name or path.name)
    return ControlNet(model, name or path.stem, a1111_hash(path))


def read_controlnet(path: str | Path, dtype: mx.Dtype | None = None, name: str | None = None) -> ControlNet:
    """Read a ControlNet file or diffusers folder (module docstring) into a loaded `ControlNet`.

    Args:
        path: the folder or file.
        dtype: the weights' dtype (default: the backend's, mlx_sd.backend.default_dtype()).
        name: the display name (default: the file's stem or the folder's name).
    Raises:
        ConversionError naming what does not fit.
    """
    from mlx_sd.backend import default_dtype

    path = Path(path).expanduser()
    dtype = dtype or default_dtype()
    if path.is_dir() and _class_name(path) == "T2IAdapter":
        data, state = _folder_parts(path)
        return _read_adapter(path, state, tensor_shapes(state), adapter_config(data), dtype, name)
    if path.is_dir() and _class_name(path) == SD3_CLASS:
        data, state = _folder_parts(path)
        model = SD3ControlNetModel(sd3_controlnet_config(data))
        hint = f"{path.name} does not fit the SD3 ControlNet its config.json describes; the weights may be damaged"
        load_mapped("sd3_controlnet", model, state, CONTROLNET_RULES, dtype, hint)
        return ControlNet(model, name or path.name)
    if path.is_file():
        state = open_checkpoint(path)
        shapes = tensor_shapes(state)
        if _is_adapter(shapes):
            return _read_adapter(path, state, shapes, None, dtype, name)
        if is_control_lora(shapes):
            return read_control_lora(path, state, shapes, dtype, name or path.stem, a1111_hash(path))
        if SD3_MARKER in shapes:
            model = SD3ControlNetModel(sd3_controlnet_config_from_shapes(shapes))
            load_mapped("sd3_controlnet", model, state, SD3_FILE_RULES, dtype, _hint(path), shapes)
            return ControlNet(model, name or path.stem, a1111_hash(path))
    if path.is_dir():
        config, state = _folder(path)
        title, short = name or path.name, ""
    elif path.is_file():
        state = open_checkpoint(path)
        if any(k.startswith(CONTROL_PREFIX) for k in state):
            state = _Prefixed(state, CONTROL_PREFIX)
        config = _single_file_config(path, tensor_shapes(state))
        title, short = name or path.stem, a1111_hash(path)
    else:
        raise ConversionError(f"{path}: no such ControlNet file or folder")
    if 0 in config.num_heads:
        raise ConversionError(
            f"{path.name}: widths {config.block_out_channels} take no 64-channel attention heads, so this is no "
            "published SD 2.x/SDXL ControlNet; read it from a diffusers folder, whose config.json sets the heads"
        )
    shapes = tensor_shapes(state)
    model = ControlNetModel(config)
    keys = CONTROLNET_RULES if _diffusers_named(shapes) else ldm_rules(config)
    load_mapped("controlnet", model, state, keys, dtype, _hint(path), shapes)  # a 1.4 GB .pth never held twice
    return ControlNet(model, title, short)


def a1111_hash(path: Path) -> str:
    """The 8-hex-digit hash A1111's ControlNet extension shows beside a model's name ("control_v11p_sd15_canny
    [d14c016b]"): sha256 of the 64 KiB at offset 1 MiB (A1111's legacy model hash)."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


# --- diffusers ------------------------------------------------------------------------------------------------


def controlnet_config(config: Mapping) -> ControlNetConfig:
    """Translate a diffusers ControlNetModel config.json."""
    config = dict(config)
    extra = {k: config.pop(k) for k in _CONTROLNET_KEYS if k in config}
    _check_settings("controlnet", extra, {"conditioning_channels": 3}, _CONTROLNET_KEYS)
    order = extra.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise ConversionError(f"controlnet: controlnet_conditioning_channel_order={order!r} (rgb or bgr)")
    down = config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
    # a ControlNet has no up path; the UNet translator checks the down path against its mirror image
    unet = unet_config({**config, "up_block_types": [mirror.get(t, t) for t in reversed(down)]})
    return ControlNetConfig(
        **asdict(unet),
        conditioning_embedding_out_channels=tuple(extra.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
        global_pool_conditions=bool(extra.get("global_pool_conditions", False)),
        conditioning_channel_order=order,
    )


CONTROLNET_RULES = [Rule(r"(.+)", r"\1")]  # our names are diffusers' (SD3 ControlNets' too)


def _split_qkv(param: str):
    """A fused (3 * inner, ...) attention projection -> to_q, to_k, to_v."""
    names = ("to_q", "to_k", "to_v")
    return lambda value: {f"{n}.{param}": part for n, part in zip(names, np.split(value, 3, axis=0), strict=True)}


SD3_CLASS = "SD3ControlNetModel"
# the MMDiT's settings (sample_size, out_channels and caption_projection_dim informational), and the ControlNet's own
_SD3_UNDERSTOOD = MMDIT_SETTINGS | {"sample_size", "extra_conditioning_channels", "pos_embed_type", "use_pos_embed",
                                    "force_zeros_for_pooled_projection"}  # fmt: skip


def sd3_controlnet_config(config: Mapping) -> SD3ControlNetConfig:
    """Translate a diffusers SD3ControlNetModel config.json."""
    settings = {k: v for k, v in config.items() if not k.startswith("_")}
    _check_settings("sd3_controlnet", settings, {}, _SD3_UNDERSTOOD)
    if settings.pop("pos_embed_type", "sincos") != "sincos" and settings.get("use_pos_embed", True):
        raise ConversionError("sd3_controlnet: pos_embed_type other than 'sincos' is not supported")
    if settings.get("use_pos_embed", True) and settings.get("pos_embed_max_size", 96) is None:
        raise ConversionError("sd3_controlnet: pos_embed_max_size=None (interpolated positions) is not supported")
    if settings.get("qk_norm") not in (None, "rms_norm"):
        raise ConversionError(f"sd3_controlnet: qk_norm={settings['qk_norm']!r} is not supported (rms_norm)")
    cfg = SD3ControlNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    if cfg.joint and cfg.caption_projection_dim != cfg.inner_dim:
        raise ConversionError(f"sd3_controlnet: caption_projection_dim {cfg.caption_projection_dim} must equal "
                              f"num_attention_heads x attention_head_dim = {cfg.inner_dim}")  # fmt: skip
    return cfg


SD3_MARKER = "pos_embed_input.proj.weight"  # an SD3 ControlNet's control-latent embedding
SD3_HEAD_CHANNELS = 64
_STABILITY = r"transformer_blocks\.(\d+)"
SD3_FILE_RULES = [
    *(
        Rule(rf"{_STABILITY}\.attn\.qkv\.{p}", r"transformer_blocks.\1.attn.", split=_split_qkv(p))
        for p in ("weight", "bias")
    ),  # fmt: skip
    Rule(rf"{_STABILITY}\.attn\.proj\.(weight|bias)", r"transformer_blocks.\1.attn.to_out.0.\2"),
    Rule(rf"{_STABILITY}\.mlp\.fc1\.(weight|bias)", r"transformer_blocks.\1.ff.net.0.proj.\2"),
    Rule(rf"{_STABILITY}\.mlp\.fc2\.(weight|bias)", r"transformer_blocks.\1.ff.net.2.\2"),
    Rule(rf"{_STABILITY}\.adaLN_modulation\.1\.(weight|bias)", r"transformer_blocks.\1.norm1.linear.\2"),
    *CONTROLNET_RULES,
]


def sd3_controlnet_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> SD3ControlNetConfig:
    """An SD3 ControlNet file's architecture (module docstring)."""
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("controlnet_blocks."))
    dim, cin, p, _ = shapes[SD3_MARKER]
    joint = shapes.get("context_embedder.weight")
    table = shapes.get("pos_embed.pos_embed")
    in_channels = shapes["pos_embed.proj.weight"][1] if "pos_embed.proj.weight" in shapes else cin
    return SD3ControlNetConfig(
        patch_size=p,
        in_channels=in_channels,
        num_layers=layers,
        attention_head_dim=SD3_HEAD_CHANNELS,
        num_attention_heads=dim // SD3_HEAD_CHANNELS,
        joint_attention_dim=None if joint is None else joint[1],
        caption_projection_dim=dim,
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        pos_embed_max_size=None if table is None else round(table[1] ** 0.5),
        extra_conditioning_channels=cin - in_channels,
        use_pos_embed="pos_embed.proj.weight" in shapes,
        qk_norm="rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in shapes else None,
        force_zeros_for_pooled_projection=joint is not None,
    )


def is_control_config(path: Path) -> bool:
    """A diffusers config.json of a ControlNet or a T2I-Adapter (both run as ControlNet units)."""
    text = path.read_text("utf-8", errors="replace")
    return any(f'"{name}"' in text for name in ("ControlNetModel", "T2IAdapter", SD3_CLASS))


def _class_name(folder: Path) -> str | None:
    config_path = folder / "config.json"
    return json.loads(config_path.read_text()).get("_class_name") if config_path.is_file() else None


def _folder_parts(folder: Path) -> tuple[dict, Mapping]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder}: no config.json; a diffusers ControlNet folder has config.json and weights")
    weights = next((folder / n for n in _WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder}: none of {', '.join(_WEIGHT_FILES)} found")
    return json.loads(config_path.read_text()), open_checkpoint(weights)


def _folder(folder: Path) -> tuple[ControlNetConfig, Mapping]:
    data, state = _folder_parts(folder)
    if data.get("_class_name", "ControlNetModel") != "ControlNetModel":
        raise ConversionError(f"{folder}: config.json describes a {data['_class_name']}, not a ControlNetModel")
    return controlnet_config(data), state


# --- single files -----------------------------------------------------------------------------------------------


def _single_file_config(path: Path, shapes: Mapping[str, tuple[int, ...]]) -> ControlNetConfig:
    if "input_hint_block.0.weight" not in shapes and "controlnet_cond_embedding.conv_in.weight" not in shapes:
        lora = any(".lora_" in k or "lora_unet" in k for k in shapes)
        why = "a LoRA (use it with --lora or <lora:...>)" if lora else "no ControlNet"
        raise ConversionError(f"{path.name}: {why} (no input_hint_block / controlnet_cond_embedding tensors)")
    shuffle = "shuffle" in path.name.lower()
    if _diffusers_named(shapes):
        return _config_from_diffusers_shapes(shapes, shuffle)
    unet = unet_config_from_shapes(shapes, encoder_only=True, **_heads(shapes, "input_blocks."))
    if unet.projection_class_embeddings_input_dim is not None:
        unet = UNetConfig(**{**asdict(unet), "addition_time_embed_dim": SDXL_TIME_EMBED})
    hint = [shapes[f"input_hint_block.{i}.weight"] for i in range(0, 64, 2) if f"input_hint_block.{i}.weight" in shapes]
    # convs 0, 2, ..., 2k: conv_in, (same, strided) per further stage, conv_out; a stage's width is its strided conv's
    stages = [hint[0][0]] + [hint[i][0] for i in range(2, len(hint) - 1, 2)]
    return ControlNetConfig(
        **asdict(unet),
        conditioning_channels=hint[0][1],
        conditioning_embedding_out_channels=tuple(stages),
        global_pool_conditions=shuffle,
    )


def ldm_rules(config: ControlNetConfig) -> list[Rule]:
    """The original layout's key map: the UNet encoder's rules plus the ControlNet's own blocks."""
    # a Sequential of convs and SiLUs: conv_in at 0, then (conv, strided conv) per further stage, conv_out
    n_hint = 4 * len(config.conditioning_embedding_out_channels) - 2  # conv_out's index
    rules = [
        Rule(r"zero_convs\.(\d+)\.0\.(weight|bias)", r"controlnet_down_blocks.\1.\2"),
        Rule(r"middle_block_out\.0\.(weight|bias)", r"controlnet_mid_block.\1"),
        Rule(r"input_hint_block\.0\.(weight|bias)", r"controlnet_cond_embedding.conv_in.\1"),
        Rule(rf"input_hint_block\.{n_hint}\.(weight|bias)", r"controlnet_cond_embedding.conv_out.\1"),
        *(
            Rule(rf"input_hint_block\.{2 * (j + 1)}\.(weight|bias)", rf"controlnet_cond_embedding.blocks.{j}.\1")
            for j in range(n_hint // 2 - 1)
        ),
    ]
    return rules + unet_rules(config)


def _diffusers_named(shapes) -> bool:
    return "controlnet_cond_embedding.conv_in.weight" in shapes


def _heads(shapes: Mapping, blocks: str) -> dict:
    """The family's head rule (module docstring), from the cross-attention's context width."""
    context = next((v[1] for k, v in shapes.items() if k.startswith(blocks) and k.endswith("attn2.to_k.weight")), None)
    return {"num_heads": SD1_HEADS} if context == SD1_CONTEXT else {"head_channels": HEAD_CHANNELS}


def _config_from_diffusers_shapes(shapes: Mapping, shuffle: bool) -> ControlNetConfig:
    """A diffusers-named ControlNet's config, from its shapes (a single file without config.json)."""

    def count(pattern: str) -> int:
        regex = re.compile(pattern)
        found = {int(m.group(1)) for k in shapes if (m := regex.match(k))}
        return 1 + max(found) if found else 0

    n = count(r"down_blocks\.(\d+)\.")
    layers = count(r"down_blocks\.0\.resnets\.(\d+)\.")
    chans = tuple(shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    depth = tuple(count(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.") for i in range(n))
    heads = _heads(shapes, "down_blocks.")
    context = next(v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight"))
    added = shapes.get("add_embedding.linear_1.weight")
    guidance = shapes.get("time_embedding.cond_proj.weight")
    n_blocks = count(r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    embed = shapes["controlnet_cond_embedding.conv_in.weight"]
    return ControlNetConfig(
        in_channels=shapes["conv_in.weight"][1],
        block_out_channels=chans,
        layers_per_block=layers,
        transformer_depth=depth,
        num_heads=(heads["num_heads"],) * n if "num_heads" in heads else tuple(c // HEAD_CHANNELS for c in chans),
        mid_transformer_depth=count(r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\."),
        cross_attention_dim=context,
        addition_time_embed_dim=None if added is None else SDXL_TIME_EMBED,
        projection_class_embeddings_input_dim=None if added is None else added[1],
        time_cond_proj_dim=None if guidance is None else guidance[1],
        conditioning_channels=embed[1],
        conditioning_embedding_out_channels=(embed[0],)
        + tuple(shapes[f"controlnet_cond_embedding.blocks.{j}.weight"][0] for j in range(1, n_blocks, 2)),
        global_pool_conditions=shuffle,
    )


def _hint(path: Path) -> str:
    return (
        f"{path.name} does not fit a ControlNet of the architecture its shapes describe; is it a ControlNet "
        "(not a T2I-Adapter, Control-LoRA or IP-Adapter)?"
    )


class _Prefixed(Mapping):
    """The tensors of a checkpoint under `prefix`, without it; the others (a bundled SD model) are left out."""

    def __init__(self, source, prefix: str):
        self._source, self._prefix = source, prefix
        self._keys = [k[len(prefix) :] for k in source if k.startswith(prefix)]

    def __getitem__(self, key: str):
        return self._source[self._prefix + key]

    def info(self, key: str):
        return self._source.info(self._prefix + key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


# --- T2I-Adapters -----------------------------------------------------------------------------------------------

ADAPTER_RULES = [Rule(r"adapter\.(.+)", r"\1")]  # diffusers' names, under its `adapter.` prefix
_ADAPTER_KEYS = {"in_channels", "channels", "num_res_blocks", "downscale_factor", "adapter_type"}


def adapter_config(data: Mapping) -> T2IAdapterConfig:
    """Translate a diffusers T2IAdapter config.json."""
    settings = {k: v for k, v in data.items() if not k.startswith("_")}
    _check_settings("t2i_adapter", settings, {}, _ADAPTER_KEYS)
    if settings.get("adapter_type", "full_adapter") not in ADAPTER_TYPES:
        raise ConversionError(f"t2i_adapter: adapter_type={settings['adapter_type']!r} (supported: {ADAPTER_TYPES})")
    return T2IAdapterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})


def _is_adapter(shapes: Mapping) -> bool:
    names = [k.removeprefix("adapter.") for k in shapes]
    return any(k.startswith("body.") for k in names) and not any(k.startswith("input_blocks.") for k in names)


def adapter_config_from_shapes(path: Path, shapes: Mapping) -> T2IAdapterConfig:
    """A T2I-Adapter's architecture from its shapes, diffusers-named or in TencentARC's original names (full adapters:
    `body.{2s+j}` for resnet j of stage s; light adapters: `body.{s}.body.{j}`)."""
    names = {k.removeprefix("adapter."): v for k, v in shapes.items()}
    if any(k.endswith(".skep.weight") for k in names) or any("style" in k or "transformer" in k for k in names):
        raise ConversionError(f"{path.name}: a style adapter or an early T2I-Adapter with skip convolutions; "
                              "mlx-sd runs the full, full-XL and light adapters")  # fmt: skip
    light = "conv_in.weight" not in names
    cin = names["body.0.in_conv.weight"][1] if light else names["conv_in.weight"][1]
    factor = 16 if cin % 256 == 0 and cin // 256 in (1, 3) else 8
    stages = sorted({int(k.split(".")[1]) for k in names if k.startswith("body.")})
    if light or any(".resnets." in k for k in names):  # one body entry per stage
        width = "out_conv.weight" if light else "resnets.0.block1.weight"
        chans = [names[f"body.{s}.{width}"][0] for s in stages]
        chans = chans[:-1] if light else chans  # a light adapter's last block repeats the last width
        inner = "resnets" if any(".resnets." in k for k in names) else "body"
        blocks = len({k.split(".")[3] for k in names if k.startswith(f"body.0.{inner}.")})
    else:  # TencentARC's full adapter: a flat list of resnets, two per stage
        blocks = ORIGINAL_BLOCKS
        chans = [names[f"body.{s * blocks}.block1.weight"][0] for s in range(len(stages) // blocks)]
    kind = "light_adapter" if light else "full_adapter_xl" if factor == 16 else "full_adapter"
    return T2IAdapterConfig(in_channels=cin // factor**2, channels=tuple(chans), num_res_blocks=blocks,
                            downscale_factor=factor, adapter_type=kind)  # fmt: skip


ORIGINAL_BLOCKS = 2  # TencentARC's full adapters have two resnets per stage


def original_adapter_rules(config: T2IAdapterConfig) -> list[Rule]:
    """TencentARC's original names -> ours (diffusers' scripts/convert_original_t2iadapter.py, as a table)."""
    if config.adapter_type == "light_adapter":
        return [Rule(r"body\.(\d+)\.body\.(\d+)\.(block[12])\.(weight|bias)", r"body.\1.resnets.\2.\3.\4"),
                Rule(r"body\.(\d+)\.(in_conv|out_conv)\.(weight|bias)", r"body.\1.\2.\3")]  # fmt: skip
    n = config.num_res_blocks
    rules = [Rule(r"conv_in\.(weight|bias)", r"conv_in.\1")]
    for s in range(len(config.channels)):
        for j in range(n):
            rules.append(Rule(rf"body\.{s * n + j}\.(block[12])\.(weight|bias)", rf"body.{s}.resnets.{j}.\1.\2"))
        rules.append(Rule(rf"body\.{s * n}\.in_conv\.(weight|bias)", rf"body.{s}.in_conv.\1"))
    return rules
