"""The published model families as data: the diffusers configs their hub folders carry.

Used for single-file checkpoints (which carry no configs), to cross-check what was inferred from tensor shapes, and
by the full-size tests and benchmarks to build random-weight models of the real sizes. Values are copied from the
`config.json` / `scheduler_config.json` files of the public diffusers folders (SD 1.5, SD 2.1, SDXL 1.0 base and
refiner, SDXL-Turbo's scheduler, SD3 medium, SD3.5 large and medium).
"""

from __future__ import annotations

import copy

from mlx_sd.schedules import FAMILY_SCHEDULER_CONFIGS

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
# SD3 / SD3.5 (stabilityai/stable-diffusion-3-medium-diffusers, stable-diffusion-3.5-large, -3.5-medium): an MMDiT
# over 16-channel latents, conditioned on CLIP-L and bigG (both with projections: pooled = 768 + 1280 = 2048) and the
# T5 v1.1 XXL encoder (4096 wide, also the MMDiT's context width: the CLIP states are zero-padded to it).
_SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
SD3_TRANSFORMERS: dict[str, dict] = {
    "sd3-medium": _SD3_MEDIUM,
    "sd3.5-large": {
        **_SD3_MEDIUM,
        "num_layers": 38,
        "num_attention_heads": 38,
        "caption_projection_dim": 2432,
        "qk_norm": "rms_norm",
    },
    # SD3.5 medium (MMDiT-X): a second, image-only attention in its first 13 blocks, and a 384-patch position table.
    "sd3.5-medium": {
        **_SD3_MEDIUM,
        "pos_embed_max_size": 384,
        "qk_norm": "rms_norm",
        "dual_attention_layers": list(range(13)),
    },
}
# Where each release's diffusers folder is published (single files name it when they cannot be converted alone).
SD3_REPOS = {
    "sd3-medium": "stabilityai/stable-diffusion-3-medium-diffusers",
    "sd3.5-large": "stabilityai/stable-diffusion-3.5-large",
    "sd3.5-medium": "stabilityai/stable-diffusion-3.5-medium",
}
FAMILIES["sd3"] = {
    "transformer": _SD3_MEDIUM,
    "vae": {
        **_VAE,
        "latent_channels": 16,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "force_upcast": True,
    },
    "text_encoder": _CLIP_L,  # CLIPTextModelWithProjection
    "text_encoder_2": FAMILIES["sdxl"]["text_encoder_2"],  # CLIPTextModelWithProjection
    # google/t5-v1_1-xxl's encoder (T5EncoderModel).
    "text_encoder_3": {
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
    },
    # FlowMatchEulerDiscreteScheduler, shift 3.0 (all three releases); it has no prediction_type: rectified flow.
    "scheduler": FAMILY_SCHEDULER_CONFIGS["sd3"],
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
    "sd3": (("text_encoder", "tokenizer", 49407), ("text_encoder_2", "tokenizer_2", 0)),
}
# SD3's third text encoder (T5) and its tokenizer folders. Optional: without it diffusers' SD3 pipeline conditions on
# zeros in T5's place (as a folder whose model_index.json lists text_encoder_3 as null, or a file without t5xxl).
T5_TOWER = ("text_encoder_3", "tokenizer_3")

# A family's published scheduler assumes its published prediction type. Where a model of the family predicts the
# other one, the config of the folder published for that combination is used instead: SD 2.x 512-base and
# inpainting models (epsilon) ship PNDM, the same config as SD 1.5.
# EDM SDXL models (mlx_sd/schedules.py), as published. Playground v2.5's scheduler_config.json
# (playgroundai/playground-v2.5-1024px-aesthetic); CosXL's is diffusers' documented recipe (EDM v-prediction,
# sigma_data 1, exponential sigmas), its sigma range read from the file's markers.
PLAYGROUND_SCHEDULER = {
    "_class_name": "EDMDPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "sigma_schedule": "karras",
    "prediction_type": "epsilon",
    "rho": 7.0,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "thresholding": False,
}
COSXL_SCHEDULER = {
    "_class_name": "EDMEulerScheduler",
    "num_train_timesteps": 1000,
    "sigma_min": 0.002,
    "sigma_max": 120.0,
    "sigma_data": 1.0,
    "sigma_schedule": "exponential",
    "prediction_type": "v_prediction",
}
# Playground v2.5's latents: per-channel statistics and scale (its vae/config.json; ComfyUI's SDXL_Playground_2_5).
PLAYGROUND_LATENTS = {
    "scaling_factor": 0.5,
    "latents_mean": (-1.6574, 1.886, -1.383, 2.5155),
    "latents_std": (8.4927, 5.9022, 6.5498, 5.2299),
}

_SCHEDULER_FOR = {("sd2", "epsilon"): "sd1"}


def scheduler_config(family: str, prediction_type: str, kind: str = "standard") -> dict:
    """The diffusers scheduler config to publish with a `family` model that predicts `prediction_type`
    (`kind` "turbo": the Turbo scheduler, whatever the family)."""
    if kind == "turbo" and family != "sd3":
        config = copy.deepcopy(TURBO_SCHEDULER)
    else:
        config = family_config(_SCHEDULER_FOR.get((family, prediction_type), family), "scheduler")
    if family != "sd3":  # FlowMatchEulerDiscreteScheduler has no prediction_type: it is always rectified flow
        config["prediction_type"] = prediction_type
    return config
