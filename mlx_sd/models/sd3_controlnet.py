"""SD3 / SD3.5 ControlNets (diffusers' SD3ControlNetModel), one class for both published kinds.

A copy of the MMDiT's first blocks that sees the noisy latents plus the control image's VAE latents (through the
zero-initialised patch embedding `pos_embed_input`) and returns one residual per block (the zero-initialised linears
`controlnet_blocks`), which the MMDiT adds to its image tokens (mlx_sd/models/mmdit.py, `controlnet_residuals`).

- InstantX's SD3 ControlNets: joint blocks with their own text stream (`context_embedder`), their own position table,
  a pooled input forced to zeros (`force_zeros_for_pooled_projection`).
- Stability's SD3.5 large ControlNets (canny, depth, blur): image-only blocks (diffusers' SD3SingleTransformerBlock,
  `joint_attention_dim` None) and no patch embedding of their own (`use_pos_embed` False): the MMDiT's `pos_embed`
  embeds their latents, as diffusers' pipeline copies it into them.

Parameter paths follow diffusers, so a diffusers folder loads by key (convert/controlnet.py). Channels-last.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import linear, silu
from .mmdit import (
    QK_NORMS,
    CombinedTimestepTextProjEmbeddings,
    JointTransformerBlock,
    MMDiTConfig,
    PatchEmbed,
    SingleTransformerBlock,
)


@dataclass(frozen=True)
class SD3ControlNetConfig:
    """Architecture of one SD3 ControlNet, field for field diffusers' SD3ControlNetModel config (`sample_size`,
    `out_channels` and `caption_projection_dim` are informational there too: the text stream is as wide as the
    blocks). `joint_attention_dim` None: image-only blocks (SD3.5); `use_pos_embed` False: the MMDiT's patch
    embedding is used; `force_zeros_for_pooled_projection`: the pipeline gives the network a zero pooled vector and
    unshifted control latents (InstantX's training, kept by diffusers' pipeline)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int | None = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96  # None without a position table of its own
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True

    def __post_init__(self):
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"SD3ControlNetConfig: qk_norm={self.qk_norm!r} is not supported ({QK_NORMS})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def joint(self) -> bool:
        """Joint blocks with a text stream (InstantX), rather than image-only ones (SD3.5)."""
        return self.joint_attention_dim is not None

    def blocks_config(self) -> MMDiTConfig:
        """The settings the MMDiT's joint blocks read (their text stream as wide as the image stream)."""
        return MMDiTConfig(
            patch_size=self.patch_size,
            in_channels=self.in_channels,
            num_layers=self.num_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.joint_attention_dim or self.inner_dim,
            caption_projection_dim=self.inner_dim,
            pooled_projection_dim=self.pooled_projection_dim,
            dual_attention_layers=self.dual_attention_layers,
            qk_norm=self.qk_norm,
        )


class SD3ControlNetModel(nn.Module):
    """diffusers' SD3ControlNetModel, channels-last: latents and control latents in, per-block residuals out."""

    def __init__(self, cfg: SD3ControlNetConfig):
        super().__init__()
        self.config = cfg
        dim, heads, head_dim, p = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size
        if cfg.use_pos_embed:
            self.pos_embed = PatchEmbed(cfg.in_channels, dim, p, cfg.pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim)
        if cfg.joint:
            self.context_embedder = nn.Linear(cfg.joint_attention_dim, dim)
            blocks = cfg.blocks_config()
            self.transformer_blocks = [
                JointTransformerBlock(blocks, i in cfg.dual_attention_layers, context_pre_only=False)
                for i in range(cfg.num_layers)
            ]
        else:
            self.transformer_blocks = [SingleTransformerBlock(dim, heads, head_dim) for _ in range(cfg.num_layers)]
        self.controlnet_blocks = [nn.Linear(dim, dim) for _ in range(cfg.num_layers)]
        self.pos_embed_input = PatchEmbed(cfg.in_channels + cfg.extra_conditioning_channels, dim, p, None)

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array,
        encoder_hidden_states: mx.array | None,
        pooled_projections: mx.array,
        controlnet_cond: mx.array,
        pos_embed: PatchEmbed | None = None,
    ) -> list[mx.array]:
        """The residuals for the MMDiT's blocks, unscaled.

        Args:
            x: (B, h, w, in_channels) the MMDiT's latents.
            timestep: (B,) the MMDiT's timesteps (1000 sigma).
            encoder_hidden_states: (B, L, joint_attention_dim) text tokens; None for image-only blocks.
            pooled_projections: (B, pooled_projection_dim); zeros for `force_zeros_for_pooled_projection`.
            controlnet_cond: (B, h, w, in_channels + extra_conditioning_channels) the control image's latents.
            pos_embed: the MMDiT's patch embedding, for networks without their own (`use_pos_embed` False).
        Returns:
            num_layers residuals (B, h*w/p^2, inner_dim), in x's dtype.
        """
        embed = self.pos_embed if "pos_embed" in self else pos_embed
        if embed is None:
            raise ValueError("this SD3 ControlNet embeds its latents with the MMDiT's pos_embed: pass pos_embed")
        tokens = embed(x) + self.pos_embed_input(controlnet_cond.astype(x.dtype))  # (B, N, D)
        emb = silu(self.time_text_embed(timestep, pooled_projections.astype(x.dtype)))  # (B, D)
        context = None
        if self.config.joint:
            context = linear(self.context_embedder, encoder_hidden_states.astype(x.dtype))  # (B, L, D)
        residuals = []
        for block, out in zip(self.transformer_blocks, self.controlnet_blocks):
            if context is None:
                tokens = block(tokens, emb)
            else:
                tokens, context = block(tokens, context, emb)
            residuals.append(linear(out, tokens))
        return residuals
