"""OpenCLIP text towers (SD2's ViT-H/14, SDXL's ViT-bigG/14) -> mlx_sd's CLIPTextModel.

Original checkpoints store the text tower as open_clip saves it (`cond_stage_model.model.*` in SD2,
`conditioner.embedders.1.model.*` in SDXL); the caller strips that prefix. Two layouts differ from transformers:
the fused attention input projection `attn.in_proj_weight` (3W, W), split here into q/k/v, and
`text_projection` stored as a (W, P) matrix applied as x @ P, i.e. the transpose of a Linear weight.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mlx_sd.models import CLIPTextConfig

from .keymap import ConversionError, Rule

# OpenCLIP's ViT-H and ViT-bigG text towers use 64-channel attention heads.
OPENCLIP_HEAD_DIM = 64


def _split_qkv(suffix: str):
    def split(value: np.ndarray) -> dict[str, np.ndarray]:
        q, k, v = np.split(np.asarray(value), 3, axis=0)
        return {f"q_proj.{suffix}": q, f"k_proj.{suffix}": k, f"v_proj.{suffix}": v}

    return split


def openclip_rules(drop_layers: range | list[int] = ()) -> list[Rule]:
    """Key map for an OpenCLIP text tower; `drop_layers` are dropped (SD2 conditions on the penultimate layer)."""
    drop = []
    if drop_layers:
        indices = "|".join(str(i) for i in drop_layers)
        drop = [
            Rule(
                rf"transformer\.resblocks\.(?:{indices})\..+",
                None,
                "SD2 conditions on the penultimate layer; the last block never runs (diffusers drops it too)",
            )
        ]
    block = r"transformer\.resblocks\.(\d+)"
    layer = r"encoder.layers.\1"
    return drop + [
        Rule(r"token_embedding\.weight", "embeddings.token_embedding.weight"),
        Rule(r"positional_embedding", "embeddings.position_embedding.weight"),
        Rule(rf"{block}\.ln_1\.(weight|bias)", rf"{layer}.layer_norm1.\2"),
        Rule(rf"{block}\.ln_2\.(weight|bias)", rf"{layer}.layer_norm2.\2"),
        Rule(rf"{block}\.attn\.in_proj_weight", rf"{layer}.self_attn.", split=_split_qkv("weight")),
        Rule(rf"{block}\.attn\.in_proj_bias", rf"{layer}.self_attn.", split=_split_qkv("bias")),
        Rule(rf"{block}\.attn\.out_proj\.(weight|bias)", rf"{layer}.self_attn.out_proj.\2"),
        Rule(rf"{block}\.mlp\.c_fc\.(weight|bias)", rf"{layer}.mlp.fc1.\2"),
        Rule(rf"{block}\.mlp\.c_proj\.(weight|bias)", rf"{layer}.mlp.fc2.\2"),
        Rule(r"ln_final\.(weight|bias)", r"final_layer_norm.\1"),
        Rule(r"text_projection", "text_projection.weight", split=lambda p: {"": np.asarray(p).T}),
        Rule(r"logit_scale", None, "CLIP's contrastive temperature; text conditioning does not use it"),
        Rule(r"attn_mask", None, "the causal mask buffer; rebuilt at run time"),
    ]


def openclip_config(
    shapes: Mapping[str, tuple[int, ...]], keep_layers: int | None = None, heads: int | None = None
) -> CLIPTextConfig:
    """Infer the text tower's config from its tensor shapes (keys without prefix)."""
    try:
        vocab, width = shapes["token_embedding.weight"]
        positions = shapes["positional_embedding"][0]
        inner = shapes["transformer.resblocks.0.mlp.c_fc.weight"][0]
    except KeyError as e:
        raise ConversionError(f"text encoder: OpenCLIP tensor {e} not found; is this an OpenCLIP text tower?") from e
    layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("transformer.resblocks."))
    projection = shapes.get("text_projection")
    return CLIPTextConfig(
        vocab_size=vocab,
        max_position_embeddings=positions,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers if keep_layers is None else keep_layers,
        num_attention_heads=heads or width // OPENCLIP_HEAD_DIM,
        hidden_act="gelu",
        projection_dim=None if projection is None else projection[1],
        pooling="argmax",  # OpenCLIP pools at text.argmax(-1)
    )
