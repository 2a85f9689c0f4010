"""SDXL edit models against diffusers' StableDiffusionXLInstructPix2PixPipeline: SDXL InstructPix2Pix (an 8-channel
SDXL UNet, EulerDiscreteScheduler) and CosXL Edit (the same pipeline with `is_cosxl_edit=True` and an EDMEulerScheduler,
v-prediction, sigma_data 1, exponential sigmas to 120), on tiny random models converted from diffusers folders; and an
8-channel SDXL single file with CosXL's edm_vpred markers, which must convert to the folder's model.

mlx-sd runs edit requests as img2img (as A1111 does), so diffusers' pipeline starts from the latents its SDXL img2img
pipeline prepares at strength 1 (as tests/test_edit.py does for SD 1.x).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sgm_fixtures import diffusers_parts, sgm_state
from test_pipeline import NEGATIVE, PROMPT, as_array, generators

from mlx_sd.pipeline import Pipeline
from mlx_sd_convert import convert
from mlx_sd_convert.families import COSXL_SCHEDULER
from oracles import psnr

MIN_PSNR = 55.0  # the last bits of 8-bit images (about 59 dB at worst here)
WIDTH, HEIGHT = 64, 48


def _pipeline(cls: str, parts: dict, **flags):
    import diffusers

    pipe = getattr(diffusers, cls)(**parts, **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit_parts(scheduler: dict | None, seed: int) -> dict:
    import diffusers

    parts = dict(diffusers_parts("base", seed, in_channels=8))
    if scheduler is not None:
        parts["scheduler"] = getattr(diffusers, scheduler["_class_name"])(
            **{k: v for k, v in scheduler.items() if k != "_class_name"}
        )
    return parts


def _converted(parts: dict, tmp, **flags) -> Pipeline:
    _pipeline("StableDiffusionXLInstructPix2PixPipeline", parts, **flags).save_pretrained(tmp / "folder")
    convert(tmp / "folder", tmp / "mlx", dtype="float32")
    return Pipeline(tmp / "mlx")


@pytest.fixture(scope="module")
def ip2p(tmp_path_factory):
    parts = _edit_parts(None, seed=7)
    return parts, _converted(parts, tmp_path_factory.mktemp("sdxl-ip2p")), {}


@pytest.fixture(scope="module")
def cosxl_edit(tmp_path_factory):
    parts = _edit_parts(COSXL_SCHEDULER, seed=9)
    tmp = tmp_path_factory.mktemp("cosxl-edit")
    return parts, _converted(parts, tmp, is_cosxl_edit=True), {"is_cosxl_edit": True, "tmp": tmp}


def _reference(parts, init, steps, guidance, image_guidance, seed, batch, is_cosxl_edit=False):
    """diffusers' SDXL img2img latents at strength 1 (the init image's sampled, scaled latents noised to the first
    level, drawn from the seeds' generators), then the InstructPix2Pix pipeline from them."""
    img2img = _pipeline("StableDiffusionXLImg2ImgPipeline", parts, requires_aesthetics_score=False)
    img2img.scheduler.set_timesteps(steps)
    timesteps, _ = img2img.get_timesteps(steps, 1.0, torch.device("cpu"))
    image = img2img.image_processor.preprocess(init)
    latents = img2img.prepare_latents(image, timesteps[:1].repeat(batch), batch, 1, torch.float32,
                                      torch.device("cpu"), generators(seed, batch))  # fmt: skip
    pipe = _pipeline("StableDiffusionXLInstructPix2PixPipeline", parts, is_cosxl_edit=is_cosxl_edit)
    pipe.scheduler.set_timesteps(steps)
    return pipe(
        [PROMPT] * batch, image=init, negative_prompt=[NEGATIVE] * batch, num_inference_steps=steps,
        guidance_scale=guidance, image_guidance_scale=image_guidance, width=WIDTH, height=HEIGHT, output_type="np",
        latents=latents / pipe.scheduler.init_noise_sigma,  # the pipeline multiplies them by it
    ).images  # fmt: skip


