"""A1111's "SD upscale" script against diffusers' img2img composed the way the script composes it: the init image
upscaled (A1111's loop), cut by A1111's `split_grid`, every tile redrawn by diffusers' img2img with the seed A1111's
batches give it, joined by A1111's `combine_grid` (tests/a1111_upscale.py). Tiny random-weight SD 1.x model."""

from __future__ import annotations

import a1111_upscale
import numpy as np
import pytest
from PIL import Image
from test_pipeline import MIN_PSNR, PROMPT, as_array, diffusers_pipe, generators

from mlx_sd.infotext import parse_infotext
from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Progress, Result
from mlx_sd.sd_upscale import SDUpscale, stream
from oracles import psnr

SEED, STEPS, GUIDANCE, STRENGTH, OVERLAP = 21, 6, 6.0, 0.6, 16


def _reference(parts, init: Image.Image, tile: tuple[int, int], batch_size: int) -> Image.Image:
    lanczos = lambda im: im.resize((int(im.width * 2), int(im.height * 2)), Image.LANCZOS)  # noqa: E731
    upscaled = a1111_upscale.upscale(init, 2.0, lanczos)
    grid = a1111_upscale.split_grid(upscaled, *tile, OVERLAP)
    img2img = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, "EulerDiscreteScheduler")
    k = 0
    for _, _, row in grid:
        for cell in row:
            i, j = divmod(k, batch_size)  # A1111: batch i starts at seed + i, its images j follow
            cell[2] = img2img(PROMPT, image=cell[2], strength=STRENGTH, num_inference_steps=STEPS,
                              guidance_scale=GUIDANCE, generator=generators(SEED + i + j, 1)).images[0]  # fmt: skip
            k += 1
    return a1111_upscale.combine_grid(grid, tile[1], upscaled.width, upscaled.height, OVERLAP)


def test_sd_upscale_matches_a1111_composed_with_diffusers(sd1):
    parts, ours = sd1
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    expected = _reference(parts, init, (64, 64), batch_size=2)
    request = dict(prompt=PROMPT, init_image=init, width=64, height=64, steps=STEPS, guidance=GUIDANCE,
                   strength=STRENGTH, sampler="EulerDiscreteScheduler", seed=SEED, batch_size=2)  # fmt: skip
    events = list(stream(ours, GenerationRequest(**request), SDUpscale("Lanczos", 2.0, OVERLAP)))
    result = events[-1]
    assert isinstance(result, Result) and result.images[0].size == expected.size == (96, 80)
    value = psnr(as_array(result.images), as_array([expected]), data_range=1.0)
    print(f"SD upscale, 4 tiles: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    batches = {(e.batch, e.batches) for e in events if isinstance(e, Progress)}
    assert batches == {(k, 4) for k in range(4)}  # one per tile
    params = parse_infotext(result.infotexts[0])[2]
    assert params["SD upscale overlap"] == "16" and params["SD upscale upscaler"] == "Lanczos"
    assert params["Size"] == "64x64" and params["Seed"] == str(SEED) and params["Denoising strength"] == "0.6"


@pytest.mark.parametrize("fields,settings,message", [
    (dict(init_image=None), {}, "give init_image"),
    (dict(mask=Image.new("L", (48, 40))), {}, "drop the mask"),
    ({}, dict(overlap=64), "overlap=64"),
    ({}, dict(scale=0), "scale=0"),
    ({}, dict(upscaler="Latent"), "upscaler 'Latent'"),
])  # fmt: skip
def test_sd_upscale_refusals(sd1, fields, settings, message):
    _, ours = sd1
    init = Image.new("RGB", (48, 40))
    request = GenerationRequest(**{"prompt": "x", "init_image": init, "width": 64, "height": 64, **fields})
    with pytest.raises(ValueError, match=message):
        next(stream(ours, request, SDUpscale(**{"upscaler": "Lanczos", **settings})))
