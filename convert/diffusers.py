"""diffusers / transformers components -> mlx_sd configs and weights.

Our parameter names are diffusers' names, so the key maps below list only the exceptions. The config
translators accept exactly the architectures mlx_sd implements and name any setting that would change the
network, instead of converting it into something silently different.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from mlx_sd.components import build, kind_of, parameter_shapes
from mlx_sd.models import CLIPTextConfig, MMDiTConfig, T5Config, UNetConfig, VAEConfig

from .keymap import ConversionError, Rule, apply_rules

# Config keys that describe the file or training, not the network.
_INFORMATIONAL = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_commit_hash",
    "_use_default_values",
    "sample_size",
    "dropout",
    "architectures",
    "transformers_version",
    "model_type",
    "torch_dtype",
    "dtype",
    "attention_dropout",
    "initializer_factor",
    "initializer_range",
    "bos_token_id",
    "pad_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "tie_word_embeddings",
    "use_return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "prefix",
    "task_specific_params",
    "add_cross_attention",
    "tokenizer_class",
    "_attn_implementation_autoset",
    "_attn_implementation",
}


def _check_settings(component: str, config: Mapping, required: Mapping, understood: set[str]) -> None:
    """Raise if a setting that changes the network differs from what mlx_sd implements, or is unknown."""
    wrong = [f"{k}={config[k]!r} (supported: {v!r})" for k, v in required.items() if k in config and config[k] != v]
    unknown = sorted(set(config) - set(required) - understood - _INFORMATIONAL)
    if wrong or unknown:
        parts = []
        if wrong:
            parts.append("unsupported settings " + ", ".join(wrong))
        if unknown:
            parts.append(f"unknown settings {unknown}")
        raise ConversionError(f"{component}: " + "; ".join(parts) + "; this architecture is not supported by mlx-sd")


def _per_stage(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,) * n


# --- UNet -------------------------------------------------------------------------------------------------

_UNET_REQUIRED = {
    "center_input_sample": False,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
_UNET_UNDERSTOOD = {
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "time_cond_proj_dim",
    "addition_embed_type_num_heads",
    # Layout only: SD1's 1x1-conv projections become linears at conversion.
    "use_linear_projection",
    # Softmax runs in float32 in every attention kernel mlx_sd uses, which is what upcasting asks for.
    "upcast_attention",
}
_DOWN_TYPES = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_TYPES = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


def unet_config(config: Mapping) -> UNetConfig:
    """Translate a diffusers UNet2DConditionModel config.json."""
    _check_settings("unet", config, _UNET_REQUIRED, _UNET_UNDERSTOOD)
    chans = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    n = len(chans)
    down = config.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
    up = config.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    if any(t not in _DOWN_TYPES for t in down) or any(t not in _UP_TYPES for t in up):
        raise ConversionError(f"unet: unsupported block types {list(down)} / {list(up)}")
    has_attn = [_DOWN_TYPES[t] for t in down]
    if [_UP_TYPES[t] for t in up] != has_attn[::-1]:
        raise ConversionError(f"unet: up blocks {list(up)} do not mirror down blocks {list(down)}")
    if isinstance(config.get("layers_per_block", 2), list | tuple):
        raise ConversionError("unet: per-stage layers_per_block is not supported")
    if isinstance(config.get("cross_attention_dim", 1280), list | tuple):
        raise ConversionError("unet: per-stage cross_attention_dim is not supported")
    layers = _per_stage(config.get("transformer_layers_per_block", 1), n)
    if any(isinstance(v, list | tuple) for v in layers):
        raise ConversionError("unet: per-layer transformer depths are not supported")
    # diffusers' quirk: SD configs store the number of heads in `attention_head_dim` and leave
    # `num_attention_heads` unset (SD1: 8 heads everywhere; SD2/SDXL: per stage, 64 channels each).
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    additions = config.get("addition_embed_type")
    if additions not in (None, "text_time"):
        raise ConversionError(f"unet: addition_embed_type={additions!r} is not supported")
    return UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_out_channels=chans,
        layers_per_block=config.get("layers_per_block", 2),
        transformer_depth=tuple(d if a else 0 for d, a in zip(layers, has_attn)),
        num_heads=_per_stage(heads, n),
        mid_transformer_depth=layers[-1],
        cross_attention_dim=config.get("cross_attention_dim", 1280),
        norm_num_groups=config.get("norm_num_groups", 32),
        norm_eps=config.get("norm_eps", 1e-5),
        flip_sin_to_cos=config.get("flip_sin_to_cos", True),
        freq_shift=config.get("freq_shift", 0),
        addition_time_embed_dim=config.get("addition_time_embed_dim") if additions else None,
        projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim")
        if additions
        else None,
        time_cond_proj_dim=config.get("time_cond_proj_dim"),
    )


UNET_RULES = [Rule(r"(.+)", r"\1")]


# --- VAE --------------------------------------------------------------------------------------------------

_VAE_REQUIRED = {
    "act_fn": "silu",
    "mid_block_add_attention": True,
}
_VAE_UNDERSTOOD = {
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "latent_channels",
    "norm_num_groups",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "latents_mean",  # per-channel latent statistics (Playground v2.5), with latents_std
    "latents_std",
    # The pipeline keeps the VAE in float32 by default, which is what force_upcast asks for.
    "force_upcast",
}


def vae_config(config: Mapping) -> VAEConfig:
    """Translate a diffusers AutoencoderKL config.json."""
    _check_settings("vae", config, _VAE_REQUIRED, _VAE_UNDERSTOOD)
    chans = tuple(config.get("block_out_channels", (64,)))
    down = config.get("down_block_types", ("DownEncoderBlock2D",))
    up = config.get("up_block_types", ("UpDecoderBlock2D",))
    if set(down) != {"DownEncoderBlock2D"} or set(up) != {"UpDecoderBlock2D"} or len(down) != len(chans):
        raise ConversionError(f"vae: unsupported block types {list(down)} / {list(up)}")
    return VAEConfig(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=chans,
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        scaling_factor=config.get("scaling_factor", 0.18215),
        shift_factor=config.get("shift_factor") or 0.0,
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
        latents_mean=_statistics(config, "latents_mean"),
        latents_std=_statistics(config, "latents_std"),
    )


def _statistics(config: Mapping, key: str) -> tuple[float, ...] | None:
    """A VAE's per-channel latent mean or std: one number per latent channel, both or neither."""
    value, other = config.get(key), config.get("latents_std" if key == "latents_mean" else "latents_mean")
    if value is None and other is None:
        return None
    channels = config.get("latent_channels", 4)
    ok = all(isinstance(v, list) and len(v) == channels and all(isinstance(x, int | float) for x in v)
             for v in (value, other))  # fmt: skip
    if not ok or 0 in config["latents_std"]:
        raise ConversionError(
            f"vae/config.json: latents_mean and latents_std must both be lists of {channels} numbers (std nonzero), "
            f"got {config.get('latents_mean')!r} and {config.get('latents_std')!r}"
        )
    return tuple(float(x) for x in value)


