"""The MMDiT denoiser of Stable Diffusion 3 and 3.5 (diffusers' SD3Transformer2DModel), one class for every variant.

Reference: Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), Fig. 2:
image patches and text tokens keep separate weights but attend jointly, one attention over [image; text] per block;
every block is modulated by the timestep + pooled-text embedding (adaLN-Zero). SD3.5 adds RMS-normalised queries and
keys (`qk_norm`) and, in SD3.5 medium, a second image-only self-attention in the first blocks (MMDiT-X,
`dual_attention_layers`). Parameter paths follow diffusers (`transformer_blocks.3.attn.add_q_proj`), so a diffusers
folder loads by key; Stability's single files are renamed by convert/sd3.py.

Channels-last: latents (B, h, w, C) in and out; tokens (B, N, C) inside.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .. import backend
from ..attention import attention
from .layers import TimestepEmbedding, linear, rowwise, silu, tanh, timestep_embedding

# The norms' epsilon throughout the network (diffusers: LayerNorm(eps=1e-6), Attention(eps=1e-6) for the qk norms).
EPS = 1e-6
# Width of the sinusoidal timestep features (diffusers' Timesteps(num_channels=256)).
TIMESTEP_FEATURES = 256
QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of one MMDiT, field for field diffusers' SD3Transformer2DModel config.

    `sample_size` is informational (the training latents' size): the position table is loaded, not computed.
    `pos_embed_max_size` is the side, in patches, of that table; smaller latents use its centre crop.
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"MMDiTConfig: qk_norm={self.qk_norm!r} is not supported ({QK_NORMS})")
        if self.caption_projection_dim != self.inner_dim:
            # text and image tokens share the blocks' width; diffusers' model cannot run otherwise either
            raise ValueError(
                f"MMDiTConfig: caption_projection_dim {self.caption_projection_dim} must equal "
                f"num_attention_heads x attention_head_dim = {self.inner_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


# --- elementwise ---------------------------------------------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_gelu_tanh_arg = mx.compile(lambda x: _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
_gelu_from_tanh = mx.compile(lambda x, r: (x.astype(mx.float32) * (0.5 + 0.5 * r)).astype(x.dtype))
# adaLN: normalised tokens scaled and shifted per image; the gated residual of every branch.
_modulate = mx.compile(lambda x, shift, scale: x * (1 + scale) + shift, shapeless=True)
_gated_add = mx.compile(lambda x, gate, y: x + gate * y, shapeless=True)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU's tanh approximation (torch's approximate="tanh"); on CPU through layers.tanh's rational form, since
    MLX's CPU tanh costs ~29 ns an element (0.7 s per SD3-medium feed-forward at 1024x1024)."""
    if backend.activations() == "cpu":
        return _gelu_from_tanh(x, tanh(_gelu_tanh_arg(x.astype(mx.float32))))
    return nn.gelu_approx(x)


def _norm(x: mx.array) -> mx.array:
    """LayerNorm without affine (every norm of the blocks: adaLN supplies scale and shift), rows across cores."""
    return rowwise(lambda rows: mx.fast.layer_norm(rows, None, None, EPS), x)


def _chunks(layer: nn.Module, emb: mx.array, n: int) -> list[mx.array]:
    """An adaLN projection of silu(temb) (B, D') -> n modulation vectors (B, 1, D), in diffusers' chunk order."""
    return mx.split(layer(emb)[:, None, :], n, axis=-1)


# --- blocks --------------------------------------------------------------------------------------------------


