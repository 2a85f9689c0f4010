"""CLIP image tower (transformers' CLIPVisionModelWithProjection): the image encoder IP-Adapters condition on.

Reference: Dosovitskiy et al. 2021 (ViT) as used by Radford et al. 2021 (CLIP). Patches of the image are embedded by
a strided convolution, a class token is prepended, learned positions added; pre-LayerNorm, the same encoder layers as
the text tower (mlx_sd/models/clip.py), then the class token's state, LayerNormed and projected, is the image
embedding. Parameter paths follow transformers without its `vision_model.` prefix (`embeddings.patch_embedding`,
`pre_layrnorm` (sic), `encoder.layers.0.self_attn.q_proj`, `post_layernorm`, `visual_projection`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .clip import CLIPEncoder
from .layers import LayerNorm

# CLIP's image normalisation (transformers' CLIPImageProcessor defaults, OpenAI's training statistics)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """An image tower; the IP-Adapter encoders are OpenCLIP ViT-H/14 (1280 wide, 32 layers, 1024-d embedding) and
    ViT-bigG/14 (1664 wide, 48 layers, 1280-d), at 224x224 pixels in 14-pixel patches, with exact GELU."""

    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_hidden_layers: int = 32
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = mx.zeros((cfg.hidden_size,))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def __call__(self, pixels: mx.array) -> mx.array:
        patches = self.patch_embedding(pixels)  # (B, H/p, W/p, D)
        B, D = patches.shape[0], patches.shape[-1]
        tokens = patches.reshape(B, -1, D)  # (B, N, D), row by row as torch's flatten(2)
        cls = mx.broadcast_to(self.class_embedding.astype(tokens.dtype), (B, 1, D))
        return mx.concatenate([cls, tokens], axis=1) + self.position_embedding.weight


class CLIPVisionModelWithProjection(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.visual_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, pixels: mx.array) -> mx.array:
        """(B, image_size, image_size, 3) normalised pixels -> (B, projection_dim) image embeddings."""
        x = self.hidden_state(pixels, self.config.num_hidden_layers)
        return self.visual_projection(self.post_layernorm(x[:, 0]))

    def hidden_state(self, pixels: mx.array, layers: int) -> mx.array:
        """(B, 1 + patches, hidden_size): the tokens after the first `layers` encoder layers (transformers'
        hidden_states[layers]; IP-Adapter Plus reads the penultimate, hidden_states[-2])."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in self.encoder.layers[:layers]:
            x = layer(x, None)
        return x
