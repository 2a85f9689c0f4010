"""CLIP text towers: OpenAI ViT-L/14 (SD1, SDXL encoder 1), OpenCLIP ViT-H/14 (SD2), ViT-bigG/14 (SDXL encoder 2).

Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
Parameter paths follow transformers' CLIPTextModel without its `text_model.` prefix
(`encoder.layers.0.self_attn.q_proj`); OpenCLIP checkpoints are renamed to these by the converter.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..attention import attention
from .layers import ACTIVATIONS, LayerNorm, linear, linear_plus


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # None: no projection head. SDXL's bigG encoder projects the pooled embedding to 1280.
    projection_dim: int | None = None
    eos_token_id: int = 49407
    # "argmax" pools at the highest token id, as OpenAI/OpenCLIP code and transformers configs with the legacy
    # eos_token_id=2 do; "eos" pools at the first eos_token_id. They differ only when added tokens (textual
    # inversion) carry ids above eos.
    pooling: str = "argmax"


@dataclass
class CLIPOutput:
    """Everything SD pipelines read from a text tower.

    hidden_states: [embeddings, after layer 1, ..., after layer N], each (B, T, D), no final LayerNorm.
    last_hidden_state: final_layer_norm(hidden_states[-1]), (B, T, D).
    pooled: last_hidden_state at the pooling position, (B, D).
    text_embeds: pooled projected by `text_projection`, (B, projection_dim), or None.
    """

    hidden_states: list[mx.array]
    last_hidden_state: mx.array
    pooled: mx.array
    text_embeds: mx.array | None


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask, residual: mx.array) -> mx.array:
        """residual + the attention's output."""
        q, k, v = (linear(p, x) for p in (self.q_proj, self.k_proj, self.v_proj))
        return linear_plus(self.out_proj, attention(q, k, v, self.heads, mask), residual)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"CLIP activation {cfg.hidden_act!r}: mlx-sd knows {', '.join(ACTIVATIONS)}")
        self.activation = cfg.hidden_act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x: mx.array, residual: mx.array) -> mx.array:
        """residual + fc2(act(fc1(x)))."""
        return linear_plus(self.fc2, linear(self.fc1, x, self.activation), residual)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def __call__(self, x: mx.array, mask) -> mx.array:
        x = self.self_attn(self.layer_norm1(x), mask, x)
        return self.mlp(self.layer_norm2(x), x)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def __call__(self, input_ids: mx.array) -> mx.array:
        T = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:T]


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = [CLIPEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]


class CLIPTextModel(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def __call__(self, input_ids: mx.array, num_layers: int | None = None) -> CLIPOutput:
        """Encode (B, T) token ids, T <= max_position_embeddings.

        Args:
            input_ids: (B, T) int token ids.
            num_layers: run only the first `num_layers` layers (clip skip stops early this way);
                `last_hidden_state` and `pooled` are then taken from the last layer run.
        """
        num_layers = self.config.num_hidden_layers if num_layers is None else num_layers
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x, "causal")
            hidden_states.append(x)
        last = self.final_layer_norm(x)
        pooled = last[mx.arange(last.shape[0]), self.pool_positions(input_ids)]
        text_embeds = self.text_projection(pooled) if "text_projection" in self else None
        return CLIPOutput(hidden_states, last, pooled, text_embeds)

    def pool_positions(self, input_ids: mx.array) -> mx.array:
        """(B,) index of the token whose state is the sentence embedding (see CLIPTextConfig.pooling)."""
        if self.config.pooling == "argmax":
            return mx.argmax(input_ids, axis=-1)
        return mx.argmax((input_ids == self.config.eos_token_id).astype(mx.int32), axis=-1)
