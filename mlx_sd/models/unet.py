"""The conditional UNet of Stable Diffusion 1.x, 2.x and SDXL (diffusers' UNet2DConditionModel), one class.

Reference: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"; SDXL
(Podell et al. 2023) adds the text-time embedding and per-stage transformer depth. Every variant is a
`UNetConfig`; parameter paths follow diffusers (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .. import backend, cpu_kernels
from .layers import (
    Attention,
    Conv2d,
    Downsample2D,
    GroupNorm,
    LayerNorm,
    ResnetBlock2D,
    TextContext,
    TimestepEmbedding,
    Upsample2D,
    geglu,
    linear,
    linear_plus,
    rowwise,
    timestep_embedding,
)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of one UNet. Tuples hold one value per resolution stage, highest resolution first.

    `num_heads` is the number of attention heads per stage (diffusers' SD configs call this
    `attention_head_dim`; the converter translates). A stage with `transformer_depth` 0 has no attention
    (diffusers' DownBlock2D/UpBlock2D). Up stages mirror the down stages.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    mid_transformer_depth: int = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL's added text-time embedding: pooled text (B, P) + 6 (5 for the refiner) micro-conditioning numbers
    # each embedded in `addition_time_embed_dim` -> `projection_class_embeddings_input_dim` inputs.
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # LCM-distilled UNets embed the guidance scale and add it to the timestep embedding.
    time_cond_proj_dim: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def mid_num_heads(self) -> int:
        return self.num_heads[-1]


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, GEGLU feed-forward; pre-LayerNorm, residual each."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array | TextContext) -> mx.array:
        reference = getattr(context, "reference", None)  # reference-only control (mlx_sd/reference.py)
        normed = self.norm1(x)
        x = self.attn1(normed, residual=x) if reference is None else reference.self_attention(self, normed, x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class GEGLU(nn.Module):
    """One projection to 2 * inner, split into value and GELU gate (Shazeer 2020). Kept fused as published."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def __call__(self, x: mx.array) -> mx.array:
        if backend.row_kernels(x.dtype) == "numba":
            if type(self.proj) is nn.Linear:  # the bias is added inside the kernel (see cpu_kernels.geglu)
                h = cpu_kernels.product(x, self.proj.weight).reshape(*x.shape[:-1], -1)
                return cpu_kernels.geglu(h, self.proj.bias if "bias" in self.proj else None)
            return cpu_kernels.geglu(self.proj(x))  # quantized, or wrapped by a LoRA
        return rowwise(_gated, self.proj(x))


def _gated(h: mx.array) -> mx.array:
    value, gate = mx.split(h, 2, axis=-1)
    return geglu(value, gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' ff.net = [GEGLU, Dropout, Linear]; index 1 has no parameters.
        self.net = [GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)]

    def __call__(self, x: mx.array, residual: mx.array | None = None) -> mx.array:
        h = self.net[0](x)
        return self.net[2](h) if residual is None else linear_plus(self.net[2], h, residual)