VAE_RULES = [
    # diffusers before 0.14 named the mid-block attention query/key/value/proj_attn; hub folders still carry it.
    Rule(r"(.+\.attentions\.0)\.query\.(weight|bias)", r"\1.to_q.\2"),
    Rule(r"(.+\.attentions\.0)\.key\.(weight|bias)", r"\1.to_k.\2"),
    Rule(r"(.+\.attentions\.0)\.value\.(weight|bias)", r"\1.to_v.\2"),
    Rule(r"(.+\.attentions\.0)\.proj_attn\.(weight|bias)", r"\1.to_out.0.\2"),
    Rule(r"(.+)", r"\1"),
]


# --- CLIP text encoders -----------------------------------------------------------------------------------

_CLIP_REQUIRED = {"attention_bias": True}
_CLIP_UNDERSTOOD = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "projection_dim",
    "eos_token_id",
}
# A legacy transformers config value: eos_token_id=2 means "pool at argmax(input_ids)" (see CLIPTextConfig).
_LEGACY_EOS_ID = 2


def clip_config(config: Mapping, with_projection: bool) -> CLIPTextConfig:
    """Translate a transformers CLIPTextConfig (as saved in a diffusers `text_encoder*/config.json`)."""
    config = dict(config.get("text_config", config))
    _check_settings("text_encoder", config, _CLIP_REQUIRED, _CLIP_UNDERSTOOD)
    act = config.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ConversionError(f"text_encoder: hidden_act={act!r} is not supported (quick_gelu, gelu)")
    eos = config.get("eos_token_id", 49407)
    return CLIPTextConfig(
        vocab_size=config.get("vocab_size", 49408),
        max_position_embeddings=config.get("max_position_embeddings", 77),
        hidden_size=config.get("hidden_size", 512),
        intermediate_size=config.get("intermediate_size", 2048),
        num_hidden_layers=config.get("num_hidden_layers", 12),
        num_attention_heads=config.get("num_attention_heads", 8),
        hidden_act=act,
        layer_norm_eps=config.get("layer_norm_eps", 1e-5),
        projection_dim=config.get("projection_dim", 512) if with_projection else None,
        eos_token_id=49407 if eos == _LEGACY_EOS_ID else eos,
        pooling="argmax" if eos == _LEGACY_EOS_ID else "eos",
    )


