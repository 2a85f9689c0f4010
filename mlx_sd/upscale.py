"""The upscalers of AUTOMATIC1111's hires fix: six latent modes, the model-free image ones, and A1111's upscale loop.

A latent upscaler resizes the first pass's (B, h, w, C) latents before the second pass. A1111 does this with
`torch.nn.functional.interpolate(latents, size=..., mode=..., antialias=...)`, so each mode here is torch's own
resampling (its CPU weights, align_corners=False) written as one (out, in) matrix per axis: a hires fix with the
same seed starts its second pass from the same latents, to float32 rounding. An image upscaler resizes the decoded
first-pass image instead, as A1111's `images.resize_image(0, ...)` does: Lanczos, Nearest, or a model upscaler
(ESRGAN, Real-ESRGAN, ...: `mlx_sd.model_upscaler`, which a `Pipeline` loads by name).
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from PIL import Image

LATENT_UPSCALERS = {  # A1111's `shared.latent_upscale_modes`: name -> (interpolate mode, antialias)
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = ("None", "Lanczos", "Nearest")
HIRES_UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)

BICUBIC_A = -0.75  # torch's plain bicubic (`get_cubic_upsample_coefficients`), as OpenCV
BICUBIC_AA_A = -0.5  # torch's antialiased bicubic (`aa_filter`), as Pillow's BICUBIC


def is_latent_upscaler(name: str) -> bool:
    """True for the upscalers that resize latents (A1111 then skips decoding the first pass)."""
    return name in LATENT_UPSCALERS


def _linear(x: np.ndarray) -> np.ndarray:
    return np.maximum(1.0 - np.abs(x), 0.0)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel; torch's `cubic_convolution1` (|x| < 1) and `cubic_convolution2` (|x| < 2)."""
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, inner, np.where(x < 2, outer, 0.0))


def _scale(n_in: int, n_out: int) -> np.float32:
    # torch places output pixels on the input in float32 (the opmath of a float32 input), from this float32 ratio.
    # The positions below repeat its float32 roundings: in float64 they move by up to ~1e-5 pixel at 100 pixels,
    # which shows in the output at that size, and a nearest index can flip where a position lands on an integer.
    return np.float32(n_in) / np.float32(n_out)


def _nearest_weights(n_in: int, n_out: int, exact: bool) -> np.ndarray:
    scale = _scale(n_in, n_out)
    dst = np.arange(n_out)
    if exact:  # torch's `floorf((dst + 0.5) * scale)`: a double product rounded to float
        src = np.floor(((dst + 0.5) * np.float64(scale)).astype(np.float32))
    else:
        src = np.floor(dst.astype(np.float32) * scale)
    weights = np.zeros((n_out, n_in))
    weights[dst, np.minimum(src.astype(np.int64), n_in - 1)] = 1.0
    return weights


def _interpolation_weights(n_in: int, n_out: int, cubic: bool) -> np.ndarray:
    """torch's plain bilinear/bicubic: fixed 2 or 4 taps, out-of-range taps clamped onto the edge pixel."""
    dst = np.arange(n_out)
    # one rounding to float32, as torch's compiled `scale * (dst + 0.5) - 0.5` (a fused multiply-add)
    src = (np.float64(_scale(n_in, n_out)) * (dst + 0.5) - 0.5).astype(np.float32).astype(np.float64)
    if not cubic:
        src = np.maximum(src, 0.0)  # `area_pixel_compute_source_index` clamps linear but not cubic
    base = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    taps = base[:, None] + (np.arange(-1, 3) if cubic else np.arange(2))  # (n_out, taps)
    kernel = _cubic(src[:, None] - taps, BICUBIC_A) if cubic else _linear(src[:, None] - taps)
    weights = np.zeros((n_out, n_in))
    np.add.at(weights, (dst[:, None], np.clip(taps, 0, n_in - 1)), kernel)
    return weights


def _antialias_weights(n_in: int, n_out: int, cubic: bool) -> np.ndarray:
    """torch's `_upsample_*_aa` (UpSampleKernel.cpp `_compute_weights_aa`), which follows Pillow's resampling.

    When shrinking, the kernel is stretched by the scale so every input pixel contributes; at the borders the taps
    outside the image are dropped and the rest renormalised, rather than clamped onto the edge pixel.
    """
    scale = _scale(n_in, n_out)
    interp_size = 4 if cubic else 2
    support = np.float32(interp_size / 2 * max(scale, 1.0))
    max_taps = math.ceil(support) * 2 + 1
    center = (np.float64(scale) * (np.arange(n_out) + 0.5)).astype(np.float32)
    # int() truncation, not floor, as torch's static_cast<int64_t>; the start may be negative before clamping
    start = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5), 0).astype(np.int64)
    stop = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), n_in)
    count = np.clip(stop - start, 0, max_taps)
    src = np.arange(n_in)
    inside = (src >= start[:, None]) & (src < (start + count)[:, None])  # (n_out, n_in)
    invscale = np.float32(1.0) / scale if scale >= 1 else np.float32(1.0)
    x = ((src - center[:, None]).astype(np.float32) + 0.5) * np.float64(invscale)
    kernel = np.where(inside, _cubic(x, BICUBIC_AA_A) if cubic else _linear(x), 0.0)
    total = kernel.sum(axis=1, keepdims=True)
    return np.divide(kernel, total, out=kernel, where=total != 0)


