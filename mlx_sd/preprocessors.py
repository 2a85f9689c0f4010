"""ControlNet preprocessors that need no network: the control image made from a photo ("module" in A1111's API).

As A1111's ControlNet extension runs them (its processor.py), in OpenCV (`pip install 'mlx-sd[controlnet]'`):
    none              the image is a control map already
    invert            black lines on white -> white on black ("invert (from white bg & black line)")
    canny             Canny edges, thresholds `threshold_a` low and `threshold_b` high (100, 200)
    lineart_standard  lines from a difference of Gaussians (sigma 6), normalised by the median stroke
                      ("lineart_standard (from white bg & black line)")
    scribble_xdog     strokes from a difference of Gaussians (sigmas 0.5 and 5), `threshold_a` (32)
    threshold         white where every channel exceeds `threshold_a` (127)
    tile_resample     for the tile ControlNet: shrink by the factor `threshold_a` (1: unchanged; below 1.1 ignored)
All but invert and tile_resample work at `processor_res` pixels on the short side on an edge-padded image (A1111's
resize_image_with_pad: cubic up, area down, padded to a multiple of 64, cropped back). Preprocessors that run networks
(depth, pose, lineart, segmentation, ...) are not part of mlx-sd: pass their output with module "none".
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PREPROCESSORS = ("none", "invert", "canny", "lineart_standard", "scribble_xdog", "threshold", "tile_resample")
CANNY_DEFAULTS = (100.0, 200.0)  # A1111's low and high thresholds
# A1111's defaults of threshold_a where a module reads it
THRESHOLD_A = {"canny": CANNY_DEFAULTS[0], "scribble_xdog": 32.0, "threshold": 127.0, "tile_resample": 1.0}
LINEART_SIGMA = 6.0
XDOG_SIGMAS = (0.5, 5.0)
LINEART_MIN_NORM, LINEART_STROKE = 16.0, 8.0  # the median of intensities above 8, at least 16, maps to 127
TILE_MIN_RATE = 1.1  # A1111 ignores tile_resample rates below this
PROCESSOR_RES = 512  # A1111's default preprocessor resolution (short side)
AT_RESOLUTION = ("canny", "lineart_standard", "scribble_xdog", "threshold")  # the modules processor_res applies to
_PAD_TO = 64  # A1111 pads to a multiple of 64 before running a preprocessor


def preprocess(
    image: Image.Image,
    module: str,
    processor_res: int = PROCESSOR_RES,
    threshold_a: float | None = None,
    threshold_b: float | None = None,
) -> Image.Image:
    """The control image `module` makes from `image` (RGB)."""
    if module not in PREPROCESSORS:
        raise ValueError(
            f"ControlNet module {module!r}: mlx-sd runs {', '.join(PREPROCESSORS)}; preprocess with another tool "
            "and pass the result with module 'none'"
        )
    image = image.convert("RGB")
    if module == "none":
        return image
    if module == "invert":
        return Image.fromarray(255 - np.asarray(image))
    cv2 = _opencv(module)
    low = THRESHOLD_A.get(module) if threshold_a is None else threshold_a
    pixels = np.asarray(image)
    if module == "tile_resample":
        if low < TILE_MIN_RATE:
            return image
        h, w = pixels.shape[:2]
        return Image.fromarray(cv2.resize(pixels, (int(w / low), int(h / low)), interpolation=cv2.INTER_AREA))
    padded, (height, width) = _padded(cv2, pixels, processor_res)
    if module == "canny":
        high = CANNY_DEFAULTS[1] if threshold_b is None else threshold_b
        out = cv2.Canny(padded, low, high)
    elif module == "lineart_standard":
        x = padded.astype(np.float32)
        intensity = np.min(cv2.GaussianBlur(x, (0, 0), LINEART_SIGMA) - x, axis=2).clip(0, 255)
        strokes = intensity[intensity > LINEART_STROKE]
        intensity /= max(LINEART_MIN_NORM, np.median(strokes) if strokes.size else 0.0)
        out = (intensity * 127).clip(0, 255).astype(np.uint8)
    elif module == "scribble_xdog":
        x = padded.astype(np.float32)
        g1, g2 = (cv2.GaussianBlur(x, (0, 0), sigma) for sigma in XDOG_SIGMAS)
        dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
        out = np.where(2 * (255 - dog) > low, 255, 0).astype(np.uint8)
    else:  # threshold
        out = np.where(np.min(padded, axis=2) > low, 255, 0).astype(np.uint8)
    return Image.fromarray(out[:height, :width]).convert("RGB")


def pixel_perfect_res(size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """A1111's "Pixel Perfect" preprocessor resolution: the image's short side scaled as the resize mode will scale
    the image to width x height (to cover it; to fit inside it for "fill")."""
    w, h = size
    scale = (min if resize_mode == "fill" else max)(height / h, width / w)
    return round(scale * min(w, h))


def _opencv(module: str):
    try:
        import cv2
    except ImportError:
        raise ValueError(f"the {module} preprocessor needs OpenCV: pip install 'mlx-sd[controlnet]'") from None
    return cv2


def _padded(cv2, pixels: np.ndarray, res: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A1111's resize_image_with_pad: the short side at `res` (cubic when enlarging, area when shrinking), edge-padded
    to multiples of 64; returns the padded image and the size to crop the result back to."""
    h, w = pixels.shape[:2]
    k = res / min(h, w)
    height, width = round(h * k), round(w * k)
    resample = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    pixels = cv2.resize(pixels, (width, height), interpolation=resample)
    pad = [(0, math.ceil(n / _PAD_TO) * _PAD_TO - n) for n in (height, width)] + [(0, 0)]
    return np.pad(pixels, pad, mode="edge"), (height, width)
