"""Tiled VAE decode and encode: large images in overlapping tiles, blended, with bounded activation memory.

The decoder's activations at 1024x1024 take several GB; decoding 512-pixel tiles one at a time (each evaluated
before the next) keeps the peak near one tile's. Tiles overlap by `overlap` of their size and are blended with linear
ramps, exactly as diffusers' `AutoencoderKL.enable_tiling()` does (the same tile grid, blend order and crop), so tiled
results match diffusers' tiled results. A tiled result differs slightly from an untiled one: each tile's GroupNorm
and mid-block attention see only that tile.
"""

from __future__ import annotations

import mlx.core as mx

from .models.vae import AutoencoderKL, LatentDistribution

DEFAULT_TILE = 512  # pixels per tile side (64 latents), the size SD 1.x was trained at
DEFAULT_OVERLAP = 0.25


def _blend(prev: mx.array, tile: mx.array, extent: int, axis: int) -> mx.array:
    """Ramp from the end of `prev` into the start of `tile` over `extent` rows (axis 1) or columns (axis 2)."""
    extent = min(prev.shape[axis], tile.shape[axis], extent)
    if extent == 0:
        return tile
    ramp = mx.arange(extent, dtype=mx.float32) / extent  # weight of `tile`: 0, 1/extent, ...
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    ramp = ramp.reshape(shape).astype(tile.dtype)
    head = [slice(None)] * 4
    head[axis] = slice(0, extent)
    tail = [slice(None)] * 4
    tail[axis] = slice(prev.shape[axis] - extent, None)
    mixed = prev[tuple(tail)] * (1 - ramp) + tile[tuple(head)] * ramp
    rest = [slice(None)] * 4
    rest[axis] = slice(extent, None)
    return mx.concatenate([mixed, tile[tuple(rest)]], axis=axis)


def _tiled(x: mx.array, fn, in_tile: int, out_tile: int, overlap: float) -> mx.array:
    """Apply `fn` to overlapping (in_tile x in_tile) tiles of NHWC `x` and blend its (out_tile-sized) outputs."""
    stride = int(in_tile * (1 - overlap))
    extent = int(out_tile * overlap)
    keep = out_tile - extent
    H, W = x.shape[1:3]
    rows = []
    for i in range(0, H, stride):
        row = []
        for j in range(0, W, stride):
            tile = fn(x[:, i : i + in_tile, j : j + in_tile])
            mx.eval(tile)  # one tile's activations at a time
            row.append(tile)
        rows.append(row)
    # Blend each tile with its (already blended) upper and left neighbours, as diffusers does in place.
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], extent, axis=1)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], extent, axis=2)
        out_rows.append(mx.concatenate([t[:, :keep, :keep] for t in row], axis=2))
    return mx.concatenate(out_rows, axis=1)


def tiled_decode(
    vae: AutoencoderKL, latents: mx.array, tile: int = DEFAULT_TILE, overlap: float = DEFAULT_OVERLAP
) -> mx.array:
    """Decode (B, h, w, C) unscaled latents in tiles of `tile` pixels; same result as diffusers' tiled decode."""
    latent_tile = tile // vae.config.downscale
    if max(latents.shape[1:3]) <= latent_tile:
        return vae.decode(latents)
    return _tiled(latents, vae.decode, latent_tile, tile, overlap)


def tiled_encode(
    vae: AutoencoderKL, images: mx.array, tile: int = DEFAULT_TILE, overlap: float = DEFAULT_OVERLAP
) -> LatentDistribution:
    """Encode (B, H, W, 3) images in tiles of `tile` pixels; same result as diffusers' tiled encode."""
    if max(images.shape[1:3]) <= tile:
        return vae.encode(images)
    moments = _tiled(images, vae.encode_moments, tile, tile // vae.config.downscale, overlap)
    return LatentDistribution.from_moments(moments)
