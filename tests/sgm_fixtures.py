"""Tiny SDXL base and refiner checkpoints in the ORIGINAL single-file layout (Stability's `sgm` code).

The original SDXL code (`sgm`, Stability-AI/generative-models) is not on PyPI, so these files are written from
tiny random-weight diffusers/transformers models by an inverse key map kept here, in the tests, apart from the
converter's maps. `test_sdxl_convert.py` proves this writer independently: diffusers' own single-file loader
(`StableDiffusionXL*Pipeline.from_single_file`, offline with a local diffusers config folder) reads the written
file back into weights identical to the models it was written from.

Layout of an sgm checkpoint (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0.safetensors):

    model.diffusion_model.*                          UNet (openaimodel numbering; label_emb.0.0|2 = add_embedding)
    first_stage_model.*                              KL autoencoder (ldm's encoder/decoder numbering)
    conditioner.embedders.0.transformer.text_model.* base: OpenAI CLIP ViT-L as transformers 4.x saved it
    conditioner.embedders.1.model.*                  base: OpenCLIP ViT-bigG (fused in_proj, text_projection (W, P))
    conditioner.embedders.0.model.*                  refiner: OpenCLIP ViT-bigG only

Sizes: 64-channel attention heads everywhere (as the real models; shapes cannot show head counts), so the text
towers are 64 (1 head) and 128 (2 heads) wide and the UNet's attention stages 128 channels wide (2 heads).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from mlx_sd.tokenizer import CLIPTokenizer
from oracles import randomize

CLIP_L = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
              hidden_act="quick_gelu")  # fmt: skip
BIG_G = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu",
             projection_dim=96)  # fmt: skip
TIME_DIM = 8  # addition_time_embed_dim (256 in the real models)
SDXL_SCALING = 0.13025

UNETS = {
    # SDXL base layout: no attention in stage 0, deeper transformers later, context = CLIP-L + bigG widths,
    # added embedding input = pooled + 6 micro-conditioning numbers x TIME_DIM.
    "base": dict(
        block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=[1, 2],
        attention_head_dim=[1, 2],
        cross_attention_dim=CLIP_L["hidden_size"] + BIG_G["hidden_size"],
        projection_class_embeddings_input_dim=BIG_G["projection_dim"] + 6 * TIME_DIM,
    ),
    # SDXL refiner layout: attention only in the middle stages, context = bigG, 5 numbers (aesthetic score).
    "refiner": dict(
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        transformer_layers_per_block=2,
        attention_head_dim=[1, 2, 2],
        cross_attention_dim=BIG_G["hidden_size"],
        projection_class_embeddings_input_dim=BIG_G["projection_dim"] + 5 * TIME_DIM,
    ),
}
TINY_VAE = dict(
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    scaling_factor=SDXL_SCALING,
    force_upcast=True,
)


# --- the diffusers side -------------------------------------------------------------------------------------


@functools.cache
def diffusers_parts(kind: str, seed: int = 0, in_channels: int = 4) -> dict:
    """Tiny random diffusers components of an SDXL `kind` ("base" or "refiner"), tokenizers and scheduler too;
    `in_channels` 8 makes an InstructPix2Pix UNet (latents + the image to edit)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mlx_sd_convert.families import family_config

    common = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=2)  # the legacy id hub folders carry
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **UNETS[kind], use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        norm_num_groups=32, sample_size=16, in_channels=in_channels, out_channels=4,
    )  # fmt: skip
    parts = {
        "unet": randomize(unet, seed),
        "vae": randomize(AutoencoderKL(**TINY_VAE, sample_size=64), seed + 1),
        "text_encoder_2": randomize(CLIPTextModelWithProjection(CLIPTextConfig(**BIG_G, **common)), seed + 3),
        "tokenizer_2": _hf_tokenizer("!"),
        "scheduler": EulerDiscreteScheduler.from_config(family_config("sdxl", "scheduler")),
    }
    if kind == "base":
        parts["text_encoder"] = randomize(CLIPTextModel(CLIPTextConfig(**CLIP_L, **common)), seed + 2)
        parts["tokenizer"] = _hf_tokenizer("<|endoftext|>")
    else:
        parts["text_encoder"] = parts["tokenizer"] = None
    return parts


