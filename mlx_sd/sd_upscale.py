"""AUTOMATIC1111's "SD upscale" img2img script (`scripts/sd_upscale.py`): enlarge an image with an upscaler, then
redraw it tile by tile with img2img at the model's size, and join the tiles again.

As A1111 runs it: the init image (transparency flattened onto white) is upscaled by `scale` with the upscaler
(`mlx_sd.upscale.upscale_by`: A1111's loop, sizes rounded down to multiples of 8; "None" keeps it), cut into tiles of
the request's width x height overlapping by `overlap` pixels (`mlx_sd.grid`), each tile goes through img2img with
the request's settings, and the redrawn tiles are joined with A1111's linear ramps. Seeds follow A1111's batches:
with batch size b, tile i*b + j is drawn from seed + n + i + j for the n-th result (`batch_count` results, each
from the whole grid). Each result's infotext is its first tile's, plus "SD upscale overlap" and "SD upscale
upscaler".
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from PIL import Image

from .grid import combine_grid, split_grid
from .infotext import format_params
from .params import GenerationRequest
from .pipeline import Cancelled, Control, Pipeline, Progress, Result
from .upscale import IMAGE_UPSCALERS, upscale_by

TITLE = "SD upscale"  # the script's name in A1111 (its API's script_name)
DEFAULT_OVERLAP = 64  # A1111's "Tile overlap" default
BACKGROUND = "#ffffff"  # A1111's img2img_background_color: what transparent pixels become


@dataclass(frozen=True)
class SDUpscale:
    """The script's settings: `upscaler` ("None", "Lanczos", "Nearest" or a loaded model upscaler), `scale` (A1111's
    "Scale Factor"), `overlap` ("Tile overlap", pixels)."""

    upscaler: object = "None"
    scale: float = 2.0
    overlap: int = DEFAULT_OVERLAP

    @property
    def name(self) -> str:
        return self.upscaler if isinstance(self.upscaler, str) else self.upscaler.name


def check(request: GenerationRequest, settings: SDUpscale) -> None:
    """Refuse what the script cannot run, before any work (ValueError naming the field)."""
    problems = [
        (request.init_image is not None, "SD upscale redraws an image: give init_image"),
        (request.mask is None, "SD upscale redraws the whole image: drop the mask"),
        (not request.enable_hr, "SD upscale is an img2img script: drop enable_hr"),
        (settings.scale > 0, f"SD upscale scale={settings.scale}: must be > 0"),
        (not isinstance(settings.upscaler, str) or settings.upscaler in IMAGE_UPSCALERS,
         f"SD upscale upscaler {settings.upscaler!r}: one of {', '.join(IMAGE_UPSCALERS)} or a loaded model"),
    ]  # fmt: skip
    for ok, message in problems:
        if not ok:
            raise ValueError(message)
    width, height = request.width, request.height  # the tile size
    if width is not None and height is not None and not 0 <= settings.overlap < min(width, height):
        raise ValueError(f"SD upscale overlap={settings.overlap}: must be at least 0 and below the tile size "
                         f"({width}x{height})")  # fmt: skip


def stream(
    pipeline: Pipeline, request: GenerationRequest, settings: SDUpscale, control: Control | None = None
) -> Iterator[Progress | Result]:
    """Run the script: yields every tile's `Progress` (batch / batches count the tiles of all results), then one
    `Result` holding the `batch_count` joined images.

    Raises:
        ValueError: invalid settings (named), before any work.
        Cancelled: `control.cancel()` was called; carries the results joined before.
    """
    defaults = pipeline.defaults
    width, height = request.width or defaults.width, request.height or defaults.height
    check(replace(request, width=width, height=height), settings)
    seed = request.seed if request.seed is not None else secrets.randbits(32)
    source = request.init_image
    if source.mode in ("RGBA", "LA") or "transparency" in source.info:
        flat = Image.new("RGBA", source.size, BACKGROUND)
        source = Image.alpha_composite(flat, source.convert("RGBA"))
    image = source.convert("RGB")
    if settings.upscaler != "None":
        image = upscale_by(image, settings.scale, settings.upscaler)
    grid = split_grid(image, width, height, settings.overlap)
    tiles = [tile for _, _, row in grid for _, _, tile in row]
    per_result = len(tiles)
    start = time.perf_counter()
    joined, infotexts, seeds, timings = [], [], [], {}
    extra = format_params({"SD upscale overlap": settings.overlap, "SD upscale upscaler": settings.name})
    for n in range(request.batch_count):
        redrawn = []
        for k, tile in enumerate(tiles):
            i, j = divmod(k, request.batch_size)
            tile_request = replace(request, init_image=tile, width=width, height=height, seed=seed + n + i + j,
                                   batch_size=1, batch_count=1, resize_mode="resize")  # fmt: skip
            try:
                for event in pipeline.stream(tile_request, control):
                    if isinstance(event, Progress):
                        yield replace(event, batch=n * per_result + k, batches=request.batch_count * per_result,
                                      elapsed=time.perf_counter() - start)  # fmt: skip
                    else:
                        result = event
            except Cancelled:
                raise Cancelled(joined) from None
            redrawn.append(result.images[0])
            if k == 0:
                infotexts.append(f"{result.infotexts[0]}, {extra}")
                seeds.append(result.seeds[0])
            for key, value in result.timings.items():
                timings[key] = timings.get(key, 0.0) + value
        pieces = iter(redrawn)
        rows = [(y, h, [(x, w, next(pieces)) for x, w, _ in row]) for y, h, row in grid]
        joined.append(combine_grid(rows, image.width, image.height, settings.overlap))
    yield Result(joined, infotexts, replace(request, seed=seed, width=width, height=height), seeds, timings)
