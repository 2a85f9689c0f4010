"""SD3 end to end against diffusers' StableDiffusion3Pipeline / Img2Img / Inpaint pipelines on a tiny random model:
prompt encoding (two CLIP towers + T5, or zeros without T5), the MMDiT under guidance, flow-matching Euler, the
16-channel shifted VAE."""

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from test_pipeline import _mask, check, generators
from tiny_sd3 import SD35_MEDIUM, sd3_folder, tiny_sd3

from mlx_sd.model import ModelInfo
from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Pipeline
from mlx_sd.sd3 import model_defaults
from oracles import assert_close

PROMPT = "a red lighthouse on mars, photo"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3")
    pipe = tiny_sd3(tmp)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Pipeline(sd3_folder(pipe, tmp / "mlx"))


def test_sd3_prompt_encoding_matches_diffusers(sd3):
    ref, ours = sd3
    import torch

    with torch.no_grad():
        context, negative, pooled, negative_pooled = ref.encode_prompt(PROMPT, None, None, negative_prompt="blurry")
    cond, uncond = ours.model.text_encoder().encode([PROMPT], ["blurry"])
    assert cond.context.shape == (1, 77 + 256, 64)
    pairs = {"context": (cond.context, context), "negative context": (uncond.context, negative),
             "pooled": (cond.pooled, pooled), "negative pooled": (uncond.pooled, negative_pooled)}  # fmt: skip
    for what, (got, want) in pairs.items():
        assert_close(got, want, 1e-4, what)


@pytest.mark.parametrize("batch", [1, 2])
def test_sd3_txt2img_matches_diffusers(sd3, batch):
    ref, ours = sd3
    expected = ref(
        PROMPT, negative_prompt="blurry", width=64, height=96, num_inference_steps=4, guidance_scale=5.0,
        generator=generators(7, batch), num_images_per_prompt=batch, output_type="np",
    ).images  # fmt: skip
    result = ours.generate(prompt=PROMPT, negative_prompt="blurry", width=64, height=96, steps=4, guidance=5.0,
                           seed=7, batch_size=batch)  # fmt: skip
    check(result, expected, f"sd3 txt2img batch {batch}")
    assert result.request.sampler == "Euler"


def test_sd3_skip_layer_guidance_matches_diffusers(sd3):
    """SD3.5 medium's skip-layer guidance: steps 1 to 2 of 6 (6 * 0.01 < i < 6 * 0.5) add (cond - cond without
    block 0) * 2.8 to the guided velocity, as StableDiffusion3Pipeline's skip_guidance_layers."""
    ref, ours = sd3
    kwargs = dict(width=64, height=64, guidance=5.0, steps=6, seed=9)
    expected = ref(
        PROMPT, negative_prompt="blurry", width=64, height=64, num_inference_steps=6, guidance_scale=5.0,
        generator=generators(9, 1), output_type="np", skip_guidance_layers=[0], skip_layer_guidance_scale=2.8,
        skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.5,
    ).images  # fmt: skip
    request = dict(prompt=PROMPT, negative_prompt="blurry", skip_guidance_layers=(0,), skip_layer_guidance_stop=0.5)
    result = ours.generate(**request, **kwargs)
    check(result, expected, "sd3 skip-layer guidance")
    plain = ours.generate(prompt=PROMPT, negative_prompt="blurry", **kwargs)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))
    with pytest.raises(ValueError, match="blocks 0 to 1"):
        ours.generate(**{**request, **kwargs, "steps": 1, "skip_guidance_layers": (2,)})


def test_sd3_without_t5_and_unguided(tmp_path):
    ref = tiny_sd3(tmp_path, seed=3, t5=False, transformer=SD35_MEDIUM)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline(sd3_folder(ref, tmp_path / "mlx"))
    expected = ref(PROMPT, width=64, height=64, num_inference_steps=3, guidance_scale=1.0,
                   generator=generators(2, 1), output_type="np").images  # fmt: skip
    check(ours.generate(prompt=PROMPT, width=64, height=64, steps=3, guidance=1.0, seed=2), expected, "sd3.5m no t5")
    assert (ours.defaults.steps, ours.defaults.guidance) == (40, 4.5)  # SD3.5 medium's card
    turbo = ModelInfo(family="sd3", prediction_type="flow", name="x", kind="turbo")
    assert model_defaults(turbo, ours.model.unet.config) == replace(ours.defaults, steps=4, guidance=0.0)
    first = next(ours.stream(GenerationRequest(prompt=PROMPT, width=64, height=48, steps=1, seed=2)))
    assert first.preview()[0].size == (8, 6)  # the 16 channels through SD3's preview factors


