"""IP-Adapter: an image as a prompt (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
Text-to-Image Diffusion Models"), as diffusers' `load_ip_adapter` runs it.

The image is embedded by a CLIP image tower (mlx_sd/models/clip_vision.py), projected to a few tokens of the UNet's
cross-attention width (`ImageProjection`), and every cross-attention layer of the UNet attends to them with keys and
values of its own (`to_k_ip`, `to_v_ip`) beside the text: out = to_out(attention(q, k_text, v_text) + scale *
attention(q, k_image, v_image)) (diffusers' IPAdapterAttnProcessor). The unconditional half of classifier-free
guidance attends to the projection of a zero embedding. The tokens and their per-layer keys travel with the request's
`TextContext` (`image`), so the UNet's modules never change. mlx_sd_convert.ip_adapter reads the published files.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from .attention import attention
from .infotext import a1111_title
from .models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionModelWithProjection
from .models.layers import LayerNorm

RESAMPLER_HEAD_DIM = 64  # IP-Adapter Plus' perceiver attention heads are 64 wide (diffusers reads heads so)


class ImageProjection(nn.Module):
    """diffusers' ImageProjection: one embedding -> `tokens` tokens of width `dim` (Linear, then LayerNorm each)."""

    def __init__(self, embed_dim: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = LayerNorm(dim)

    def __call__(self, embeds: mx.array) -> mx.array:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))  # (B, tokens, dim)