@functools.cache
def _hf_tokenizer(pad_token: str):
    """A transformers CLIPTokenizer over the real CLIP vocabulary, padding as the SDXL folders do."""
    import tempfile

    from transformers import CLIPTokenizer as HFTokenizer

    with tempfile.TemporaryDirectory(prefix="mlx-sd-sgm-tok-") as tmp:  # read into memory, then removed
        CLIPTokenizer.bundled(normalization="hf").save(tmp)
        (Path(tmp) / "config.json").unlink()
        return HFTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=77)


def diffusers_pipeline(kind: str, parts: dict | None = None):
    """The StableDiffusionXL(Img2Img)Pipeline of `parts` (the refiner's flags as its published model_index.json)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    parts = parts or diffusers_parts(kind)
    if kind == "base":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    return StableDiffusionXLImg2ImgPipeline(**parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)


def write_diffusers_folder(folder: Path, kind: str) -> Path:
    """The tiny model as a diffusers folder (model_index.json with the pipeline's flags, safetensors)."""
    diffusers_pipeline(kind).save_pretrained(folder)
    return folder


# --- the original layout ----------------------------------------------------------------------------------

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}  # fmt: skip


_UNET_FIXED = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}


def _unet_key(key: str, config) -> str:
    """diffusers UNet2DConditionModel key -> openaimodel.UNetModel key."""
    L = config.layers_per_block
    for ours, theirs in _UNET_FIXED.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    parts = key.split(".")

    def resnet(rest):
        leaf = ".".join(rest)
        for d, o in _RESNET.items():
            if leaf.startswith(d + "."):
                return o + leaf[len(d) :]
        raise KeyError(key)

    if parts[0] == "down_blocks":
        s, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{1 + s * (L + 1) + L}.0.op." + ".".join(parts[5:])
        j = int(parts[3])
        block = f"input_blocks.{1 + s * (L + 1) + j}"
        return f"{block}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{block}.1." + ".".join(parts[4:])
    if parts[0] == "mid_block":
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{parts[1]}.{parts[2]}"]
        rest = resnet(parts[3:]) if parts[1] == "resnets" else ".".join(parts[3:])
        return f"middle_block.{index}.{rest}"
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        has_attention = config.up_block_types[i] == "CrossAttnUpBlock2D"
        if kind == "upsamplers":
            return f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
        block = f"output_blocks.{i * (L + 1) + int(parts[3])}"
        return f"{block}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{block}.1." + ".".join(parts[4:])
    raise KeyError(key)


