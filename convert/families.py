"""The published model families as data: the diffusers configs their hub folders carry.

Used for single-file checkpoints (which carry no configs), to cross-check what was inferred from tensor shapes, and
by the full-size tests and benchmarks to build random-weight models of the real sizes. Values are copied from the
`config.json` / `scheduler_config.json` files of the public diffusers folders (SD 1.5, SD 2.1, SDXL 1.0 base and
refiner, SDXL-Turbo's scheduler).
"""

from __future__ import annotations

import copy

_SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
}

_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

_CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 0,
    "eos_token_id": 2,  # the legacy value the SD1.5 and SDXL folders carry (argmax pooling)
    "pad_token_id": 1,
}

_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

FAMILIES: dict[str, dict] = {
    "sd1": {
        "unet": {**_SD_UNET, "attention_head_dim": 8, "cross_attention_dim": 768},
        "vae": _VAE,
        "text_encoder": _CLIP_L,
        "scheduler": {
            "_class_name": "PNDMScheduler",
            **_SD_SCHEDULE,
            "skip_prk_steps": True,
            "set_alpha_to_one": False,
            "prediction_type": "epsilon",
        },
        "default_size": 512,
    },
    "sd2": {
        "unet": {
            **_SD_UNET,
            "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024,
            "use_linear_projection": True,
            "upcast_attention": True,
        },
        "vae": _VAE,
        # OpenCLIP ViT-H/14 as diffusers stores it: 23 of its 24 blocks (SD2 conditions on the penultimate layer).
        "text_encoder": {
            **_CLIP_L,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 23,
            "num_attention_heads": 16,
            "hidden_act": "gelu",
            "projection_dim": 512,
        },
        # SD 2.1 (768-v): v-prediction, DDIM. SD 2.1-base differs only in prediction_type="epsilon" and 512 px.
        "scheduler": {
            "_class_name": "DDIMScheduler",
            **_SD_SCHEDULE,
            "clip_sample": False,
            "set_alpha_to_one": False,
            "prediction_type": "v_prediction",
        },
        "default_size": 768,
    },
    "sdxl": {
        "unet": {
            **_SD_UNET,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": {**_VAE, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": _CLIP_L,
        # OpenCLIP ViT-bigG/14 with its projection.
        "text_encoder_2": {
            **_CLIP_L,
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
        "scheduler": {
            "_class_name": "EulerDiscreteScheduler",
            **_SD_SCHEDULE,
            "timestep_spacing": "leading",
            "interpolation_type": "linear",
            "use_karras_sigmas": False,
            "prediction_type": "epsilon",
        },
        "default_size": 1024,
    },
}
# SDXL refiner 1.0: its own widths (384-channel stage 0, attention only in the two middle stages, 4 transformer
# blocks each), conditioned on bigG alone (1280 context) and 5 micro-conditioning numbers (aesthetic score):
# 2560 = 1280 pooled + 5 x 256.
FAMILIES["sdxl-refiner"] = {
    "unet": {
        **FAMILIES["sdxl"]["unet"],
        "block_out_channels": [384, 768, 1536, 1536],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": 4,
        "attention_head_dim": [6, 12, 24, 24],
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,
    },
    "vae": FAMILIES["sdxl"]["vae"],
    "text_encoder_2": FAMILIES["sdxl"]["text_encoder_2"],
    "scheduler": FAMILIES["sdxl"]["scheduler"],
    "default_size": 1024,
}
# SD-Turbo and SDXL-Turbo were distilled for a few "trailing" steps of Euler ancestral (stabilityai/sdxl-turbo's
# scheduler_config.json); single files carry no scheduler, so Turbo files get this one.
TURBO_SCHEDULER = {
    "_class_name": "EulerAncestralDiscreteScheduler",
    **_SD_SCHEDULE,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}


def family_config(family: str, component: str) -> dict:
    """A deep copy of one published component config, e.g. family_config("sd2", "unet")."""
    try:
        return copy.deepcopy(FAMILIES[family][component])
    except KeyError as e:
        raise KeyError(f"no {component!r} config for family {family!r}; families: {sorted(FAMILIES)}") from e


# Each family's text towers as converted folders hold them: (encoder folder, tokenizer folder, pad id). SD1's CLIP-L
# pads with eos (49407); OpenCLIP towers (SD2, SDXL's second) pad with id 0, as open_clip and the published
# tokenizer folders (pad_token "!") do.
TEXT_TOWERS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "sd1": (("text_encoder", "tokenizer", 49407),),
    "sd2": (("text_encoder", "tokenizer", 0),),
    "sdxl": (("text_encoder", "tokenizer", 49407), ("text_encoder_2", "tokenizer_2", 0)),
    "sdxl-refiner": (("text_encoder_2", "tokenizer_2", 0),),
}

# A family's published scheduler assumes its published prediction type. Where a model of the family predicts the
# other one, the config of the folder published for that combination is used instead: SD 2.x 512-base and
# inpainting models (epsilon) ship PNDM, the same config as SD 1.5.
_SCHEDULER_FOR = {("sd2", "epsilon"): "sd1"}


def scheduler_config(family: str, prediction_type: str, kind: str = "standard") -> dict:
    """The diffusers scheduler config to publish with a `family` model that predicts `prediction_type`
    (`kind` "turbo": the Turbo scheduler, whatever the family)."""
    if kind == "turbo":
        config = copy.deepcopy(TURBO_SCHEDULER)
    else:
        config = family_config(_SCHEDULER_FOR.get((family, prediction_type), family), "scheduler")
    config["prediction_type"] = prediction_type
    return config
