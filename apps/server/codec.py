"""Images in and out of requests: base64 and uploaded bytes to PIL (bounded, never from a path or URL), PNG out.

Every failure is a 422 naming the field; a crafted or truncated file never reaches the model and never stops
the server.
"""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, PngImagePlugin

from mlx_sd.infotext import PNG_KEY

from .errors import invalid

OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def b64decode(data: str, field: str) -> bytes:
    """Base64 (optionally a data: URL, whitespace and missing padding tolerated) to bytes."""
    if not isinstance(data, str) or not data.strip():
        raise invalid(field, "empty; expected base64 image data")
    text = data.strip()
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise invalid(field, "a data: URL must be base64 (data:image/png;base64,...)")
    elif text.startswith(("http://", "https://", "file:")):
        raise invalid(field, "must be base64 image data; this server never fetches URLs or opens files")
    text = "".join(text.split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "not valid base64 image data") from None


def open_image(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decoded image bytes, fully loaded; refused before decoding when larger than `max_pixels`."""
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > max_pixels:
            raise invalid(field, f"{width}x{height} is larger than this server accepts ({max_pixels} pixels)")
        image.load()
        return image
    except Exception as e:  # PIL raises many types on crafted input (OSError, SyntaxError, struct.error, ...)
        if hasattr(e, "status"):
            raise
        raise invalid(field, f"not a readable image ({type(e).__name__})") from None


def decode_image(data: str, field: str, max_pixels: int) -> Image.Image:
    return open_image(b64decode(data, field), field, max_pixels)


def encode(
    image: Image.Image, infotext: str | None = None, fmt: str = "png", quality: int | None = None, texts=None
) -> bytes:
    """PNG (with the infotext in its `parameters` chunk, as A1111 writes it, and any other `texts` chunks), JPEG or
    WebP bytes."""
    kind = OUTPUT_FORMATS[fmt.lower()]
    out = io.BytesIO()
    if kind == "PNG":
        chunks = {PNG_KEY: infotext} if infotext else {}
        chunks |= texts or {}
        meta = PngImagePlugin.PngInfo() if chunks else None
        for key, text in chunks.items():
            meta.add_text(key, text)
        image.save(out, format="PNG", pnginfo=meta)
    else:
        image.convert("RGB").save(out, format=kind, quality=95 if quality is None else quality)
    return out.getvalue()


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def text_chunks(image: Image.Image) -> dict[str, str]:
    """The string entries of a decoded image's info (PNG text chunks and the like)."""
    return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
