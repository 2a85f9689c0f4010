"""The hires fix (A1111's txt2img "Hires. fix") against diffusers' pipelines composed the way A1111 composes them.

Reference for seed S: diffusers txt2img with generator(S), output_type="latent"; the latents upscaled by torch's
interpolate (a latent upscaler) or decoded, turned into 8-bit images by truncation, resized with PIL and encoded
again with the VAE (sampling from the same generator, after the first pass's draws); then diffusers img2img on
those latents with a fresh generator(S) (A1111 makes a new ImageRNG for the hires shape), over int(steps /
strength) steps of which the last hires steps run. Tiny random-weight SD 1.x model, float32, PSNR >= 40 dB.
"""

from __future__ import annotations

import a1111_upscale
import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from test_model_upscaler import FILES, _save
from test_pipeline import MIN_PSNR, NEGATIVE, PROMPT, as_array, diffusers_pipe, generators
from test_pipeline import inpaint9 as inpaint9  # noqa: F401  (the 9-channel fixture)

from mlx_sd.hires import HiresTarget, hires_target
from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Pipeline, Progress, Result
from mlx_sd_convert.upscaler import read_upscaler
from oracles import psnr

SEED, STEPS, GUIDANCE = 31, 5, 6.0


def _reference(parts, size, target, upscaler, hr_steps, strength, batch=1, network=None, hires_parts=None):
    """diffusers txt2img -> upscale -> diffusers img2img, as A1111 runs the hires fix (Euler, as diffusers);
    `network`: the spandrel model of a model upscaler, run as A1111 runs it (tests/a1111_upscale.py); `hires_parts`:
    another model's components for the second pass (A1111's hires checkpoint: the first pass decodes with its own
    VAE, the second model's VAE encodes)."""
    hires_parts = hires_parts or parts
    txt2img = diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler")
    first = generators(SEED, batch)
    latents = txt2img(
        PROMPT, negative_prompt=NEGATIVE, width=size[1], height=size[0], num_inference_steps=STEPS,
        guidance_scale=GUIDANCE, generator=first, num_images_per_prompt=batch, output_type="latent",
    ).images  # fmt: skip
    h, w = target[0] // 8, target[1] // 8
    vae = parts["vae"]
    with torch.no_grad():
        if upscaler == "Latent":
            up = torch.nn.functional.interpolate(latents, size=(h, w), mode="bilinear", align_corners=False)
        else:
            pixels = (vae.decode(latents / vae.config.scaling_factor).sample + 1) * 0.5
            images = (pixels.clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
            if network is None:
                resized = [Image.fromarray(im).resize((w * 8, h * 8), Image.LANCZOS) for im in images]
            else:
                resized = [a1111_upscale.resize_image(Image.fromarray(im), w * 8, h * 8, network) for im in images]
            x = torch.from_numpy(np.stack([np.asarray(im, np.float32) / 255 for im in resized])).permute(0, 3, 1, 2)
            encoder = hires_parts["vae"]
            dist = encoder.encode(x * 2 - 1).latent_dist
            up = torch.cat([_sample(dist, i, g) for i, g in enumerate(first)]) * encoder.config.scaling_factor
    total = int(hr_steps / min(strength, 0.999))
    img2img = diffusers_pipe("StableDiffusionImg2ImgPipeline", hires_parts, "EulerDiscreteScheduler")
    return img2img(
        [PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, image=up, strength=(hr_steps + 0.5) / total,
        num_inference_steps=total, guidance_scale=GUIDANCE, generator=generators(SEED, batch), output_type="np",
    ).images  # fmt: skip


def _sample(dist, i, generator):
    mean, std = dist.mean[i : i + 1], dist.std[i : i + 1]
    return mean + std * torch.randn(mean.shape, generator=generator)


@pytest.mark.parametrize("upscaler,size,scale,batch", [("Latent", (64, 64), 1.5, 1), ("Latent", (64, 48), 2.0, 2),
                                                       ("Lanczos", (48, 64), 1.5, 1)])  # fmt: skip
def test_hires_fix_matches_diffusers_composed_as_a1111(sd1, upscaler, size, scale, batch):
    parts, ours = sd1
    hr_steps, strength = 4, 0.6
    target = (int(size[0] * scale) // 8 * 8, int(size[1] * scale) // 8 * 8)
    expected = _reference(parts, size, target, upscaler, hr_steps, strength, batch)
    events = list(ours.stream(GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=size[1], height=size[0], steps=STEPS, guidance=GUIDANCE,
        sampler="EulerDiscreteScheduler", seed=SEED, batch_size=batch, enable_hr=True, hr_scale=scale,
        hr_upscaler=upscaler, hr_second_pass_steps=hr_steps, strength=strength,
    )))  # fmt: skip
    result = events[-1]
    assert isinstance(result, Result)
    got = as_array(result.images)
    assert got.shape == expected.shape == (batch, *target, 3)
    value = psnr(got, expected, data_range=1.0)
    print(f"hires {upscaler} {size} x{scale} batch {batch}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    steps = [e.step for e in events if isinstance(e, Progress)]
    assert steps == list(range(1, STEPS + hr_steps + 1)) and events[0].total == STEPS + hr_steps


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_firstpass_image_stands_for_the_first_pass(sd1, upscaler):
    """A1111's firstpass_image: no first pass; the image (as A1111's float32 x / 255 * 2 - 1, truncated to 8 bits
    again for an image upscaler) upscaled, encoded to the VAE's mean (A1111 samples with its unseeded global
    generator), then the hires pass as usual, its progress counting only its own steps."""
    parts, ours = sd1
    size, scale, hr_steps, strength = (48, 64), 1.5, 3, 0.6
    target = (72, 96)
    first = Image.fromarray(np.random.default_rng(4).integers(0, 256, (*size, 3), dtype=np.uint8))
    vae = parts["vae"]
    pixels = np.asarray(first, np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
    with torch.no_grad():
        if upscaler == "Latent":
            x = torch.from_numpy(pixels).permute(2, 0, 1)[None]
            latents = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
            up = torch.nn.functional.interpolate(latents, size=(9, 12), mode="bilinear", align_corners=False)
        else:
            eight = (np.clip((pixels + 1) * 0.5, 0, 1) * 255.0).astype(np.uint8)  # A1111's truncation
            resized = Image.fromarray(eight).resize((target[1], target[0]), Image.LANCZOS)
            x = torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)[None]
            up = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    total = int(hr_steps / strength)
    img2img = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, "EulerDiscreteScheduler")
    expected = img2img(
        PROMPT, negative_prompt=NEGATIVE, image=up, strength=(hr_steps + 0.5) / total, num_inference_steps=total,
        guidance_scale=GUIDANCE, generator=generators(SEED, 1), output_type="np",
    ).images  # fmt: skip
    events = list(ours.stream(GenerationRequest(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=size[1], height=size[0], steps=STEPS, guidance=GUIDANCE,
        sampler="EulerDiscreteScheduler", seed=SEED, enable_hr=True, hr_scale=scale, hr_upscaler=upscaler,
        hr_second_pass_steps=hr_steps, strength=strength, firstpass_image=first,
    )))  # fmt: skip
    value = psnr(as_array(events[-1].images), expected, data_range=1.0)
    print(f"firstpass_image, {upscaler}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    assert [e.step for e in events[:-1]] == [1, 2, 3] and events[0].total == hr_steps
    with pytest.raises(ValueError, match="firstpass_image is \\(32, 32\\): .* must be width x height \\(64x48\\)"):
        ours.generate(prompt="x", width=64, height=48, enable_hr=True, firstpass_image=Image.new("RGB", (32, 32)))
    with pytest.raises(ValueError, match="set enable_hr"):
        ours.generate(prompt="x", width=64, height=48, firstpass_image=first)


@pytest.fixture(scope="module")
def other_sd1(tmp_path_factory):
    """A second tiny SD 1.x model (other weights throughout) with a checkpoint hash: the hires checkpoint."""
    from tiny_pipelines import mlx_folder, tiny_components

    tmp = tmp_path_factory.mktemp("hires-checkpoint")
    parts = tiny_components(tmp, "sd1", seed=7)
    return parts, mlx_folder(parts, tmp / "mlx", "sd1", sha256="0123456789abcdef" * 4)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_checkpoint_runs_the_second_pass(sd1, other_sd1, upscaler):
    """A1111's hr_checkpoint_name: the first pass with the model, the second (its prompt encoding, UNet, and the VAE
    that encodes an image upscaler's output and decodes the result) with the hires checkpoint."""
    parts, ours = sd1
    other_parts, folder = other_sd1
    pipeline = Pipeline(ours.model, hires_model=folder)
    size, scale, hr_steps, strength = (48, 64), 1.5, 3, 0.6
    target = (72, 96)
    expected = _reference(parts, size, target, upscaler, hr_steps, strength, hires_parts=other_parts)
    result = pipeline.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=size[1], height=size[0], steps=STEPS, guidance=GUIDANCE,
        sampler="EulerDiscreteScheduler", seed=SEED, enable_hr=True, hr_scale=scale, hr_upscaler=upscaler,
        hr_second_pass_steps=hr_steps, strength=strength,
    )  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    print(f"hires checkpoint, {upscaler}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    assert "Hires checkpoint: tiny [0123456789]" in result.infotexts[0]
    plain = pipeline.generate(prompt=PROMPT, width=64, height=48, steps=2, seed=SEED)  # no hires fix: no checkpoint
    assert "Hires checkpoint" not in plain.infotexts[0]


def test_hires_checkpoint_refuses_what_cannot_run_its_pass(sd1, inpaint9):
    """An inpainting model cannot run the second pass; a latent upscaler needs the same latent space; an image
    prompt's adapter fits the first model only."""
    from types import SimpleNamespace

    from mlx_sd.hires import check_hires_model

    _, ours = sd1
    with pytest.raises(ValueError, match="hires checkpoint tiny: its UNet takes 9 channels"):
        Pipeline(ours.model, hires_model=inpaint9[1].model)

    def model(scaling: float):
        vae = SimpleNamespace(config=SimpleNamespace(latent_channels=4, scaling_factor=scaling))
        unet = SimpleNamespace(config=SimpleNamespace(in_channels=4))
        return SimpleNamespace(vae=vae, unet=unet, info=SimpleNamespace(name=f"m{scaling}"))

    sd, xl = model(0.18215), model(0.13025)
    latent = GenerationRequest(prompt="x", enable_hr=True, hr_upscaler="Latent")
    with pytest.raises(ValueError, match="latent space differs .* use an image upscaler"):
        check_hires_model(xl, sd, latent)
    check_hires_model(xl, sd, GenerationRequest(prompt="x", enable_hr=True, hr_upscaler="Lanczos"))
    with pytest.raises(ValueError, match="an image prompt with a hires checkpoint"):
        check_hires_model(
            sd, xl, GenerationRequest(prompt="x", hr_upscaler="Lanczos", ip_adapter_image=Image.new("RGB", (8, 8)))
        )


def test_hires_fix_with_a_model_upscaler_matches_a1111(sd1, tmp_path):
    """An ESRGAN model (random weights, saved as A1111 users download them) upscales the decoded first pass."""
    parts, ours = sd1
    state = FILES["RealESRGAN_x4plus.pth"]()
    network = a1111_upscale.load_descriptor(state)
    upscaler = read_upscaler(_save(tmp_path, "RealESRGAN_x4plus.pth", state), mx.float32)
    pipeline = Pipeline(ours.model, upscaler_resolver={"R-ESRGAN 4x+": upscaler}.__getitem__)
    size, scale, hr_steps, strength = (48, 64), 2.0, 3, 0.5
    target = (96, 128)
    expected = _reference(parts, size, target, "model", hr_steps, strength, network=network)
    result = pipeline.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=size[1], height=size[0], steps=STEPS, guidance=GUIDANCE,
        sampler="EulerDiscreteScheduler", seed=SEED, enable_hr=True, hr_scale=scale, hr_upscaler="R-ESRGAN 4x+",
        hr_second_pass_steps=hr_steps, strength=strength,
    )  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    print(f"hires R-ESRGAN 4x+ {size} x{scale}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR
    assert "Hires upscaler: R-ESRGAN 4x+" in result.infotexts[0]


def test_a1111_sampler_runs_exactly_the_hires_steps_and_writes_the_infotext(sd1):
    """A1111's rule: hr_second_pass_steps run (of int(steps / strength)); the infotext names the hires settings and
    keeps the first pass's size; the same seed gives the same image."""
    _, ours = sd1
    request = dict(prompt=PROMPT, width=64, height=64, steps=4, sampler="DPM++ 2M SDE", seed=9, enable_hr=True,
                   hr_scale=1.25, hr_upscaler="Latent (bicubic antialiased)", hr_second_pass_steps=3, strength=0.45,
                   hr_prompt="a lighthouse, sharp details")  # fmt: skip
    events = list(ours.stream(GenerationRequest(**request)))
    assert [e.step for e in events[:-1]] == list(range(1, 8))
    result = events[-1]
    assert result.images[0].size == (80, 80)
    text = result.infotexts[0]
    fields = (
        "Size: 64x64",
        "Denoising strength: 0.45",
        "Hires upscale: 1.25",
        "Hires steps: 3",
        "Hires upscaler: Latent (bicubic antialiased)",
        'Hires prompt: "a lighthouse, sharp details"',
    )
    for field in fields:
        assert field in text, (field, text)
    again = ours.generate(GenerationRequest(**request))
    np.testing.assert_array_equal(as_array(again.images), as_array(result.images))


def test_hires_target_follows_a1111():
    def target(w, h, **hr):
        return hires_target(GenerationRequest(prompt="", width=w, height=h, enable_hr=True, **hr))

    assert target(512, 512) == HiresTarget((128, 128))
    assert target(512, 768, hr_scale=1.5) == HiresTarget((144, 96))
    assert target(520, 520, hr_scale=1.3).size == (672, 672)  # int(676) // 8 latents
    assert target(512, 768, hr_resize_x=1024) == HiresTarget((192, 128))  # height follows the aspect
    assert target(512, 768, hr_resize_y=1024) == HiresTarget((128, 85))
    # both given with another aspect: scale to cover, crop the latents' centre (A1111's truncate_x / truncate_y)
    wide = target(512, 512, hr_resize_x=1024, hr_resize_y=768)
    assert wide == HiresTarget((128, 128), crop=(32, 0)) and wide.size == (768, 1024)
    with pytest.raises(ValueError, match="hires size"):
        target(512, 512, hr_scale=20)


def test_hires_requests_that_cannot_run_are_refused(sd1):
    _, ours = sd1
    init = Image.new("RGB", (64, 64))
    cases = [(dict(init_image=init), "txt2img"), (dict(hr_upscaler="R-ESRGAN 4x+"), "needs an upscaler folder"),
             (dict(strength=0.0), "denoising strength"), (dict(hr_scale=-1), "hr_scale")]  # fmt: skip
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            ours.generate(prompt="x", width=64, height=64, steps=2, enable_hr=True, **fields)
    with_refiner = Pipeline(ours.model, refiner=ours.model)
    with pytest.raises(ValueError, match="hires fix with a refiner"):
        with_refiner.generate(prompt="x", width=64, height=64, steps=2, enable_hr=True)