_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key(key: str, n: int) -> str:
    """diffusers AutoencoderKL key -> ldm's Encoder/Decoder key (the decoder's up blocks numbered in reverse)."""
    for d, o in (("conv_norm_out.", "norm_out."),):
        key = key.replace(d, o)
    parts = key.split(".")
    side = parts[0]
    if parts[1] in ("down_blocks", "up_blocks"):
        i = int(parts[2]) if parts[1] == "down_blocks" else n - 1 - int(parts[2])
        level = "down" if parts[1] == "down_blocks" else "up"
        if parts[3] == "resnets":
            leaf = _VAE_RESNET.get(parts[5], parts[5])
            return f"{side}.{level}.{i}.block.{parts[4]}.{leaf}.{parts[6]}"
        sampler = "downsample" if level == "down" else "upsample"
        return f"{side}.{level}.{i}.{sampler}.conv.{parts[-1]}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"{side}.mid.block_{int(parts[3]) + 1}.{_VAE_RESNET.get(parts[4], parts[4])}.{parts[5]}"
        inner = ".".join(parts[4:-1])
        return f"{side}.mid.attn_1.{_VAE_ATTENTION[inner]}.{parts[-1]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def _openclip(state: dict[str, np.ndarray], concat=np.concatenate) -> dict[str, np.ndarray]:
    """transformers CLIPTextModelWithProjection keys -> open_clip's text tower (fused in_proj, (W, P) projection)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
        "logit_scale": np.array(4.6052, np.float32),  # CLIP's contrastive temperature, stored in the real files
    }
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for suffix in ("weight", "bias"):
            out[dst + f"attn.in_proj_{suffix}"] = concat(
                [state.pop(src + f"self_attn.{p}_proj.{suffix}") for p in "qkv"]
            )
            out[dst + f"attn.out_proj.{suffix}"] = state.pop(src + f"self_attn.out_proj.{suffix}")
            out[dst + f"ln_1.{suffix}"] = state.pop(src + f"layer_norm1.{suffix}")
            out[dst + f"ln_2.{suffix}"] = state.pop(src + f"layer_norm2.{suffix}")
            out[dst + f"mlp.c_fc.{suffix}"] = state.pop(src + f"mlp.fc1.{suffix}")
            out[dst + f"mlp.c_proj.{suffix}"] = state.pop(src + f"mlp.fc2.{suffix}")
    state.pop("embeddings.position_ids", None)
    assert not state, f"unmapped bigG tensors: {sorted(state)}"
    return out


def _numpy(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def sgm_state(kind: str, parts: dict | None = None, tensors=None, concat=np.concatenate) -> dict[str, np.ndarray]:
    """The original single-file state dict of the tiny model `kind` ("base" or "refiner"), or of `parts`.

    `tensors(module) -> {key: array}` reads a module (default: a numpy copy of its state dict); with `concat` it
    lets `full_size_file` work on zero-strided stand-ins of meta-device modules.
    """
    parts = parts or diffusers_parts(kind)
    tensors = tensors or _numpy
    unet, vae = parts["unet"], parts["vae"]
    state = {f"model.diffusion_model.{_unet_key(k, unet.config)}": v for k, v in tensors(unet).items()}
    n = len(vae.config.block_out_channels)
    for key, value in tensors(vae).items():
        target = _vae_key(key, n)
        if ".mid.attn_1." in target and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convolutions
        state[f"first_stage_model.{target}"] = value
    big_g = _openclip(tensors(parts["text_encoder_2"]), concat)
    if kind == "base":
        clip = tensors(parts["text_encoder"])
        clip = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.items()}
        # transformers 4.x (which wrote the published files) kept the int64 position_ids buffer.
        clip["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
        state.update({f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.items()})
        state.update({f"conditioner.embedders.1.model.{k}": v for k, v in big_g.items()})
    else:
        state.update({f"conditioner.embedders.0.model.{k}": v for k, v in big_g.items()})
    return state


def full_size_file(kind: str) -> dict[str, np.ndarray]:
    """A full-size SDXL base or refiner 1.0 single file (the published configs, built on the meta device); every
    tensor a zero-strided stand-in of its shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mlx_sd_convert.families import family_config

    family = "sdxl" if kind == "base" else "sdxl-refiner"
    with torch.device("meta"):
        parts = {
            "unet": UNet2DConditionModel(**family_config(family, "unet")),
            "vae": AutoencoderKL(**family_config(family, "vae")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**family_config(family, "text_encoder_2"))),
        }
        if kind == "base":
            parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**family_config(family, "text_encoder")))

    def stand_in(shape):
        return np.broadcast_to(np.float32(0), tuple(shape))

    def shapes(module):
        return {k: stand_in(v.shape) for k, v in module.state_dict().items()}

    def concat(arrays):
        return stand_in((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]))

    return sgm_state(kind, parts, tensors=shapes, concat=concat)


def write_single_file(path: Path, kind: str, parts: dict | None = None, metadata: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    state = {k: np.ascontiguousarray(v) for k, v in sgm_state(kind, parts).items()}
    save_file(state, str(path), metadata=metadata)
    return path


def from_single_file(path: Path, kind: str, config_folder: Path):
    """diffusers' own reading of an original-layout SDXL file (offline: configs from a local diffusers folder)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "base" else StableDiffusionXLImg2ImgPipeline
    return cls.from_single_file(str(path), config=str(config_folder), local_files_only=True)


def model_index(folder: Path) -> dict:
    return json.loads((folder / "model_index.json").read_text())
