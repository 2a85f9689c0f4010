"""ControlNet preprocessors that need no network: the control image made from a photo ("module" in A1111's API).

"none" passes the image through (it is a control map already), "invert" turns black lines on white into white on
black (A1111's "invert (from white bg & black line)"), "canny" draws OpenCV's Canny edges (thresholds `threshold_a`
low, `threshold_b` high; A1111's defaults 100 and 200) at `processor_res` pixels on the short side, as A1111's
extension does (resize, Canny on an edge-padded image, crop). Preprocessors that run networks (depth, pose, lineart,
segmentation, ...) are not part of mlx-sd: pass their output as the control image with module "none".
Canny needs OpenCV (`pip install 'mlx-sd[controlnet]'`).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PREPROCESSORS = ("none", "invert", "canny")
CANNY_DEFAULTS = (100.0, 200.0)  # A1111's low and high thresholds
PROCESSOR_RES = 512  # A1111's default preprocessor resolution (short side)
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
    low, high = (d if t is None else t for t, d in zip((threshold_a, threshold_b), CANNY_DEFAULTS))
    return _canny(image, processor_res, low, high)


def pixel_perfect_res(size: tuple[int, int], width: int, height: int, resize_mode: str) -> int:
    """A1111's "Pixel Perfect" preprocessor resolution: the image's short side scaled as the resize mode will scale
    the image to width x height (to cover it; to fit inside it for "fill")."""
    w, h = size
    scale = (min if resize_mode == "fill" else max)(height / h, width / w)
    return round(scale * min(w, h))


def _canny(image: Image.Image, res: int, low: float, high: float) -> Image.Image:
    try:
        import cv2
    except ImportError:
        raise ValueError("the canny preprocessor needs OpenCV: pip install 'mlx-sd[controlnet]'") from None
    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    k = res / min(h, w)
    height, width = round(h * k), round(w * k)
    # A1111: cubic when enlarging, area when shrinking; edge padding to a multiple of 64, removed afterwards
    resample = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    pixels = cv2.resize(pixels, (width, height), interpolation=resample)
    pad = [(0, math.ceil(n / _PAD_TO) * _PAD_TO - n) for n in (height, width)] + [(0, 0)]
    edges = cv2.Canny(np.pad(pixels, pad, mode="edge"), low, high)[:height, :width]
    return Image.fromarray(edges).convert("RGB")
