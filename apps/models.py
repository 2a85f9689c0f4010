"""Which model to run: a converted folder, or anything the converter accepts, converted once and cached."""

from __future__ import annotations

from pathlib import Path

from mlx_sd.model import MANIFEST

from .errors import UserError

# The Stable Diffusion 1.5 weights as published by Runway, now kept at this id by the community after the original
# runwayml/stable-diffusion-v1-5 repository was removed (CreativeML OpenRAIL-M). SD 1.5 is the smallest widely used
# model (2 GB in float16): it runs on every Apple Silicon Mac.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def resolve_model(spec: str | None) -> Path:
    """The converted folder for `spec` (default: DEFAULT_MODEL), converting and caching it on first use."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():
        return path
    from mlx_sd_convert import ConversionError
    from mlx_sd_convert.cache import converted

    try:
        return converted(spec)
    except ConversionError as e:
        raise UserError(str(e)) from None
