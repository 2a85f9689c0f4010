"""Published IP-Adapters and their CLIP image encoders -> a loaded `mlx_sd.ip_adapter.IPAdapter`, read at run time.

An IP-Adapter file (h94/IP-Adapter's `ip-adapter_sd15.safetensors`, `ip-adapter_sdxl_vit-h.safetensors`, or the
`.bin` pickles) holds `image_proj.*` (the projection of the image embedding to tokens) and `ip_adapter.{1,3,5,...}.
to_k_ip/to_v_ip.weight`, one pair per cross-attention layer of the UNet, numbered as diffusers orders its attention
processors. IP-Adapter Plus files (`ip-adapter-plus_sd15`, `ip-adapter-plus-face_sd15`, `ip-adapter-plus_sdxl_vit-h`)
hold a Resampler instead of the plain projection (`image_proj.latents`, `proj_in`, `layers.{i}.0` perceiver attention,
`layers.{i}.1` feed-forward, `proj_out`, `norm_out`), named here as in the original code. The image encoder is a
transformers CLIPVisionModelWithProjection folder (config.json + model.safetensors, the repository's
`models/image_encoder` or `sdxl_models/image_encoder`). The architecture is read from the shapes and the encoder's
config; both are mapped strictly. FaceID and full-face variants (face embeddings, an MLP projection) are refused by
name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from mlx_sd.ip_adapter import IPAdapter, IPAdapterModel
from mlx_sd.models.clip_vision import CLIPVisionConfig, CLIPVisionModelWithProjection

from .controlnet import a1111_hash
from .diffusers import _check_settings
from .keymap import ConversionError, Rule, load_mapped, tensor_shapes
from .readers import open_checkpoint

_LAYER = re.compile(r"ip_adapter\.(\d+)\.to_k_ip\.weight")
_ENCODER_FILES = ("model.safetensors", "pytorch_model.bin", "model.fp16.safetensors")
_ENCODER_SETTINGS = {
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
    "projection_dim", "hidden_act", "layer_norm_eps", "num_channels",
}  # fmt: skip
_ENCODER_INFORMATIONAL = {"attention_dropout", "dropout", "initializer_factor", "initializer_range", "model_type",
                          "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path"}  # fmt: skip
ENCODER_RULES = [
    Rule(r"(?:vision_model\.)?embeddings\.position_ids", None, "int64 position buffer, not a parameter"),
    Rule(r"vision_model\.(.+)", r"\1"),
    Rule(r"(visual_projection\.weight)", r"\1"),
]


def read_ip_adapter(path: str | Path, image_encoder: str | Path, dtype: mx.Dtype | None = None) -> IPAdapter:
    """Read an IP-Adapter file and its image encoder folder (module docstring).

    Raises:
        ConversionError naming what does not fit, or the variant that is not supported.
    """
    from mlx_sd.backend import default_dtype

    dtype = dtype or default_dtype()
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path}: no such IP-Adapter file")
    state = open_checkpoint(path)
    shapes = tensor_shapes(state)
    model = IPAdapterModel(**_architecture(path, shapes))
    rules = [
        Rule(r"image_proj\.(.+)", r"image_proj.\1"),  # our names are the published ones
        *(Rule(rf"ip_adapter\.{n}\.(to_[kv]_ip)\.weight", rf"layers.{i}.\1.weight")
          for i, n in enumerate(_layer_numbers(shapes))),
    ]  # fmt: skip
    load_mapped("ip_adapter", model, state, rules, dtype, shapes=shapes)
    return IPAdapter(model, read_image_encoder(image_encoder, dtype), path.stem, a1111_hash(path))


def read_image_encoder(folder: str | Path, dtype: mx.Dtype | None = None) -> CLIPVisionModelWithProjection:
    """A transformers CLIPVisionModelWithProjection folder (config.json + weights), loaded."""
    folder = Path(folder).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(
            f"{folder}: no config.json; the image encoder is a transformers folder, e.g. h94/IP-Adapter's "
            "models/image_encoder (SD 1.5, ViT-H) or sdxl_models/image_encoder (ViT-bigG)"
        )
    data = json.loads(config_path.read_text())
    data = data.get("vision_config", data)
    settings = {k: v for k, v in data.items() if k not in _ENCODER_INFORMATIONAL}
    _check_settings("image_encoder", settings, {}, _ENCODER_SETTINGS)
    if settings.get("hidden_act", "quick_gelu") not in ("gelu", "quick_gelu"):
        raise ConversionError(f"image_encoder: hidden_act={settings['hidden_act']!r} is not supported")
    config = CLIPVisionConfig(**{"hidden_act": "quick_gelu", **settings})  # transformers' default activation
    weights = next((folder / n for n in _ENCODER_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise ConversionError(f"{folder}: none of {', '.join(_ENCODER_FILES)} found")
    model = CLIPVisionModelWithProjection(config)
    return load_mapped("image_encoder", model, open_checkpoint(weights), ENCODER_RULES, dtype)


def _layer_numbers(shapes) -> list[int]:
    """The file's numbers of the UNet's cross-attention layers (1, 3, 5, ...), in order."""
    return sorted(int(m.group(1)) for k in shapes if (m := _LAYER.fullmatch(k)))


def _architecture(path: Path, shapes: dict) -> dict:
    layers = _layer_numbers(shapes)
    inners = [shapes[f"ip_adapter.{n}.to_k_ip.weight"][0] for n in layers]
    if "image_proj.latents" in shapes:  # IP-Adapter Plus: a Resampler
        if "image_proj.layers.0.0.to_q.weight" not in shapes or not layers:
            raise ConversionError(f"{path.name}: an IP-Adapter Plus without its resampler layers or UNet layers")
        _, tokens, hidden = shapes["image_proj.latents"]
        depth = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("image_proj.layers."))
        resampler = {"hidden": hidden, "inner": shapes["image_proj.layers.0.0.to_q.weight"][0], "depth": depth,
                     "ffn": shapes["image_proj.layers.0.1.1.weight"][0]}  # fmt: skip
        embed_dim = shapes["image_proj.proj_in.weight"][1]
        dim = shapes["image_proj.proj_out.weight"][0]
        return {"embed_dim": embed_dim, "dim": dim, "tokens": tokens, "inners": inners, "resampler": resampler}
    if "image_proj.proj.weight" not in shapes or "image_proj.norm.weight" not in shapes:
        faceid = any("perceiver" in k or "lora" in k for k in shapes)
        what = "an IP-Adapter FaceID" if faceid else "no IP-Adapter (no image_proj.proj / image_proj.norm tensors)"
        raise ConversionError(f"{path.name}: {what}; mlx-sd runs the plain IP-Adapters")
    out, embed_dim = shapes["image_proj.proj.weight"]
    dim = shapes["image_proj.norm.weight"][0]
    if not layers or out % dim:
        raise ConversionError(f"{path.name}: image_proj.proj {out}x{embed_dim} does not make tokens of width {dim}")
    return {"embed_dim": embed_dim, "dim": dim, "tokens": out // dim, "inners": inners}