def _resampling_weights(n_in: int, n_out: int, mode: str, antialias: bool) -> np.ndarray:
    """The (n_out, n_in) float32 matrix that `torch.nn.functional.interpolate` applies along one axis."""
    if mode in ("nearest", "nearest-exact"):
        weights = _nearest_weights(n_in, n_out, exact=mode == "nearest-exact")
    elif antialias:
        weights = _antialias_weights(n_in, n_out, cubic=mode == "bicubic")
    else:
        weights = _interpolation_weights(n_in, n_out, cubic=mode == "bicubic")
    return weights.astype(np.float32)


def upscale_latents(latents: mx.array, height: int, width: int, mode: str) -> mx.array:
    """Resize latents as A1111's latent upscalers do (torch's interpolate, align_corners=False).

    Args:
        latents: (B, h, w, C) float latents.
        height, width: the size in latents (pixels / 8), larger or smaller than (h, w).
        mode: one of LATENT_UPSCALERS, e.g. "Latent" (bilinear) or "Latent (bicubic antialiased)".

    Returns:
        (B, height, width, C) latents in the input's dtype, computed in float32.
    """
    if mode not in LATENT_UPSCALERS:
        raise ValueError(f"latent upscaler {mode!r} is not one of: {', '.join(LATENT_UPSCALERS)}")
    if height < 1 or width < 1:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    return interpolate(latents, height, width, *LATENT_UPSCALERS[mode])


def interpolate(x: mx.array, height: int, width: int, mode: str = "bilinear", antialias: bool = False) -> mx.array:
    """torch's `interpolate(x, size=(height, width), mode=mode, antialias=antialias)` (align_corners=False) on a
    (B, h, w, C) array: "bilinear", "bicubic", "nearest" or "nearest-exact"; computed in float32, returned in x's
    dtype."""
    _, h, w, _ = x.shape
    rows = mx.array(_resampling_weights(h, height, mode, antialias))  # (height, h)
    cols = mx.array(_resampling_weights(w, width, mode, antialias))  # (width, w)
    y = mx.einsum("yh,bhwc->bywc", rows, x.astype(mx.float32))  # (B, height, w, C)
    y = mx.einsum("xw,bywc->byxc", cols, y)  # (B, height, width, C)
    return y.astype(x.dtype)


def upscale_image(image: Image.Image, width: int, height: int, upscaler) -> Image.Image:
    """Resize a decoded image to width x height as A1111's `images.resize_image(0, image, width, height, upscaler)`.

    "None", and any upscaler when shrinking, is one Lanczos resize. To enlarge, the upscaler scales by the larger axis
    ratio as A1111's `Upscaler.upscale` does (`upscale_by`), then (Lanczos) to width x height wherever that size
    differs.

    Args:
        image: the decoded first-pass image.
        width, height: the target size in pixels.
        upscaler: one of IMAGE_UPSCALERS, or a loaded model upscaler (`mlx_sd.model_upscaler.ModelUpscaler`); other
            names ("R-ESRGAN 4x+", ...) raise ValueError: a `Pipeline` resolves them first.

    Returns:
        The width x height image.
    """
    if isinstance(upscaler, str) and upscaler not in IMAGE_UPSCALERS:
        if is_latent_upscaler(upscaler):
            raise ValueError(f"{upscaler!r} resizes latents, not images: use upscale_latents")
        raise ValueError(
            f"upscaler {upscaler!r} is a model upscaler that was not loaded; give the Pipeline an upscaler folder "
            f"(--upscaler-dir) or use a latent upscaler ({', '.join(LATENT_UPSCALERS)}) or {', '.join(IMAGE_UPSCALERS)}"
        )
    if upscaler == "None":
        return image.resize((width, height), resample=Image.LANCZOS)
    scale = max(width / image.width, height / image.height)
    if scale > 1.0:
        image = upscale_by(image, scale, upscaler)
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    return image


def upscale_by(image: Image.Image, scale: float, upscaler) -> Image.Image:
    """A1111's `Upscaler.upscale`: to the size times `scale` rounded down to multiples of 8. A model upscaler runs up
    to three times (a 4x model asked for 8x runs twice) until the image covers that size; "Lanczos" and "Nearest"
    resize by `scale` once. Then Lanczos to the exact size wherever it differs.

    Args:
        upscaler: "Lanczos", "Nearest" or a loaded model upscaler (a callable image -> image).
    """
    dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    if isinstance(upscaler, str):
        resample = Image.LANCZOS if upscaler == "Lanczos" else Image.NEAREST
        step = lambda im: im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)  # noqa: E731
    else:
        step = upscaler
    for i in range(3):
        # A1111 stops once the image covers the size (at once only when asked to scale by other than 1)
        if image.width >= dest[0] and image.height >= dest[1] and (i > 0 or scale != 1):
            break
        size = image.size
        image = step(image)
        if image.size == size:
            break
    if image.size != dest:
        image = image.resize(dest, resample=Image.LANCZOS)
    return image