CLIP_RULES = [
    Rule(r"(?:text_model\.)?embeddings\.position_ids", None, "int64 position buffer, not a parameter"),
    # transformers >= 5.6 saves CLIPTextModel without the `text_model.` prefix; hub folders have it.
    Rule(r"text_model\.(.+)", r"\1"),
    Rule(r"(.+)", r"\1"),
]


# --- MMDiT (SD3 / SD3.5 transformer) ----------------------------------------------------------------------

MMDIT_SETTINGS = {
    "patch_size",
    "in_channels",
    "num_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "caption_projection_dim",
    "pooled_projection_dim",
    "out_channels",
    "pos_embed_max_size",
    "dual_attention_layers",
    "qk_norm",
}


def mmdit_config(config: Mapping) -> MMDiTConfig:
    """Translate a diffusers SD3Transformer2DModel config.json (`transformer/config.json`)."""
    _check_settings("transformer", config, {}, MMDIT_SETTINGS)
    defaults = MMDiTConfig()
    values = {k: config[k] for k in MMDIT_SETTINGS | {"sample_size"} if k in config}
    if values.get("out_channels", 0) is None:  # diffusers: None means in_channels
        values["out_channels"] = values.get("in_channels", defaults.in_channels)
    if values.get("pos_embed_max_size", 0) is None:
        raise ConversionError("transformer: pos_embed_max_size=None (interpolated positions) is not supported")
    values["dual_attention_layers"] = tuple(values.get("dual_attention_layers", ()))
    if values.get("qk_norm") not in (None, "rms_norm"):
        raise ConversionError(f"transformer: unsupported settings qk_norm={values['qk_norm']!r} (supported: rms_norm)")
    try:
        return MMDiTConfig(**values)
    except ValueError as e:
        raise ConversionError(f"transformer: {e}") from e


# pos_embed.pos_embed is a persistent buffer in diffusers, a parameter here: every key loads by name.
MMDIT_RULES = [Rule(r"(.+)", r"\1")]


# --- T5 text encoder (SD3's text_encoder_3) ---------------------------------------------------------------