class Transformer2DModel(nn.Module):
    """GroupNorm, project to tokens, `depth` transformer blocks, project back, residual.

    `proj_in`/`proj_out` are linears here for every family: SD1's 1x1 convolutions are the same map and the
    converter reshapes their (C, C, 1, 1) weights once.
    """

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, context: mx.array | TextContext) -> mx.array:
        B, H, W, C = x.shape
        h = linear(self.proj_in, self.norm(x).reshape(B, H * W, C))  # (B, H*W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        return linear_plus(self.proj_out, h, x)


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (with attentions) or DownBlock2D (depth 0)."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, depth: int, heads: int, downsample: bool):
        super().__init__()
        groups, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        n = cfg.layers_per_block
        self.resnets = [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, groups, eps) for i in range(n)]
        if depth:
            self.attentions = [
                Transformer2DModel(out_ch, heads, depth, cfg.cross_attention_dim, groups) for _ in range(n)
            ]
        if downsample:
            self.downsamplers = [Downsample2D(out_ch)]

    def __call__(self, x, temb, context, feature=None) -> tuple[mx.array, list[mx.array]]:
        """`feature`: a T2I-Adapter's, added where diffusers adds it: after the last attention of a block with
        attentions, else to the block's output (whose skip connection is the same tensor, changed in place there)."""
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if "attentions" in self:
                x = self.attentions[i](x, context)
            x = _block_output(context, resnet, x)
            if "attentions" in self and feature is not None and i == len(self.resnets) - 1:
                x = x + feature
            skips.append(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
            skips.append(x)
        if feature is not None and "attentions" not in self:
            x = skips[-1] = x + feature
        return x, skips


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D / UpBlock2D: each resnet eats one skip connection, concatenated on C."""

    def __init__(self, cfg, prev_ch: int, skip_chs: list[int], out_ch: int, depth: int, heads: int, upsample: bool):
        super().__init__()
        groups, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = [
            ResnetBlock2D((prev_ch if i == 0 else out_ch) + skip, out_ch, temb, groups, eps)
            for i, skip in enumerate(skip_chs)
        ]
        if depth:
            self.attentions = [
                Transformer2DModel(out_ch, heads, depth, cfg.cross_attention_dim, groups) for _ in skip_chs
            ]
        if upsample:
            self.upsamplers = [Upsample2D(out_ch)]

    def __call__(self, x, temb, context, skips: list[mx.array], upsample_size) -> mx.array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
            if "attentions" in self:
                x = self.attentions[i](x, context)
            if i < len(self.resnets) - 1 or "upsamplers" not in self:
                x = _block_output(context, resnet, x)
        if "upsamplers" in self:
            x = _block_output(context, self.resnets[-1], self.upsamplers[0](x, upsample_size))
        return x


class MidBlock(nn.Module):
    """resnet, (transformer, resnet) x 1: diffusers' UNetMidBlock2DCrossAttn."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        ch, groups, eps, temb = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = [ResnetBlock2D(ch, ch, temb, groups, eps) for _ in range(2)]
        self.attentions = [
            Transformer2DModel(ch, cfg.mid_num_heads, cfg.mid_transformer_depth, cfg.cross_attention_dim, groups)
        ]

    def __call__(self, x, temb, context) -> mx.array:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return _block_output(context, self, self.resnets[1](x, temb))


def _block_output(context, key: nn.Module, x: mx.array) -> mx.array:
    """A block's output (the original UNet's `input_blocks[i]`, `middle_block`, `output_blocks[i]`, named by its
    first module), through reference-only control's AdaIN where a request uses it (mlx_sd/reference.py)."""
    reference = getattr(context, "reference", None)
    return x if reference is None else reference.block_output(key, x)


class UNet2DConditionModel(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        cfg = self.config = config
        chans = cfg.block_out_channels
        n = len(chans)
        build_encoder(self, cfg)
        skip_chs = skip_channels(cfg)

        self.up_blocks = []
        prev_ch = chans[-1]
        for i in range(n):
            stage = n - 1 - i  # the down stage this up stage mirrors
            k = cfg.layers_per_block + 1
            block_skips, skip_chs = skip_chs[-k:][::-1], skip_chs[:-k]
            block = UpBlock(
                cfg, prev_ch, block_skips, chans[stage], cfg.transformer_depth[stage], cfg.num_heads[stage], i < n - 1
            )
            self.up_blocks.append(block)
            prev_ch = chans[stage]

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, chans[0], cfg.norm_eps)
        self.conv_out = Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def __call__(
        self,
        x: mx.array,
        t: mx.array,
        context: mx.array | TextContext,
        pooled: mx.array | None = None,
        time_ids: mx.array | None = None,
        timestep_cond: mx.array | None = None,
        residuals: tuple[list[mx.array], mx.array] | None = None,
        features: list[mx.array] | None = None,
    ) -> mx.array:
        """Predict the model output (eps or v) for noisy latents.

        Args:
            x: (B, H, W, in_channels) scaled latents (inpainting UNets: latents, mask, masked-image latents).
            t: (B,) or scalar timesteps, fractional allowed.
            context: (B, N, cross_attention_dim) text conditioning, or a `TextContext` holding it, which keeps each
                cross-attention layer's keys and values for the following calls (the steps of one request).
            pooled: (B, P) pooled text embedding (SDXL only).
            time_ids: (B, 6) or (B, 5) micro-conditioning numbers (SDXL only).
            timestep_cond: (B, time_cond_proj_dim) guidance embedding (LCM-distilled UNets only).
            residuals: a ControlNet's (down, middle) residuals: one per skip connection and one for the middle
                block's output, added before the up path uses them (diffusers' down/mid_block_additional_residual).
            features: a T2I-Adapter's features, added inside the down blocks (diffusers'
                down_intrablock_additional_residuals; `encode`).
        Returns:
            (B, H, W, out_channels).
        """
        temb = embed_time(self, x, t, pooled, time_ids, timestep_cond)
        h, skips = encode(self, self.conv_in(x), temb, context, features)
        if residuals is not None:  # a ControlNet's (mlx_sd/models/controlnet.py), added to every skip and the middle
            down, middle = residuals
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down, strict=True)]
            h = h + middle.astype(h.dtype)

        for block in self.up_blocks:
            k = len(block.resnets)
            block_skips, skips = skips[-k:], skips[:-k]
            # Upsample to the next skip's size, so latent sizes that do not divide by 2^n line up as in diffusers.
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            h = block(h, temb, context, block_skips, upsample_size)

        return self.conv_out(self.conv_norm_out(h, silu=True))


