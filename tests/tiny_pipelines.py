"""Tiny random-weight diffusers pipelines and their mlx-sd model folders, for end-to-end parity tests.

Every parameter is randomised (tests/oracles.py `randomize`); the VAE has four stages so it downsamples by 8 like the
real one; the tokenizer is the real CLIP vocabulary (written from mlx-sd's bundled copy, read by transformers).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import torch

from mlx_sd.components import save_component
from mlx_sd.model import MANIFEST, ModelInfo
from mlx_sd.tokenizer import CLIPTokenizer
from mlx_sd_convert.diffusers import clip_config, convert_weights, unet_config, vae_config
from mlx_sd_convert.families import family_config
from oracles import randomize, state_dict_numpy

UNETS = {
    "sd1": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=32,
        norm_num_groups=32,
        sample_size=8,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=[1, 2],
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        cross_attention_dim=64,  # 32 (CLIP-L stand-in) + 32 (bigG stand-in)
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        norm_num_groups=32,
        sample_size=8,
    ),
}


def tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    return randomize(vae, seed)


def tiny_text_encoder(seed: int, act: str = "quick_gelu", projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, vocab_size=49408,
        hidden_act=act, projection_dim=projection or 32, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return randomize(cls(cfg), seed)


def tiny_tokenizer(folder: Path, pad: str | None = None):
    from transformers import CLIPTokenizer as HFTokenizer

    CLIPTokenizer.bundled(normalization="hf").save(folder)
    kwargs = {"pad_token": pad} if pad else {}
    return HFTokenizer.from_pretrained(str(folder), model_max_length=77, **kwargs)


def tiny_components(tmp: Path, kind: str = "sd1", in_channels: int = 4, seed: int = 0) -> dict:
    """diffusers components for a tiny model of `kind` ("sd1" or "sdxl")."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = randomize(UNet2DConditionModel(in_channels=in_channels, **UNETS[kind]), seed)
    family = "sdxl" if kind == "sdxl" else "sd1"
    scheduler = EulerDiscreteScheduler.from_config(family_config(family, "scheduler"))
    parts = dict(unet=unet, vae=tiny_vae(seed + 1), scheduler=scheduler)
    parts["text_encoder"] = tiny_text_encoder(seed + 2)
    parts["tokenizer"] = tiny_tokenizer(tmp / "tok1")
    if kind == "sdxl":
        parts["text_encoder_2"] = tiny_text_encoder(seed + 3, "gelu", projection=16)
        parts["tokenizer_2"] = tiny_tokenizer(tmp / "tok2", pad="!")
    return parts


def mlx_folder(parts: dict, out: Path, family: str, **info) -> Path:
    """Write an mlx-sd model folder from diffusers components (what `mlx-sd convert` does for a folder)."""
    for name, translate in (("unet", unet_config), ("vae", vae_config)):
        cfg = translate(dict(parts[name].config))
        weights = convert_weights(name, cfg, state_dict_numpy(parts[name]))
        save_component(out / name, cfg, {k: mx.array(v) for k, v in weights.items()})
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        if enc not in parts:
            continue
        model = parts[enc]
        cfg = clip_config(model.config.to_dict(), with_projection=hasattr(model, "text_projection"))
        weights = convert_weights(enc, cfg, state_dict_numpy(model))
        save_component(out / enc, cfg, {k: mx.array(v) for k, v in weights.items()})
        parts[tok].save_pretrained(out / tok)
        CLIPTokenizer.from_folder(out / tok, normalization="hf").save(out / tok)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(parts["scheduler"].config).items() if not k.startswith("_")}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    prediction = config.get("prediction_type", "epsilon")
    (out / MANIFEST).write_text(ModelInfo(family=family, prediction_type=prediction, name="tiny", **info).to_json())
    return out
