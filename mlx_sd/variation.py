"""A1111's variation seeds and seed resize: how the initial noise of image i is made from seed + i.

As A1111's `ImageRNG.first` (modules/rng.py):
- Variation seed: the noise of the image's seed is blended towards the first draw of its variation seed
  (`subseed + i`) by `subseed_strength`, with A1111's `slerp`, which measures angles per (channel, column): its norms
  run over the rows axis of a (C, H, W) draw. Nearly parallel draws (mean cosine > 0.9995) are blended linearly, with
  A1111's weights (strength on the seed's noise).
- Seed resize ("resize seed from width/height"): the seed's noise is drawn at that other size (from a fresh
  generator) and its centre pasted into the image's own draw, so a seed keeps its composition at another size.
Only that first draw changes: the sampler's noise goes on from the seed's own generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx
import numpy as np

from .rng import make_noise

LINEAR_ABOVE = 0.9995  # A1111's slerp falls back to a linear blend above this mean cosine


def slerp(strength: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's `slerp(val, low, high)` on (C, H, W) float32 draws, in float32."""
    low_norm = low / np.linalg.norm(low, axis=1, keepdims=True)
    high_norm = high / np.linalg.norm(high, axis=1, keepdims=True)
    dot = (low_norm * high_norm).sum(axis=1)
    if dot.mean() > LINEAR_ABOVE:
        return low * np.float32(strength) + high * np.float32(1 - strength)
    omega = np.arccos(dot)
    so = np.sin(omega)
    a = (np.sin(np.float32(1.0 - strength) * omega) / so)[:, None]
    b = (np.sin(np.float32(strength) * omega) / so)[:, None]
    return a * low + b * high


def _first_draw(mode: str, seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.array(make_noise(mode, seed).normal((1, *shape)))[0]


def vary_noise(
    draw: mx.array,
    mode: str,
    seeds: Sequence[int],
    subseeds: Sequence[int] | None = None,
    strength: float = 0.0,
    resize_from: tuple[int, int] = (0, 0),
) -> mx.array:
    """The initial noise of a batch with variation seeds and seed resize applied.

    Args:
        draw: (B, C, H, W) float32, each image's first draw from its own seed (NCHW, as drawn).
        mode: the noise mode ("torch-cpu", "mlx", ...) of the fresh draws.
        seeds: image i's seed; subseeds: its variation seed (None, or strength 0: no variation).
        resize_from: (height, width) in pixels to draw the seed's noise at; (0, 0) (or either <= 0): no resize.
    """
    B, C, H, W = draw.shape
    varied = strength != 0 and subseeds is not None
    resized = resize_from[0] > 0 and resize_from[1] > 0
    if not varied and not resized:
        return draw
    own = np.array(draw.astype(mx.float32))
    shape = (C, resize_from[0] // 8, resize_from[1] // 8) if resized else (C, H, W)
    out = []
    for i in range(B):
        noise = _first_draw(mode, seeds[i], shape) if resized else own[i]
        if varied:
            noise = slerp(strength, noise, _first_draw(mode, subseeds[i], shape))
        if resized:
            noise = _paste_centre(own[i].copy(), noise)
        out.append(noise)
    return mx.array(np.stack(out)).astype(draw.dtype)


def _paste_centre(x: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """A1111's paste of the resized noise into the image's own draw: centred, cropped where it is larger."""
    dx, dy = (x.shape[2] - noise.shape[2]) // 2, (x.shape[1] - noise.shape[1]) // 2
    w = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    h = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty, dx, dy = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
    return x