class PerceiverAttention(nn.Module):
    """IP-Adapter Plus' resampler attention: the latents attend to [image features; latents] (both LayerNormed),
    keys and values from one fused projection (`to_kv`), as the original Resampler names them."""

    def __init__(self, dim: int, inner: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def __call__(self, x: mx.array, latents: mx.array) -> mx.array:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = mx.split(self.to_kv(mx.concatenate([x, latents], axis=1)), 2, axis=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    """IP-Adapter Plus' image projection: learned queries (`latents`) refined by perceiver attention over the image
    encoder's penultimate tokens, each block followed by a GELU feed-forward (LayerNorm, Linear, GELU, Linear)."""

    def __init__(self, embed_dim: int, hidden: int, dim: int, tokens: int, inner: int, depth: int, ffn: int):
        super().__init__()
        self.latents = mx.zeros((1, tokens, hidden))
        self.proj_in = nn.Linear(embed_dim, hidden)
        self.layers = [
            [PerceiverAttention(hidden, inner, inner // RESAMPLER_HEAD_DIM),
             [LayerNorm(hidden), nn.Linear(hidden, ffn, bias=False), nn.GELU(), nn.Linear(ffn, hidden, bias=False)]]
            for _ in range(depth)
        ]  # fmt: skip
        self.proj_out = nn.Linear(hidden, dim)
        self.norm_out = LayerNorm(dim)

    def __call__(self, features: mx.array) -> mx.array:
        x = self.proj_in(features)
        latents = mx.broadcast_to(self.latents, (features.shape[0], *self.latents.shape[1:]))
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            h = latents
            for layer in ff:
                h = layer(h)
            latents = h + latents
        return self.norm_out(self.proj_out(latents))


class IPLayer(nn.Module):
    """One cross-attention layer's keys and values for the image tokens."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(dim, inner, bias=False)
        self.to_v_ip = nn.Linear(dim, inner, bias=False)


class IPAdapterModel(nn.Module):
    """The adapter's weights: `image_proj`, and `layers[i]` for the UNet's i-th cross-attention layer in diffusers'
    attention-processor order (down blocks, up blocks, then the middle block: `cross_attention_layers`)."""

    def __init__(self, embed_dim: int, dim: int, tokens: int, inners: list[int], resampler: dict | None = None):
        super().__init__()
        self.plus = resampler is not None
        self.image_proj = (
            Resampler(embed_dim, dim=dim, tokens=tokens, **resampler)
            if self.plus
            else ImageProjection(embed_dim, dim, tokens)
        )
        self.layers = [IPLayer(dim, inner) for inner in inners]


def cross_attention_layers(unet) -> list:
    """The UNet's cross-attention (attn2) layers in the order IP-Adapter files number them: diffusers registers
    `down_blocks` and `up_blocks` before `mid_block`, and its attention processors follow that order."""
    layers = []
    for block in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]:
        for transformer in block.attentions if "attentions" in block else []:
            layers += [tb.attn2 for tb in transformer.transformer_blocks]
    return layers


class ImageContext:
    """A request's image tokens for one batch and the adapted layers: `keys_values(layer)` gives a layer's image keys
    and values (computed at its first use, kept for the other steps) and the scale, or None for other layers."""

    def __init__(self, tokens: mx.array, layers: dict[int, IPLayer], scale: float):
        self.tokens, self.layers, self.scale = tokens, layers, scale
        self._cache: dict[int, tuple[mx.array, mx.array]] = {}

    def keys_values(self, layer) -> tuple[mx.array, mx.array, float] | None:
        ip = self.layers.get(id(layer))
        if ip is None:
            return None
        kv = self._cache.get(id(layer))
        if kv is None:
            kv = self._cache[id(layer)] = (ip.to_k_ip(self.tokens), ip.to_v_ip(self.tokens))
        return (*kv, self.scale)


@dataclass(frozen=True, eq=False)
class IPAdapter:
    """A loaded IP-Adapter and its image encoder (mlx_sd_convert.ip_adapter.read_ip_adapter reads them).

    name / short_hash: how the infotext names the adapter file (A1111's legacy 8-digit hash).
    """

    model: IPAdapterModel
    encoder: CLIPVisionModelWithProjection
    name: str
    short_hash: str = ""

    @property
    def title(self) -> str:
        return a1111_title(self.name, self.short_hash)

    def check(self, unet) -> None:
        """Raise ValueError unless this adapter fits `unet` (one layer per cross-attention layer, same widths)."""
        layers = cross_attention_layers(unet)
        ours = [(ip.to_k_ip.weight.shape) for ip in self.model.layers]
        theirs = [tuple(layer.to_k.weight.shape) for layer in layers]
        if ours != theirs:
            raise ValueError(
                f"IP-Adapter {self.name} adapts {len(ours)} cross-attention layers of width "
                f"{ours[0][1] if ours else '?'}; this model has {len(theirs)} of width {theirs[0][1]}: use an "
                "IP-Adapter made for this model's family"
            )

    def embed(self, image: Image.Image) -> tuple[mx.array, mx.array]:
        """The image's embedding and the unconditional one (CLIPImageProcessor's resize, centre crop and
        normalisation): the projected embeddings (1, embed_dim) and zeros; for IP-Adapter Plus the encoder's
        penultimate tokens (1, 1 + patches, width), of the image and of a zero image (diffusers)."""
        x = pixels(image, self.encoder.config.image_size).astype(self._dtype)
        if not self.model.plus:
            embeds = self.encoder(x)
            return embeds, mx.zeros_like(embeds)
        layers = self.encoder.config.num_hidden_layers - 1
        both = self.encoder.hidden_state(mx.concatenate([x, mx.zeros_like(x)]), layers)
        return both[:1], both[1:]

    def context(self, embeds, unet, batch: int, guided: bool, scale: float, dtype) -> ImageContext:
        """The image tokens for a batch of `batch` images ([unconditional; conditional] when guided), from `embed`'s
        pair."""
        cond, uncond = embeds
        tokens = self.model.image_proj(cond.astype(self._dtype))
        tokens = mx.broadcast_to(tokens, (batch, *tokens.shape[1:]))
        if guided:
            empty = self.model.image_proj(uncond.astype(self._dtype))
            tokens = mx.concatenate([mx.broadcast_to(empty, tokens.shape), tokens])
        layers = {id(layer): ip for layer, ip in zip(cross_attention_layers(unet), self.model.layers)}
        return ImageContext(tokens.astype(dtype), layers, scale)

    @property
    def _dtype(self):
        return self.model.layers[0].to_k_ip.weight.dtype


def pixels(image: Image.Image, size: int) -> mx.array:
    """transformers' CLIPImageProcessor: the short side resized to `size` (bicubic), the centre `size` x `size` cut
    out, scaled to [0, 1] and normalised with CLIP's mean and std. (1, size, size, 3) float32."""
    image = image.convert("RGB")
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    long = int(size * long / short)
    resized = image.resize((size, long) if w <= h else (long, size), Image.BICUBIC)
    rw, rh = resized.size
    left, top = (rw - size) // 2, (rh - size) // 2
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    normalised = (cropped - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return mx.array(normalised[None])