class AdaLayerNorm(nn.Module):
    """diffusers' AdaLayerNormZero (n=6), SD35AdaLayerNormZeroX (n=9), AdaLayerNormContinuous (n=2): the parameter
    alone (`linear`); the blocks apply the modulation themselves, sharing one silu(temb)."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.linear = nn.Linear(dim, n * dim)


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def __call__(self, x: mx.array) -> mx.array:
        return gelu_tanh(linear(self.proj, x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' ff.net = [GELU(approximate="tanh"), Dropout, Linear]; index 1 has no parameters.
        self.net = [GELUProjection(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return linear(self.net[2], self.net[0](x))


class JointAttention(nn.Module):
    """diffusers' Attention + JointAttnProcessor2_0: image projections (`to_*`), text ones (`add_*`, when
    `context`), optional per-head RMS norms of queries and keys, one attention over [image; text] tokens."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, context: bool, context_out: bool):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        self.to_out = [nn.Linear(inner, dim)]  # diffusers' to_out.1 is a dropout
        if qk_norm:
            self.norm_q, self.norm_k = nn.RMSNorm(head_dim, EPS), nn.RMSNorm(head_dim, EPS)
        if context:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            if qk_norm:
                self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, EPS), nn.RMSNorm(head_dim, EPS)
        if context_out:
            self.to_add_out = nn.Linear(inner, dim)

    def _project(self, layer: str, norm: str, x: mx.array) -> mx.array:
        y = linear(self[layer], x)  # (B, N, heads * d)
        if norm not in self:
            return y
        B, N, C = y.shape
        return self[norm](y.reshape(B, N, self.heads, C // self.heads)).reshape(B, N, C)  # per head, no transpose

    def __call__(self, x: mx.array, context: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """x (B, N, D) image tokens, context (B, L, D) text tokens or None -> the projected outputs (image, text);
        text is None without `to_add_out` (the last block, whose text output diffusers discards: its text queries
        are not computed at all)."""
        N = x.shape[1]
        q, k, v = self._project("to_q", "norm_q", x), self._project("to_k", "norm_k", x), linear(self.to_v, x)
        if context is not None:
            k = mx.concatenate([k, self._project("add_k_proj", "norm_added_k", context)], axis=1)  # (B, N + L, C)
            v = mx.concatenate([v, linear(self.add_v_proj, context)], axis=1)
            if "to_add_out" in self:
                q = mx.concatenate([q, self._project("add_q_proj", "norm_added_q", context)], axis=1)
        out = attention(q, k, v, self.heads)
        image = linear(self.to_out[0], out[:, :N])
        return image, (linear(self.to_add_out, out[:, N:]) if "to_add_out" in self else None)


class JointTransformerBlock(nn.Module):
    """One MMDiT block: adaLN-modulated joint attention and feed-forwards for the image and the text streams, plus
    the image-only second attention of MMDiT-X (`dual`). The last block is `context_pre_only`: its text tokens only
    serve as keys and values (AdaLayerNormContinuous on them, no text output, no ff_context)."""

    def __init__(self, cfg: MMDiTConfig, dual: bool, context_pre_only: bool):
        super().__init__()
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNorm(dim, 9 if dual else 6)
        self.norm1_context = AdaLayerNorm(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, heads, head_dim, cfg.qk_norm, context=True, context_out=not context_pre_only)
        if dual:
            self.attn2 = JointAttention(dim, heads, head_dim, cfg.qk_norm, context=False, context_out=False)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.ff_context = FeedForward(dim)

    def __call__(self, x: mx.array, context: mx.array, emb: mx.array) -> tuple[mx.array, mx.array | None]:
        """x (B, N, D), context (B, L, D), emb = silu(temb) (B, D) -> (x, context); context None after the last."""
        dual = "attn2" in self
        mods = _chunks(self.norm1.linear, emb, 9 if dual else 6)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        normed = _norm(x)
        if self.context_pre_only:
            c_scale, c_shift = _chunks(self.norm1_context.linear, emb, 2)  # diffusers' (scale, shift) order
        else:
            c_shift, c_scale, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = _chunks(
                self.norm1_context.linear, emb, 6
            )
        image, text = self.attn(_modulate(normed, shift_msa, scale_msa), _modulate(_norm(context), c_shift, c_scale))
        x = _gated_add(x, gate_msa, image)
        if dual:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            x = _gated_add(x, gate_msa2, self.attn2(_modulate(normed, shift_msa2, scale_msa2))[0])
        x = _gated_add(x, gate_mlp, self.ff(_modulate(_norm(x), shift_mlp, scale_mlp)))
        if self.context_pre_only:
            return x, None
        context = _gated_add(context, c_gate_msa, text)
        context = _gated_add(context, c_gate_mlp, self.ff_context(_modulate(_norm(context), c_shift_mlp, c_scale_mlp)))
        return x, context


class SingleTransformerBlock(nn.Module):
    """diffusers' SD3SingleTransformerBlock (the blocks of Stability's SD3.5 ControlNets): a joint block's image
    stream alone, self-attention without text tokens and without qk norms."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNorm(dim, 6)
        self.attn = JointAttention(dim, heads, head_dim, None, context=False, context_out=False)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, emb: mx.array) -> mx.array:
        """x (B, N, D), emb = silu(temb) (B, D) -> x."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = _chunks(self.norm1.linear, emb, 6)
        x = _gated_add(x, gate_msa, self.attn(_modulate(_norm(x), shift_msa, scale_msa))[0])
        return _gated_add(x, gate_mlp, self.ff(_modulate(_norm(x), shift_mlp, scale_mlp)))


# --- embeddings ----------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (diffusers' stride-p conv `proj`, run as one product), plus the centre crop of the
    stored 2-D sin-cos position table `pos_embed` (1, M*M, D), as diffusers' cropped_pos_embed; no table when
    `max_size` is None (an SD3 ControlNet's `pos_embed_input`: diffusers' pos_embed_type=None)."""

    def __init__(self, in_channels: int, dim: int, patch_size: int, max_size: int | None):
        super().__init__()
        p, M = patch_size, max_size
        self.patch_size, self.max_size = p, M
        self.proj = nn.Conv2d(in_channels, dim, p, stride=p)  # weight (D, p, p, C)
        if M is not None:
            self.pos_embed = mx.zeros((1, M * M, dim))  # a buffer in diffusers, loaded from the checkpoint

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        p, M = self.patch_size, self.max_size
        if H % p or W % p:
            raise ValueError(f"mmdit: latent size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        patches = x.reshape(B, h, p, w, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, h * w, p * p * C)
        weight = self.proj.weight.reshape(self.proj.weight.shape[0], -1)  # (D, p*p*C), patch order (row, col, c)
        if M is None:
            return patches @ weight.T + self.proj.bias.astype(x.dtype)  # (B, h*w, D)
        if h > M or w > M:
            raise ValueError(
                f"mmdit: latent size {H}x{W} is {h}x{w} patches; this model's position table covers at most "
                f"{M}x{M} patches (pos_embed_max_size), i.e. {M * p}x{M * p} latents ({8 * M * p} pixels a side "
                "with SD3's 8x VAE): use a smaller image"
            )
        top, left = (M - h) // 2, (M - w) // 2
        pos = self.pos_embed.reshape(M, M, -1)[top : top + h, left : left + w].reshape(h * w, -1)  # (h*w, D)
        return patches @ weight.T + (self.proj.bias + pos).astype(x.dtype)  # (B, h*w, D)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """temb = MLP(sinusoid(t)) + MLP(pooled text); both MLPs are linear_1 -> SiLU -> linear_2."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIMESTEP_FEATURES, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)  # diffusers' PixArtAlphaTextProjection(act="silu")

    def __call__(self, t: mx.array, pooled: mx.array) -> mx.array:
        features = timestep_embedding(t, TIMESTEP_FEATURES, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(features.astype(pooled.dtype)) + self.text_embedder(pooled)


# --- the model -----------------------------------------------------------------------------------------------


class SD3Transformer2DModel(nn.Module):
    """The SD3 / SD3.5 MMDiT (diffusers' SD3Transformer2DModel), channels-last."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        dim, n = cfg.inner_dim, cfg.num_layers
        self.pos_embed = PatchEmbed(cfg.in_channels, dim, cfg.patch_size, cfg.pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(dim, cfg.pooled_projection_dim)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = [
            JointTransformerBlock(cfg, i in cfg.dual_attention_layers, context_pre_only=i == n - 1) for i in range(n)
        ]
        self.norm_out = AdaLayerNorm(dim, 2)  # AdaLayerNormContinuous: (scale, shift)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * cfg.out_channels)

    def __call__(
        self,
        x: mx.array,
        timestep: mx.array | float,
        encoder_hidden_states: mx.array,
        pooled_projections: mx.array,
        skip_layers: Collection[int] = (),
        controlnet_residuals: Sequence[mx.array] = (),
    ) -> mx.array:
        """Predict the flow velocity of latents `x`.

        Args:
            x: (B, h, w, in_channels) latents; h and w multiples of patch_size, at most pos_embed_max_size patches.
            timestep: (B,) or a scalar: what diffusers passes, sigma * 1000 (fractional).
            encoder_hidden_states: (B, L, joint_attention_dim) text tokens (CLIP-L + bigG padded, then T5).
            pooled_projections: (B, pooled_projection_dim) the pooled CLIP embeddings.
            skip_layers: blocks to leave out (skip-layer guidance's second pass; diffusers' `skip_layers`).
            controlnet_residuals: SD3 ControlNets' summed (B, N, D) residuals (diffusers'
                `block_controlnet_hidden_states`): k of them spread over the n blocks, residual int(i / (n / k))
                added to the image tokens after block i (skipped or not), except after the last block.
        Returns:
            (B, h, w, out_channels), in x's dtype.
        """
        B, H, W, _ = x.shape
        p, C = self.config.patch_size, self.config.out_channels
        t = mx.broadcast_to(mx.array(timestep, mx.float32), (B,))
        tokens = self.pos_embed(x)  # (B, N, D)
        emb = silu(self.time_text_embed(t, pooled_projections.astype(x.dtype)))  # every adaLN's input, (B, D)
        context = linear(self.context_embedder, encoder_hidden_states.astype(x.dtype))  # (B, L, D)
        n, k = len(self.transformer_blocks), len(controlnet_residuals)
        for i, block in enumerate(self.transformer_blocks):
            if i not in skip_layers:
                tokens, context = block(tokens, context, emb)
            if k and not block.context_pre_only:
                tokens = tokens + controlnet_residuals[int(i / (n / k))]  # diffusers' interval_control, as floats
        scale, shift = _chunks(self.norm_out.linear, emb, 2)
        out = linear(self.proj_out, _modulate(_norm(tokens), shift, scale))  # (B, N, p*p*C)
        out = out.reshape(B, H // p, W // p, p, p, C).transpose(0, 1, 3, 2, 4, 5)
        return out.reshape(B, H, W, C)