def _init(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _compare(model, guidance, image_guidance, batch, what, **sampler):
    parts, ours, flags = model
    init = _init(2)
    expected = _reference(parts, init, 6, guidance, image_guidance, 13, batch, flags.get("is_cosxl_edit", False))
    result = ours.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, init_image=init, strength=1.0, steps=6, guidance=guidance,
        image_guidance=image_guidance, seed=13, batch_size=batch, **sampler,
    )  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    print(f"{what} guidance {guidance} image {image_guidance} batch {batch}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    assert ("Image CFG scale: " + str(image_guidance)) in result.infotexts[0]
    return result


@pytest.mark.parametrize("guidance,image_guidance,batch", [(6.0, 1.5, 1), (4.0, 2.5, 2), (1.0, 1.5, 1)])
def test_sdxl_instruct_pix2pix_matches_diffusers(ip2p, guidance, image_guidance, batch):
    """Three-way guidance over SDXL's two text towers, pooled text and micro-conditioning in [prompt, negative,
    negative] rows, the image's unscaled VAE mode beside the latents; at guidance 1 the prompt alone."""
    _compare(ip2p, guidance, image_guidance, batch, "sdxl instruct-pix2pix", sampler="EulerDiscreteScheduler")


@pytest.mark.parametrize("guidance,image_guidance,batch", [(6.0, 1.5, 1), (4.0, 2.5, 2)])
def test_cosxl_edit_matches_diffusers(cosxl_edit, guidance, image_guidance, batch):
    """EDM v-prediction (the model's default: Euler over exponential sigmas from 120); the image latents scaled by the
    VAE's scaling factor (diffusers' is_cosxl_edit)."""
    result = _compare(cosxl_edit, guidance, image_guidance, batch, "cosxl edit")
    assert (result.request.sampler, result.request.schedule_type) == ("Euler", "Exponential")


def test_cosxl_edit_needs_its_scaled_image(cosxl_edit):
    """Without is_cosxl_edit diffusers passes the unscaled image latents: another image (the scaling is tested)."""
    parts, ours, _ = cosxl_edit
    other = _reference(parts, _init(2), 6, 6.0, 1.5, 13, 1, is_cosxl_edit=False)
    result = ours.generate(prompt=PROMPT, negative_prompt=NEGATIVE, init_image=_init(2), strength=1.0, steps=6,
                           guidance=6.0, image_guidance=1.5, seed=13)  # fmt: skip
    assert psnr(as_array(result.images), other, data_range=1.0) < 40


def test_sdxl_edit_model_refuses_what_it_cannot_do(ip2p):
    _, ours, _ = ip2p
    init = Image.new("RGB", (64, 64), (90, 120, 200))
    with pytest.raises(ValueError, match="InstructPix2Pix model .* needs an init image"):
        ours.generate(prompt="make it winter", width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="does not inpaint"):
        ours.generate(prompt="x", init_image=init, mask=Image.new("L", (64, 64), 255), steps=1)


def test_cosxl_edit_file_converts_to_the_folders_model(cosxl_edit, tmp_path):
    """An 8-channel SDXL single file with CosXL's edm_vpred markers (cosxl_edit.safetensors): the folder's UNet and
    VAE weights and configs, an EDM v-prediction scheduler."""
    from safetensors.numpy import save_file

    parts, _, flags = cosxl_edit
    state = sgm_state("base", parts)
    state.update({"edm_vpred.sigma_max": np.float32(120.0), "edm_vpred.sigma_min": np.float32(0.002)})
    path = tmp_path / "cosxl_edit.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    info = convert(path, tmp_path / "out", dtype="float32")
    assert info.prediction_type == "v_prediction"
    folder = flags["tmp"] / "mlx"
    for name in ("unet", "vae"):
        config = json.loads((tmp_path / "out" / name / "config.json").read_text())
        assert config == json.loads((folder / name / "config.json").read_text()), name
        assert (tmp_path / "out" / name / "weights.safetensors").read_bytes() == (
            folder / name / "weights.safetensors"
        ).read_bytes(), name
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler == {**COSXL_SCHEDULER, "sigma_min": float(np.float32(0.002)), "sigma_max": 120.0}
    assert Pipeline(tmp_path / "out").model.is_edit
