"""Pixels in and out: PIL <-> arrays, img2img resize modes, inpainting masks, "only masked" crops, previews.

Arrays are (B, H, W, 3) float32 in [-1, 1], the range the VAE works in. Conversions round like diffusers'
VaeImageProcessor (`(x / 2 + 0.5).clip(0, 1) * 255`, rounded), so images compare pixel for pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter, ImageOps

# A1111: "Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)" (img2img.py: the image
# is encoded at its own size and its latents interpolated)
RESIZE_MODES = ("resize", "crop", "fill", "latent")
# A1111's "Masked content": what the area to repaint starts from (mlx_sd/img2img.py)
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")


def to_array(images: Image.Image | Sequence[Image.Image]) -> mx.array:
    """RGB PIL image(s) -> (B, H, W, 3) float32 in [-1, 1]."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    data = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return mx.array(data * 2.0 - 1.0)


def to_pil(images: mx.array) -> list[Image.Image]:
    """(B, H, W, 3) in [-1, 1] -> RGB PIL images."""
    data = np.array(mx.clip(images.astype(mx.float32) / 2 + 0.5, 0, 1))
    return [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in data]


def resize(image: Image.Image, width: int, height: int, mode: str = "resize") -> Image.Image:
    """Fit `image` to width x height as A1111's img2img resize modes do (same sizes and placement).

    resize: stretch to the target size. crop: scale to cover the target, then centre-crop. fill: scale to fit
    inside, centre, and fill the empty bands by stretching the image's outermost rows/columns.
    """
    if mode not in RESIZE_MODES[:3]:
        raise ValueError(f"resize mode {mode!r} is not one of {RESIZE_MODES[:3]} (images)")
    image = image.convert("RGB")
    if mode == "resize" or image.size == (width, height):
        return image.resize((width, height), Image.LANCZOS)
    w, h = image.size
    wider = width / height > w / h  # the target is wider than the image
    if (mode == "crop") == wider:  # scale to the target's width
        sw, sh = width, h * width // w
    else:  # scale to the target's height
        sw, sh = w * height // h, height
    scaled = image.resize((sw, sh), Image.LANCZOS)
    x0, y0 = width // 2 - sw // 2, height // 2 - sh // 2
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, (x0, y0))
    if mode == "fill" and x0 > 0:  # bands left and right
        canvas.paste(scaled.resize((x0, height), box=(0, 0, 0, sh)), (0, 0))
        canvas.paste(scaled.resize((width - x0 - sw, height), box=(sw, 0, sw, sh)), (x0 + sw, 0))
    if mode == "fill" and y0 > 0:  # bands above and below
        canvas.paste(scaled.resize((width, y0), box=(0, 0, sw, 0)), (0, 0))
        canvas.paste(scaled.resize((width, height - y0 - sh), box=(0, sh, sw, sh)), (0, y0 + sh))
    return canvas


def prepare_mask(mask: Image.Image, blur: float = 0.0, invert: bool = False) -> Image.Image:
    """Grayscale mask, white = repaint; optionally inverted, then Gaussian-blurred by `blur` pixels."""
    mask = mask.convert("L")
    if invert:
        mask = ImageOps.invert(mask)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


@dataclass(frozen=True)
class CropRegion:
    """A box (left, top, right, bottom) in the original image, for "only masked" inpainting."""

    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.right - self.left, self.bottom - self.top

    def box(self) -> tuple[int, int, int, int]:
        return self.left, self.top, self.right, self.bottom


def mask_crop_region(mask: Image.Image, padding: int, width: int, height: int) -> CropRegion:
    """The box around the mask's non-zero pixels, grown by `padding` and then to the working aspect ratio.

    Growing to width:height keeps the crop undistorted when it is scaled to the working size (A1111's
    "inpaint only masked" with "only masked padding"). The box is shifted, not shrunk, to stay inside the image.
    """
    W, H = mask.size
    bbox = mask.getbbox()
    if bbox is None:
        return CropRegion(0, 0, W, H)
    x1, y1, x2, y2 = bbox
    x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, W), min(y2 + padding, H)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow((y1, y2), round((x2 - x1) * height / width), H)
    else:
        x1, x2 = _grow((x1, x2), round((y2 - y1) * width / height), W)
    return CropRegion(x1, y1, x2, y2)


def _grow(span: tuple[int, int], length: int, limit: int) -> tuple[int, int]:
    """Grow [a, b) symmetrically to `length` (at most `limit`), shifted to stay within [0, limit)."""
    a, b = span
    length = min(length, limit)
    extra = length - (b - a)
    a -= extra // 2
    b = a + length
    shift = max(0, -a) - max(0, b - limit)
    return a + shift, b + shift


def paste_back(
    original: Image.Image, generated: Image.Image, mask: Image.Image, region: CropRegion | None
) -> Image.Image:
    """Put a generated image (or crop) over the original where the mask is white, keep the original elsewhere."""
    base = original.convert("RGB")
    if region is not None:
        patch = base.copy()
        patch.paste(generated.resize(region.size, Image.LANCZOS), (region.left, region.top))
        generated = patch
    return Image.composite(generated.convert("RGB").resize(base.size), base, mask.convert("L").resize(base.size))


# Linear maps from the latent channels to RGB: a preview at zero cost (A1111's "Approx cheap" factors; SD3's 16
# channels: ComfyUI's, with their bias in LATENT_RGB_BIAS).
_SD3_RGB = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)  # fmt: skip
LATENT_RGB = {
    "sd": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "sdxl": (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
    "sd3": _SD3_RGB,
}
LATENT_RGB_BIAS = {"sd3": (0.2394, 0.2135, 0.1925)}


def latent_preview(latents: mx.array, kind: str = "sd") -> list[Image.Image]:
    """Scaled latents (B, h, w, channels) -> small RGB previews (h x w pixels), no VAE."""
    rgb = latents.astype(mx.float32) @ mx.array(LATENT_RGB[kind])
    return to_pil(rgb + mx.array(LATENT_RGB_BIAS[kind]) if kind in LATENT_RGB_BIAS else rgb)


FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))  # (blur radius, repeats), coarse to fine


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the area to repaint takes ever finer blurs of the colours around it.

    The kept pixels are blurred with premultiplied alpha (so the hole contributes nothing) and layered coarse to
    fine; the last, unblurred layer restores the kept area exactly.
    """
    keep = ImageOps.invert(mask.convert("L"))
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    out = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")
