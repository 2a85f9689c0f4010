"""SDXL end-to-end parity with diffusers (StableDiffusionXLPipeline, Img2Img) on tiny random-weight models.

Covers both text towers (penultimate states concatenated, pooled from tower 2), micro-conditioning from the request,
zeroed negative conditioning for an empty negative prompt (force_zeros_for_empty_prompt), and the refiner's aesthetic
scores.
"""

import numpy as np
import pytest
from PIL import Image
from test_pipeline import check, generators, saved_config
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.pipeline import Pipeline

PROMPT = "a red fox in the snow, watercolor"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl")
    parts = tiny_components(tmp, "sdxl", seed=2)
    return parts, Pipeline(mlx_folder(parts, tmp / "mlx", "sdxl", force_zeros_for_empty_prompt=True))


def xl_pipe(cls, parts, scheduler, **kwargs):
    import diffusers

    pipe = getattr(diffusers, cls)(
        **{k: v for k, v in parts.items() if k != "scheduler"},
        scheduler=getattr(diffusers, scheduler).from_config(saved_config(parts["scheduler"])),
        **kwargs,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("negative", ["", "ugly, blurry"])
@pytest.mark.parametrize("scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
def test_sdxl_txt2img_matches_diffusers(sdxl, negative, scheduler):
    parts, ours = sdxl
    pipe = xl_pipe("StableDiffusionXLPipeline", parts, scheduler, force_zeros_for_empty_prompt=True)
    kwargs = dict(width=64, height=96, guidance=5.0, steps=5, seed=21)
    expected = pipe(
        PROMPT, negative_prompt=negative or None, width=64, height=96, num_inference_steps=5, guidance_scale=5.0,
        generator=generators(21, 1), output_type="np", original_size=(128, 96), crops_coords_top_left=(8, 4),
    ).images  # fmt: skip
    result = ours.generate(
        prompt=PROMPT, negative_prompt=negative, sampler=scheduler, original_size=(128, 96),
        crops_coords_top_left=(8, 4), **kwargs,
    )  # fmt: skip
    check(result, expected, f"sdxl {scheduler} negative={negative!r}")


def test_sdxl_img2img_matches_diffusers(sdxl):
    parts, ours = sdxl
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = xl_pipe("StableDiffusionXLImg2ImgPipeline", parts, "EulerDiscreteScheduler", requires_aesthetics_score=False)
    expected = pipe(
        PROMPT, image=init, strength=0.6, num_inference_steps=6, guidance_scale=4.0, generator=generators(5, 1),
        output_type="np",
    ).images  # fmt: skip
    result = ours.generate(
        prompt=PROMPT, init_image=init, strength=0.6, steps=6, guidance=4.0, sampler="EulerDiscreteScheduler", seed=5
    )
    check(result, expected, "sdxl img2img")
