"""AUTOMATIC1111's "Extras" upscaling (`scripts/postprocessing_upscale.py`): an image upscaled on its own, no diffusion.

Scale by a factor (capped by `max_side_length`) or to a width x height (the larger ratio, then optionally a centred
crop onto that canvas); each upscaler runs A1111's upscale loop (`mlx_sd.upscale.upscale_by`: the size times the
factor rounded down to multiples of 8). A second upscaler's result can be blended in (`Image.blend`). The fields
A1111 records ("Postprocess upscale by", "Postprocess upscaler", ...) come back with the image; A1111 writes them to
the PNG's "postprocessing" text.
"""

from __future__ import annotations

from PIL import Image

from .infotext import format_params
from .upscale import IMAGE_UPSCALERS, upscale_by

POSTPROCESSING_KEY = "postprocessing"  # the PNG text chunk A1111 writes the fields to


def limit_size(w: float, h: float, limit: int) -> tuple[int, int]:
    """A1111's `limit_size_by_one_dimention`: the longer side brought down to `limit` (0: no limit), aspect kept."""
    if h > w and h > limit > 0:
        w, h = limit * w // h, limit
    elif w > limit > 0:
        w, h = limit, limit * h // w
    return int(w), int(h)


def extras_upscale(
    image: Image.Image,
    upscaler,
    scale: float = 2.0,
    size: tuple[int, int] | None = None,
    crop: bool = True,
    max_side_length: int = 0,
    upscaler_2=None,
    upscaler_2_visibility: float = 0.0,
) -> tuple[Image.Image, dict]:
    """Upscale an image as A1111's Extras tab does.

    Args:
        image: any image (converted to RGB, as A1111).
        upscaler, upscaler_2: "None", "Lanczos", "Nearest" or a loaded model upscaler (`mlx_sd.model_upscaler`);
            "None" as the first leaves the image as it is.
        scale: "Scale by" (used when `size` is None), capped so neither side exceeds `max_side_length` (0: no cap).
        size: "Scale to" (width, height); `crop` centres the result on a canvas of exactly that size.
        upscaler_2_visibility: the second upscaler's share of the blend (0-1).

    Returns:
        The image and A1111's postprocessing fields (empty when nothing was done).
    """
    for name in (upscaler, upscaler_2):
        if isinstance(name, str) and name not in IMAGE_UPSCALERS:
            raise ValueError(f"upscaler {name!r}: the Extras upscalers are {', '.join(IMAGE_UPSCALERS)} or a model")
    if not 0.0 <= upscaler_2_visibility <= 1.0:
        raise ValueError(f"upscaler_2_visibility={upscaler_2_visibility}: must be within [0, 1]")
    image = image.convert("RGB")
    if upscaler == "None":
        return image, {}
    info: dict = {}
    if size is not None:
        width, height = size
        if min(width, height) < 1:
            raise ValueError(f"upscale to {width}x{height}: both sides must be positive")
        factor = max(width / image.width, height / image.height)
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        if scale <= 0:
            raise ValueError(f"upscale by {scale}: must be > 0")
        factor, info["Postprocess upscale by"] = scale, scale
        if max_side_length and max(image.size) * scale > max_side_length:
            width, height = limit_size(image.width * scale, image.height * scale, max_side_length)
            factor, crop = max(width / image.width, height / image.height), False
            info["Max side length"] = max_side_length
    result = _upscaled(image, upscaler, factor, size, crop, info)
    info["Postprocess upscaler"] = _name(upscaler)
    if upscaler_2 not in (None, "None") and upscaler_2_visibility > 0:
        second = _upscaled(image, upscaler_2, factor, size, crop, info)
        result = Image.blend(result, second, upscaler_2_visibility)
        info["Postprocess upscaler 2"] = _name(upscaler_2)
    return result, info


def extras_infotext(info: dict) -> str:
    """The "postprocessing" text A1111 writes for these fields."""
    return format_params(info)


def _name(upscaler) -> str:
    return upscaler if isinstance(upscaler, str) else upscaler.name


def _upscaled(image, upscaler, factor: float, size, crop: bool, info: dict) -> Image.Image:
    result = upscale_by(image, factor, upscaler)
    if size is not None and crop:
        width, height = size
        canvas = Image.new("RGB", (width, height))
        canvas.paste(result, (width // 2 - result.width // 2, height // 2 - result.height // 2))
        result = canvas
        info["Postprocess crop to"] = f"{width}x{height}"
    return result