def test_sd3_img2img_matches_diffusers(sd3):
    from diffusers import StableDiffusion3Img2ImgPipeline

    ref, ours = sd3
    pipe = StableDiffusion3Img2ImgPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(4).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = pipe(PROMPT, image=init, height=64, width=64, strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                    generator=generators(5, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, strength=0.6, steps=5, guidance=4.0, seed=5)
    check(result, expected, "sd3 img2img")


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_sd3_inpaint_matches_diffusers(sd3, strength):
    """StableDiffusion3InpaintPipeline's latents (the known region pasted back after every step), decoded as every
    other SD3 pipeline decodes: diffusers 0.42's inpaint pipeline drops the VAE's shift_factor there (diffusers issue
    13611, fixed by PR 14671), so its images are not the reference."""
    import torch
    from diffusers import StableDiffusion3InpaintPipeline

    ref, ours = sd3
    pipe = StableDiffusion3InpaintPipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    latents = pipe(
        PROMPT, image=init, mask_image=_mask(64, 64), strength=strength, num_inference_steps=5, guidance_scale=5.0,
        width=64, height=64, generator=generators(3, 1), output_type="latent",
    ).images  # fmt: skip
    vae = ref.vae.config
    with torch.no_grad():
        expected = ref.vae.decode(latents / vae.scaling_factor + vae.shift_factor).sample
    expected = ref.image_processor.postprocess(expected, output_type="np")
    result = ours.generate(prompt=PROMPT, init_image=init, mask=_mask(64, 64), strength=strength, steps=5,
                           guidance=5.0, width=64, height=64, seed=3)  # fmt: skip
    check(result, expected, f"sd3 inpaint strength {strength}")


@pytest.mark.parametrize("upscaler,size", [("Latent", (64, 32)), ("Lanczos", (32, 64))])
def test_sd3_hires_fix_matches_diffusers_composed_as_a1111(sd3, upscaler, size):
    """The hires fix on SD3: StableDiffusion3Pipeline's latents, upscaled (interpolated, or decoded to 8-bit images,
    Lanczos-resized and encoded with the first pass's generator), then StableDiffusion3Img2ImgPipeline over
    int(3 / 0.5) = 6 steps of which the last 3 run, from a fresh generator (tests/test_hires.py: A1111's rule)."""
    import torch
    from diffusers import StableDiffusion3Img2ImgPipeline
    from PIL import Image as PILImage

    ref, ours = sd3
    (h, w), target = size, (size[0] * 3 // 2, size[1] * 3 // 2)
    first = generators(11, 1)
    latents = ref(PROMPT, negative_prompt="blurry", width=w, height=h, num_inference_steps=4, guidance_scale=5.0,
                  generator=first, output_type="latent").images  # fmt: skip
    vae = ref.vae
    lh, lw = target[0] // 8, target[1] // 8
    with torch.no_grad():
        if upscaler == "Latent":
            up = torch.nn.functional.interpolate(latents, size=(lh, lw), mode="bilinear", align_corners=False)
        else:
            pixels = (vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample + 1) * 0.5
            image = (pixels.clamp(0, 1)[0] * 255).permute(1, 2, 0).numpy().astype(np.uint8)
            resized = PILImage.fromarray(image).resize((lw * 8, lh * 8), PILImage.LANCZOS)
            x = torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)[None]
            dist = vae.encode(x * 2 - 1).latent_dist
            sample = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=first[0])
            up = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    img2img = StableDiffusion3Img2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    expected = img2img(PROMPT, negative_prompt="blurry", image=up, strength=0.5, num_inference_steps=6,
                       guidance_scale=5.0, generator=generators(11, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, negative_prompt="blurry", width=w, height=h, steps=4, guidance=5.0, seed=11,
                           enable_hr=True, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=3,
                           strength=0.5)  # fmt: skip
    assert result.images[0].size == (target[1], target[0])
    check(result, expected, f"sd3 hires fix ({upscaler})")


def test_sd3_refuses_what_it_cannot_run(sd3):
    _, ours = sd3
    refused = {"seamless tiling": dict(tiling=True), "rectified-flow": dict(sampler="DDIM"),
               r"width x height 72x64: SD3 models take multiples of 16 pixels .*use e\.g\. 64x64": dict(width=72),
               r"the hires size 72x72: .*multiples of 16": dict(enable_hr=True, hr_scale=1.125)}  # fmt: skip
    for named, params in refused.items():
        with pytest.raises(ValueError, match=named):
            ours.generate(**{"prompt": "a cat", "steps": 1, "width": 64, "height": 64, **params})
