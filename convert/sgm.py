"""SDXL single files (Stability's `sgm` layout): the conditioner's text towers and the UNet's added embedding.

    conditioner.embedders.0.transformer.text_model.*   base: OpenAI CLIP ViT-L/14 (FrozenCLIPEmbedder)
    conditioner.embedders.1.model.*                    base: OpenCLIP ViT-bigG/14 with text_projection
    conditioner.embedders.0.model.*                    refiner: OpenCLIP ViT-bigG/14 alone
    model.diffusion_model.label_emb.0.0|2              the added text-time embedding (convert/ldm_unet.py)

The rest (UNet blocks, autoencoder) is the ldm layout SD 1.x/2.x files use. Every text tower is kept whole: SDXL
reads both towers' penultimate hidden states and the pooled output after bigG's last layer (mlx_sd/conditioning.py),
which is also what the diffusers folders hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from mlx_sd.models import CLIPTextConfig, UNetConfig

from .keymap import ConversionError
from .openclip import OPENCLIP_HEAD_DIM, openclip_config

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIG_G_PREFIX = {"sdxl": "conditioner.embedders.1.model.", "sdxl-refiner": "conditioner.embedders.0.model."}
# sgm's first_stage_model carries no scale_factor tensor; SDXL's latent scale is in its yaml (sd_xl_base.yaml).
SDXL_SCALING_FACTOR = 0.13025
# Micro-conditioning numbers embedded beside the pooled text: base (original size, crop, target size) = 6;
# refiner (original size, crop, aesthetic score) = 5.
TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}


def big_g_config(family: str, shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """The bigG tower's config, every layer kept; `shapes` are the tower's keys with the prefix stripped."""
    if "text_projection" not in shapes:
        raise ConversionError(
            f"text encoder 2 ({BIG_G_PREFIX[family]}*): no text_projection; SDXL's pooled embedding needs it"
        )
    width = shapes.get("token_embedding.weight", (0, OPENCLIP_HEAD_DIM))[1]  # openclip_config names a missing key
    return openclip_config(shapes, heads=width // OPENCLIP_HEAD_DIM)


def sdxl_unet_config(config: UNetConfig, family: str, pooled_dim: int) -> UNetConfig:
    """Fill in the width each micro-conditioning number is embedded in, which shapes show only through
    label_emb's input: projection_class_embeddings_input_dim = pooled_dim + TIME_IDS[family] * width."""
    total = config.projection_class_embeddings_input_dim
    if total is None:
        raise ConversionError(
            f"unet: no model.diffusion_model.label_emb.0.0.weight; an {family} UNet has the added text-time "
            "embedding (is this an SD 1.x/2.x file? drop the family override)"
        )
    width, rest = divmod(total - pooled_dim, TIME_IDS[family])
    if rest or width <= 0:
        other = "sdxl-refiner" if family == "sdxl" else "sdxl"
        raise ConversionError(
            f"unet: label_emb takes {total} inputs, which is not the {pooled_dim}-wide pooled text plus "
            f"{TIME_IDS[family]} micro-conditioning embeddings ({family}); is this an {other} UNet?"
        )
    return replace(config, addition_time_embed_dim=width)
