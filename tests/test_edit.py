"""InstructPix2Pix (8-channel edit models) against diffusers' StableDiffusionInstructPix2PixPipeline, started from the
latents diffusers' img2img prepares (mlx-sd runs edit requests as img2img, as A1111 does); tiny random-weight models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import MIN_PSNR, NEGATIVE, PROMPT, as_array, diffusers_pipe, generators
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.pipeline import Pipeline
from oracles import psnr

SCHEDULER = "EulerDiscreteScheduler"


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ip2p")
    parts = tiny_components(tmp, "sd1", in_channels=8, seed=4)
    return parts, Pipeline(mlx_folder(parts, tmp / "mlx", "sd1"))


def _reference(parts, init, steps, guidance, image_guidance, seed, batch):
    """diffusers' img2img latents at strength 1 (the init image's sampled, scaled latents noised to the first level,
    drawn from the seeds' generators), then the InstructPix2Pix pipeline from them."""
    img2img = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, SCHEDULER)
    img2img.scheduler.set_timesteps(steps)
    timesteps, _ = img2img.get_timesteps(steps, 1.0, torch.device("cpu"))
    image = img2img.image_processor.preprocess(init)
    latents = img2img.prepare_latents(image, timesteps[:1].repeat(batch), batch, 1, torch.float32,
                                      torch.device("cpu"), generators(seed, batch))  # fmt: skip
    pipe = diffusers_pipe("StableDiffusionInstructPix2PixPipeline", parts, SCHEDULER)
    pipe.scheduler.set_timesteps(steps)
    return pipe(
        [PROMPT] * batch, image=init, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
        guidance_scale=guidance, image_guidance_scale=image_guidance, output_type="np",
        latents=latents / pipe.scheduler.init_noise_sigma,  # the pipeline multiplies them by it
    ).images  # fmt: skip


@pytest.mark.parametrize("guidance,image_guidance,batch", [(6.0, 1.5, 1), (4.0, 2.5, 2), (1.0, 1.5, 1)])
def test_instruct_pix2pix_matches_diffusers(edit, guidance, image_guidance, batch):
    """Three-way guidance (text, image, neither), the image's unscaled VAE mode beside the latents, a batch of two;
    at guidance 1 diffusers runs the prompt alone."""
    parts, ours = edit
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    expected = _reference(parts, init, 6, guidance, image_guidance, 13, batch)
    result = ours.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, init_image=init, strength=1.0, steps=6, guidance=guidance,
        image_guidance=image_guidance, sampler=SCHEDULER, seed=13, batch_size=batch,
    )  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    print(f"instruct-pix2pix guidance {guidance} image {image_guidance} batch {batch}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    assert ("Image CFG scale: " + str(image_guidance)) in result.infotexts[0]


def test_edit_model_refuses_what_it_cannot_do(edit):
    _, ours = edit
    init = Image.new("RGB", (64, 64), (90, 120, 200))
    with pytest.raises(ValueError, match="InstructPix2Pix model .* needs an init image"):
        ours.generate(prompt="make it winter", width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="does not inpaint"):
        ours.generate(prompt="x", init_image=init, mask=Image.new("L", (64, 64), 255), steps=1)
    with pytest.raises(ValueError, match="image_guidance=-1"):
        ours.generate(prompt="x", init_image=init, image_guidance=-1, steps=1)