# --- the encoder half, shared with the ControlNet (a trainable copy of it) ---------------------------------------


def build_encoder(module: nn.Module, cfg: UNetConfig) -> None:
    """Give `module` the UNet's input convolution, time (and SDXL text-time) embedding, down path and middle block,
    under diffusers' names."""
    chans = cfg.block_out_channels
    n = len(chans)
    module.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1)
    module.time_embedding = TimestepEmbedding(chans[0], cfg.time_embed_dim, cfg.time_cond_proj_dim)
    if cfg.addition_time_embed_dim is not None:
        module.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
    module.down_blocks = [
        DownBlock(cfg, chans[max(i - 1, 0)], chans[i], cfg.transformer_depth[i], cfg.num_heads[i], i < n - 1)
        for i in range(n)
    ]
    module.mid_block = MidBlock(cfg)


def skip_channels(cfg: UNetConfig) -> list[int]:
    """The channels of every skip connection the down path pushes, in push order (conv_in's output first)."""
    chans = cfg.block_out_channels
    out = [chans[0]]
    for i, ch in enumerate(chans):
        out += [ch] * cfg.layers_per_block + ([ch] if i < len(chans) - 1 else [])
    return out


def embed_time(module: nn.Module, x: mx.array, t, pooled, time_ids, timestep_cond) -> mx.array:
    """The (B, time_embed_dim) embedding of the timestep (+ LCM's guidance, + SDXL's pooled text and micro-
    conditioning) that every resnet of `module` (built by `build_encoder`) receives."""
    cfg = module.config
    B = x.shape[0]
    t = mx.broadcast_to(mx.array(t).reshape(-1), (B,))
    temb_in = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    temb = module.time_embedding(temb_in.astype(x.dtype), timestep_cond)
    if "add_embedding" in module:
        if pooled is None or time_ids is None:
            raise ValueError("this model has an added text-time embedding (SDXL): pass pooled and time_ids")
        time_emb = timestep_embedding(
            time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
        ).reshape(B, -1)
        added = mx.concatenate([pooled, time_emb.astype(pooled.dtype)], axis=-1)
        temb = temb + module.add_embedding(added.astype(x.dtype))
    return temb


def encode(module: nn.Module, h: mx.array, temb: mx.array, context, features=None) -> tuple[mx.array, list[mx.array]]:
    """The down path and middle block of `module` from conv_in's output `h`: (middle output, skip connections).
    `features`: a T2I-Adapter's, one per down block in order; one left over is added to the middle block's output
    when its shape fits (SDXL's adapter has four features for three blocks), as diffusers does."""
    features = list(features or [])
    skips = [h]
    for block in module.down_blocks:
        h, block_skips = block(h, temb, context, features.pop(0) if features else None)
        skips += block_skips
    h = module.mid_block(h, temb, context)
    if features and features[0].shape == h.shape:
        h = h + features[0]
    return h, skips
