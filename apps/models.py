"""Which model to run: a converted folder, or anything the converter accepts, converted once and cached."""

from __future__ import annotations

from pathlib import Path

from mlx_sd.model import MANIFEST

from .errors import UserError

# The Stable Diffusion 1.5 weights as published by Runway, kept at this id by the community since the original
# runwayml/stable-diffusion-v1-5 repository was removed (CreativeML OpenRAIL-M). SD 1.5 is the smallest widely used
# model (about 2 GB in float16), so it runs on every Apple Silicon Mac.
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_MODEL_OPTIONS = {"variant": "fp16"}  # its fp16 files: half the download, the same float16 weights
OFFLINE_HINT = (
    "to use a checkpoint you already have, pass it directly (--model ~/Downloads/model.safetensors) "
    "or convert it once (mlx-sd convert ~/Downloads/model.safetensors ~/models/my-model) and pass that folder"
)


def resolve_model(spec: str | None, progress=None) -> Path:
    """The converted folder for `spec` (default: DEFAULT_MODEL), converting and caching it on first use."""
    options = DEFAULT_MODEL_OPTIONS if spec is None else {}
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if (path / MANIFEST).is_file():
        return path
    from mlx_sd_convert import ConversionError
    from mlx_sd_convert.cache import converted

    try:
        return converted(spec, progress=progress, **options)
    except ConversionError as e:
        hint = f"; {OFFLINE_HINT}" if not path.exists() else ""
        raise UserError(f"{e}{hint}") from None
