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

from .models.clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionModelWithProjection
from .models.layers import LayerNorm


class ImageProjection(nn.Module):
    """diffusers' ImageProjection: one embedding -> `tokens` tokens of width `dim` (Linear, then LayerNorm each)."""

    def __init__(self, embed_dim: int, dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * dim)
        self.norm = LayerNorm(dim)

    def __call__(self, embeds: mx.array) -> mx.array:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))  # (B, tokens, dim)


class IPLayer(nn.Module):
    """One cross-attention layer's keys and values for the image tokens."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(dim, inner, bias=False)
        self.to_v_ip = nn.Linear(dim, inner, bias=False)


class IPAdapterModel(nn.Module):
    """The adapter's weights: `image_proj`, and `layers[i]` for the UNet's i-th cross-attention layer in diffusers'
    attention-processor order (down blocks, up blocks, then the middle block: `cross_attention_layers`)."""

    def __init__(self, embed_dim: int, dim: int, tokens: int, inners: list[int]):
        super().__init__()
        self.image_proj = ImageProjection(embed_dim, dim, tokens)
        self.layers = [IPLayer(dim, inner) for inner in inners]


def cross_attention_layers(unet) -> list:
    """The UNet's cross-attention (attn2) layers in the order IP-Adapter files number them: diffusers registers
    `down_blocks` and `up_blocks` before `mid_block`, and its attention processors follow that order."""
    layers = []
    for block in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]:
        for attention in block.attentions if "attentions" in block else []:
            layers += [tb.attn2 for tb in attention.transformer_blocks]
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
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

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

    def embed(self, image: Image.Image) -> mx.array:
        """(1, embed_dim) image embedding of `image` (CLIPImageProcessor's resize, centre crop and normalisation)."""
        return self.encoder(pixels(image, self.encoder.config.image_size).astype(self._dtype))

    def context(self, embeds: mx.array, unet, batch: int, guided: bool, scale: float, dtype) -> ImageContext:
        """The image tokens for a batch of `batch` images ([unconditional; conditional] when guided)."""
        tokens = self.model.image_proj(embeds.astype(self._dtype))
        tokens = mx.broadcast_to(tokens, (batch, *tokens.shape[1:]))
        if guided:  # the unconditional half sees the projection of a zero embedding (diffusers)
            empty = self.model.image_proj(mx.zeros_like(embeds).astype(self._dtype))
            tokens = mx.concatenate([mx.broadcast_to(empty, tokens.shape), tokens])
        layers = {id(layer): ip for layer, ip in zip(cross_attention_layers(unet), self.model.layers)}
        return ImageContext(tokens.astype(dtype), layers, scale)

    @property
    def _dtype(self):
        return self.model.image_proj.proj.weight.dtype


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