_T5_REQUIRED = {"is_decoder": False}
_T5_UNDERSTOOD = {
    "vocab_size",
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "relative_attention_num_buckets",
    "relative_attention_max_distance",
    "layer_norm_epsilon",
    # transformers derives these two from feed_forward_proj; t5_config checks that they agree with it.
    "feed_forward_proj",
    "dense_act_fn",
    "is_gated_act",
    # The decoder's and generation's settings, and training ones: the encoder alone never reads them.
    "num_decoder_layers",
    "decoder_start_token_id",
    "eos_token_id",
    "use_cache",
    "output_past",
    "scale_decoder_outputs",
    "dropout_rate",
    "classifier_dropout",
    "gradient_checkpointing",
    # The pre-training length in old T5 configs: T5 has no absolute positions, so no table depends on it.
    "n_positions",
}
# (is_gated_act, dense_act_fn) -> our feed_forward_proj. transformers spells T5 v1.1's "gated-gelu" as gelu_new
# (the tanh approximation) gated.
_T5_FEED_FORWARD = {(True, "gelu_new"): "gated-gelu", (False, "relu"): "relu"}


def t5_config(config: Mapping) -> T5Config:
    """Translate a transformers T5Config (a diffusers SD3 folder's `text_encoder_3/config.json`) for the encoder."""
    _check_settings("text_encoder_3", config, _T5_REQUIRED, _T5_UNDERSTOOD)
    proj = config.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    derived = (parts[0] == "gated" and len(parts) == 2, "gelu_new" if proj == "gated-gelu" else parts[-1])
    stored = (config.get("is_gated_act", derived[0]), config.get("dense_act_fn", derived[1]))
    if stored != derived or derived not in _T5_FEED_FORWARD:
        raise ConversionError(
            f"text_encoder_3: unsupported settings feed_forward_proj={proj!r} (is_gated_act={stored[0]!r}, "
            f"dense_act_fn={stored[1]!r}) (supported: 'gated-gelu' as in T5 v1.1 and SD3, 'relu' as in T5)"
        )
    return T5Config(
        vocab_size=config.get("vocab_size", 32128),
        d_model=config.get("d_model", 512),
        d_kv=config.get("d_kv", 64),
        d_ff=config.get("d_ff", 2048),
        num_layers=config.get("num_layers", 6),
        num_heads=config.get("num_heads", 8),
        relative_attention_num_buckets=config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=config.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
        feed_forward_proj=_T5_FEED_FORWARD[derived],
    )


_T5_NOT_ENCODER = [
    Rule(r"decoder\..+", None, "T5's decoder: SD3 conditions on the encoder's states alone"),
    Rule(r"lm_head\.weight", None, "T5's language-model head: SD3 conditions on the encoder's states alone"),
]
# transformers ties `encoder.embed_tokens` to `shared`; its save_pretrained writes `shared.weight` alone (5.x), older
# files may hold both. `t5_rules` picks the map for files that hold only the encoder's copy.
T5_RULES = [
    Rule(r"encoder\.embed_tokens\.weight", None, "the same tensor as shared.weight (tied embeddings)"),
    *_T5_NOT_ENCODER,
    Rule(r"(.+)", r"\1"),
]
_T5_ENCODER_EMBED_RULES = [
    Rule(r"encoder\.embed_tokens\.weight", "shared.weight"),
    *_T5_NOT_ENCODER,
    Rule(r"(.+)", r"\1"),
]


def t5_rules(keys: Iterable[str]) -> list[Rule]:
    """The T5 key map for a checkpoint with these keys: T5_RULES, or, without `shared.weight`, a map that loads the
    tied embedding from `encoder.embed_tokens.weight`."""
    return T5_RULES if "shared.weight" in set(keys) else _T5_ENCODER_EMBED_RULES


# --- one component ----------------------------------------------------------------------------------------

RULES = {"unet": UNET_RULES, "vae": VAE_RULES, "clip_text": CLIP_RULES, "mmdit": MMDIT_RULES, "t5_text": T5_RULES}


def convert_weights(
    component: str, config, state_dict: Mapping[str, np.ndarray], rules=None, hint: str = ""
) -> dict[str, np.ndarray]:
    """Map a diffusers-named state dict onto the mlx_sd model for `config` (strict, MLX layout)."""
    rules = RULES[kind_of(config)] if rules is None else rules
    return apply_rules(component, state_dict, rules, parameter_shapes(build(config)), hint)
