"""End-to-end parity with diffusers' pipelines on tiny random-weight models (torch RNG mode, float32).

Our image for seed S must equal diffusers' image for generator=[torch.Generator().manual_seed(S + i)] (image i of a
batch uses seed + i): PSNR >= 40 dB, for several samplers (run "as diffusers" with the scheduler class), txt2img,
img2img, inpainting with a 4- and a 9-channel UNet, square and non-square sizes.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_pipelines import mlx_folder, tiny_components

from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Cancelled, Control, Pipeline, Progress, Result
from oracles import assert_close, psnr, relative_error

MIN_PSNR = 40.0
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def inpaint9(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1-inpaint")
    parts = tiny_components(tmp, "sd1", in_channels=9, seed=5)
    return parts, Pipeline(mlx_folder(parts, tmp / "mlx", "sd1"))


def diffusers_pipe(cls, parts, scheduler):
    import diffusers

    pipe = getattr(diffusers, cls)(
        **{k: v for k, v in parts.items() if k != "scheduler"},
        # From the config as saved (scheduler_config.json), as a converted folder holds it.
        scheduler=getattr(diffusers, scheduler).from_config(saved_config(parts["scheduler"])),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def saved_config(scheduler) -> dict:
    return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}


def generators(seed, n):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def as_array(images):
    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])


def check(ours: Result, expected: np.ndarray, what: str):
    got = as_array(ours.images)
    assert got.shape == expected.shape, f"{what}: {got.shape} vs {expected.shape}"
    value = psnr(got, expected, data_range=1.0)
    print(f"{what}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR, f"{what}: PSNR {value:.1f} dB < {MIN_PSNR}"


TXT2IMG = [
    ("EulerDiscreteScheduler", 64, 64, 1),
    ("EulerAncestralDiscreteScheduler", 96, 64, 2),
    ("DPMSolverMultistepScheduler", 64, 96, 1),
    ("DDIMScheduler", 64, 64, 1),
    ("LMSDiscreteScheduler", 64, 64, 1),
]


@pytest.mark.parametrize("scheduler,width,height,batch", TXT2IMG)
def test_txt2img_matches_diffusers(sd1, scheduler, width, height, batch):
    parts, ours = sd1
    seed, steps, guidance = 1234, 6, 7.5
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, scheduler)
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, width=width, height=height, num_inference_steps=steps,
        guidance_scale=guidance, generator=generators(seed, batch), num_images_per_prompt=batch, output_type="np",
    ).images  # fmt: skip
    result = ours.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=width, height=height, steps=steps, guidance=guidance,
        sampler=scheduler, seed=seed, batch_size=batch,
    )  # fmt: skip
    check(result, expected, f"txt2img {scheduler} {width}x{height} x{batch}")
    assert result.seeds == [seed + i for i in range(batch)]


def test_requests_do_not_share_text_keys_and_values(sd1):
    """Each request keeps its text's cross-attention keys and values for its own steps only (layers.TextContext): a
    prompt gives the same image before and after another prompt's request."""
    _, ours = sd1
    run = lambda prompt: as_array(ours.generate(prompt=prompt, width=64, height=64, steps=2, seed=5).images)  # noqa: E731
    first, other, again = run(PROMPT), run("a different prompt entirely"), run(PROMPT)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_img2img_matches_diffusers(sd1):
    parts, ours = sd1
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    pipe = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, "EulerDiscreteScheduler")
    for strength in (0.5, 1.0):
        expected = pipe(
            PROMPT, image=init, strength=strength, num_inference_steps=8, guidance_scale=6.0,
            generator=generators(7, 1), output_type="np",
        ).images  # fmt: skip
        result = ours.generate(
            prompt=PROMPT, init_image=init, strength=strength, steps=8, guidance=6.0,
            sampler="EulerDiscreteScheduler", seed=7,
        )  # fmt: skip
        check(result, expected, f"img2img strength {strength}")


def _mask(w, h):
    mask = Image.new("L", (w, h), 0)
    mask.paste(255, (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return mask


@pytest.mark.parametrize("which,strength", [("sd1", 1.0), ("sd1", 0.7), ("inpaint9", 1.0), ("inpaint9", 0.6)])
def test_inpaint_matches_diffusers(request, which, strength):
    parts, ours = request.getfixturevalue(which)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = diffusers_pipe("StableDiffusionInpaintPipeline", parts, "DDIMScheduler")
    expected = pipe(
        PROMPT, image=init, mask_image=_mask(64, 64), strength=strength, num_inference_steps=6, guidance_scale=5.0,
        width=64, height=64, generator=generators(3, 1), output_type="np",
    ).images  # fmt: skip
    result = ours.generate(
        prompt=PROMPT, init_image=init, mask=_mask(64, 64), strength=strength, steps=6, guidance=5.0,
        width=64, height=64, sampler="DDIMScheduler", seed=3,
    )  # fmt: skip
    check(result, expected, f"inpaint {which} strength {strength}")


def test_progress_cancel_and_metadata(sd1):
    _, ours = sd1
    request = GenerationRequest(prompt="x", width=64, height=64, steps=4, seed=11, batch_count=2)
    events = list(ours.stream(request))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [p.step for p in progress] == [1, 2, 3, 4] * 2 and isinstance(events[-1], Result)
    assert progress[0].preview()[0].size == (8, 8)
    result = events[-1]
    assert result.seeds == [11, 12] and len(result.images) == 2
    again = ours.generate(request)  # determinism
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again.images, result.images))
    assert "Seed: 11" in result.infotexts[0] and "Steps: 4" in result.infotexts[0]

    control = Control()
    stream = ours.stream(request, control)
    next(stream)
    control.cancel()
    with pytest.raises(Cancelled):
        list(stream)


def test_random_seed_is_reported_and_bad_input_rejected(sd1):
    _, ours = sd1
    result = ours.generate(prompt="x", width=64, height=64, steps=1)
    assert isinstance(result.seeds[0], int) and f"Seed: {result.seeds[0]}" in result.infotexts[0]
    for bad, match in ((dict(width=65), "multiple of 8"), (dict(steps=0), "steps"), (dict(sampler="Nope"), "Nope")):
        with pytest.raises(ValueError, match=match):
            ours.generate(prompt="x", **{"width": 64, "height": 64, "steps": 2, **bad})


def test_guidance_rescale_and_clip_skip_match_diffusers(sd1):
    parts, ours = sd1
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler")
    expected = pipe(
        PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=4, guidance_scale=7.0,
        guidance_rescale=0.7, generator=generators(9, 1), output_type="np",
    ).images  # fmt: skip
    result = ours.generate(
        prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=4, guidance=7.0, guidance_rescale=0.7,
        sampler="EulerDiscreteScheduler", seed=9,
    )  # fmt: skip
    check(result, expected, "guidance_rescale 0.7")


def test_low_memory_releases_and_reloads_text_encoders(sd1):
    _, ours = sd1
    kwargs = dict(prompt="a boat", width=64, height=64, steps=2, seed=4)
    first = ours.generate(low_memory=True, **kwargs)
    assert ours.model.text is None
    second = ours.generate(low_memory=False, **kwargs)
    assert ours.model.text is not None
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))


@pytest.mark.parametrize("small", [True, False])
def test_low_memory_by_default_on_small_devices(sd1, monkeypatch, small):
    """low_memory=None: on for devices with <= 16 GiB (text encoders freed; VAE tiled above 512x512), off otherwise."""
    import mlx_sd.pipeline as pipeline_module
    from mlx_sd import backend

    _, ours = sd1
    monkeypatch.setattr(backend, "small_memory", lambda: small)
    tiled = []
    real = pipeline_module.tiled_decode
    monkeypatch.setattr(pipeline_module, "tiled_decode", lambda vae, z: tiled.append(z.shape) or real(vae, z))
    ours.generate(prompt="a boat", width=64, height=64, steps=1, seed=4)
    assert (ours.model.text is None) == small and not tiled
    ours.generate(prompt="a boat", width=520, height=512, steps=1, seed=4, guidance=1.0)
    assert bool(tiled) == small
    ours.generate(prompt="a boat", width=64, height=64, steps=1, seed=4, low_memory=False)  # leave encoders loaded


def test_float16_vae_overflow_retries_in_float32(sd1, monkeypatch):
    import mlx.core as mx

    _, ours = sd1
    vae = ours.model.vae
    reference = ours.generate(prompt="a boat", width=64, height=64, steps=2, seed=4).images[0]
    vae.set_dtype(mx.float16)
    real_decode = type(vae).decode
    calls = []

    def overflowing(self, z):
        calls.append(self.dtype)
        out = real_decode(self, z)
        return out * mx.inf if self.dtype == mx.float16 else out  # what an SDXL VAE does in float16

    monkeypatch.setattr(type(vae), "decode", overflowing)
    image = ours.generate(prompt="a boat", width=64, height=64, steps=2, seed=4).images[0]
    assert calls == [mx.float16, mx.float32] and ours.model.vae.dtype == mx.float32
    assert np.array_equal(np.asarray(image), np.asarray(reference))


def test_only_masked_inpainting_pastes_into_the_crop(sd1):
    _, ours = sd1
    original = Image.fromarray(np.random.default_rng(3).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    mask = Image.new("L", (128, 96), 0)
    mask.paste(255, (70, 40, 90, 60))
    result = ours.generate(
        prompt="x", init_image=original, mask=mask, inpaint_full_res=True, inpaint_padding=8, width=64, height=64,
        steps=2, strength=1.0, seed=1,
    )  # fmt: skip
    out, before = np.asarray(result.images[0]), np.asarray(original)
    assert out.shape == before.shape  # the original's size, not the working size
    outside = np.asarray(mask) == 0
    assert np.array_equal(out[outside], before[outside])
    assert not np.array_equal(out[50, 80], before[50, 80])


def test_load_pipeline_from_a_diffusers_folder(tmp_path, monkeypatch):
    """Any source the converter accepts loads as a pipeline, converted once into the cache."""
    from mlx_sd_convert import load_pipeline

    monkeypatch.setenv("MLX_SD_CACHE", str(tmp_path / "cache"))
    parts = tiny_components(tmp_path, "sd1", seed=8)
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler")
    pipe.save_pretrained(tmp_path / "diffusers")
    ours = load_pipeline(str(tmp_path / "diffusers"))
    assert ours.model.info.family == "sd1" and len(list((tmp_path / "cache").iterdir())) == 1
    expected = pipe(PROMPT, width=64, height=64, num_inference_steps=3, generator=generators(2, 1),
                    output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=3, sampler="EulerDiscreteScheduler", seed=2,
                           guidance=7.5)  # fmt: skip
    check(result, expected, "converted diffusers folder")


def test_churn_and_noise_multiplier_reach_the_sampler(sd1):
    """s_churn / s_tmin / s_tmax / s_noise go to samplers that take them (their parity: tests/test_samplers.py), are
    recorded as A1111 records them, and are refused by name for a sampler without them."""
    _, ours = sd1
    base = dict(prompt=PROMPT, width=64, height=64, steps=3, seed=2, sampler="Euler")
    plain = ours.generate(**base)
    churned = ours.generate(**base, s_churn=1.0, s_tmax=20.0, s_noise=0.9)
    assert not np.array_equal(as_array(plain.images), as_array(churned.images))
    assert "Sigma churn: 1.0, Sigma tmax: 20.0, Sigma noise: 0.9" in churned.infotexts[0]
    assert "Sigma" not in plain.infotexts[0]
    with pytest.raises(ValueError, match="s_churn"):
        ours.generate(**{**base, "sampler": "DPM++ 2M"}, s_churn=1.0)


def test_negative_guidance_minimum_sigma_matches_diffusers_with_guidance_toggled(sd1):
    """A1111's NGMS (s_min_uncond): below that sigma every second model call runs the conditional pass alone. The
    reference is diffusers' pipeline whose step-end callback switches guidance off (and the embeddings to the
    conditional half) for exactly those steps (Euler: one call per step). Final latents compared (images at 8 bits
    cannot tell which steps skipped on a tiny model)."""
    parts, ours = sd1
    steps, threshold = 8, 3.0
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler")
    full = {}

    def toggle(pipeline, i, t, kwargs):
        embeds = full.setdefault("embeds", kwargs["prompt_embeds"])
        skip = (i + 1) % 2 == 1 and float(pipeline.scheduler.sigmas[i + 1]) < threshold
        pipeline._guidance_scale = 1.0 if skip else 7.0
        return {"prompt_embeds": embeds.chunk(2)[1] if skip else embeds}

    def final_latents(**options):
        request = GenerationRequest(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=steps,
                                    guidance=7.0, sampler="EulerDiscreteScheduler", seed=6, **options)  # fmt: skip
        events = list(ours.stream(request))
        return np.array(events[-2].latents).transpose(0, 3, 1, 2), events[-1]

    expected = pipe(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=steps,
                    guidance_scale=7.0, generator=generators(6, 1), output_type="latent", callback_on_step_end=toggle,
                    callback_on_step_end_tensor_inputs=["prompt_embeds"]).images.numpy()  # fmt: skip
    latents, result = final_latents(s_min_uncond=threshold)
    assert_close(latents, expected, 1e-4, "NGMS final latents")
    assert "NGMS: 3.0" in result.infotexts[0]
    plain, _ = final_latents()
    assert relative_error(plain, expected) > 1e-3  # the skipped passes matter at this tolerance


RECALLED = {
    "everything": dict(
        negative_prompt=NEGATIVE, width=64, height=48, steps=4, guidance=6.0, sampler="DPM++ 2M SDE",
        schedule_type="Karras", seed=77, subseed=5, subseed_strength=0.3, seed_resize_from_w=56, seed_resize_from_h=40,
        enable_hr=True, hr_scale=1.5, hr_upscaler="Latent (bicubic)", hr_second_pass_steps=2, strength=0.5,
        tiling=True, s_min_uncond=4.0, s_noise=0.9, clip_skip=2, eta_noise_seed_delta=3,
    ),
    "diffusers class": dict(sampler="EulerAncestralDiscreteScheduler", eta=0.8, seed=3),
    "as diffusers, Karras": dict(sampler="DPM++ 2M Karras", follow="diffusers", seed=4),
    "DDIM eta": dict(sampler="DDIM", eta=0.5, seed=5),
    "LCM": dict(sampler="LCM", seed=6),
}  # fmt: skip


@pytest.mark.parametrize("case", list(RECALLED))
def test_an_infotext_makes_the_same_image_again(sd1, case):
    """A1111's "send to txt2img": the parameters an image records (mlx_sd.infotext.request_fields) reproduce it, for
    A1111-style and diffusers-style samplers alike."""
    from mlx_sd.infotext import request_fields

    _, ours = sd1
    original = ours.generate(**{"prompt": PROMPT, "width": 64, "height": 64, "steps": 3, **RECALLED[case]})
    fields, not_applied = request_fields(original.infotexts[0])
    assert set(not_applied) <= {"Model", "Model hash", "Version"}
    again = ours.generate(GenerationRequest(**fields))
    np.testing.assert_array_equal(as_array(again.images), as_array(original.images))
    assert again.infotexts == original.infotexts


def test_nine_channel_inpainting_hands_off_to_a_four_channel_refiner(sd1, inpaint9):
    """A 9-channel inpainting base with a 4-channel refiner: the base conditions on the mask, the refiner pastes the
    known region back (diffusers' latent blending) once it takes over; switch_at 1 is the base alone."""
    init = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    request = dict(prompt=PROMPT, init_image=init, mask=_mask(64, 64), strength=1.0, steps=4, seed=3,
                   sampler="EulerDiscreteScheduler")  # fmt: skip
    base, refiner = inpaint9[1].model, sd1[1].model
    both = Pipeline(base, refiner=refiner)
    never = both.generate(**request, refiner_switch_at=1.0)
    alone = Pipeline(base).generate(**request)
    assert np.array_equal(as_array(never.images), as_array(alone.images))
    handed = both.generate(**request, refiner_switch_at=0.5)
    assert not np.array_equal(as_array(handed.images), as_array(alone.images))


@pytest.mark.parametrize("fill", ["latent noise", "latent nothing"])
def test_latent_masked_content_matches_diffusers_started_from_it(sd1, fill):
    """A1111's "latent noise" / "latent nothing" masked content: the area to repaint starts from the initial noise or
    from zeros. Reference: diffusers' inpainting whose scheduler noises that latent (its add_noise wrapped)."""
    parts, ours = sd1
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = diffusers_pipe("StableDiffusionInpaintPipeline", parts, "EulerDiscreteScheduler")
    repaint = torch.from_numpy((np.asarray(_mask(64, 64)) >= 128).astype(np.float32)[::8, ::8])[None, None]
    add_noise = pipe.scheduler.add_noise

    def started(x0, noise, t):
        x0 = x0 * (1 - repaint) + (noise * repaint if fill == "latent noise" else 0)
        return add_noise(x0, noise, t)

    pipe.scheduler.add_noise = started
    expected = pipe(PROMPT, image=init, mask_image=_mask(64, 64), strength=0.7, num_inference_steps=6,
                    guidance_scale=5.0, generator=generators(3, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, mask=_mask(64, 64), strength=0.7, steps=6, guidance=5.0,
                           sampler="EulerDiscreteScheduler", seed=3, inpainting_fill=fill)  # fmt: skip
    check(result, expected, f"masked content {fill}")
    assert f"Masked content: {fill}" in result.infotexts[0]


def test_initial_noise_multiplier_matches_diffusers_with_scaled_noise(sd1):
    parts, ours = sd1
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, "EulerDiscreteScheduler")
    add_noise = pipe.scheduler.add_noise
    pipe.scheduler.add_noise = lambda x0, noise, t: add_noise(x0, noise * 0.8, t)
    expected = pipe(PROMPT, image=init, strength=0.6, num_inference_steps=6, guidance_scale=5.0,
                    generator=generators(2, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, strength=0.6, steps=6, guidance=5.0, seed=2,
                           sampler="EulerDiscreteScheduler", initial_noise_multiplier=0.8)  # fmt: skip
    check(result, expected, "noise multiplier 0.8")
    assert "Noise multiplier: 0.8" in result.infotexts[0]


def test_latent_resize_mode_matches_diffusers_on_interpolated_latents(sd1):
    """A1111's "Just resize (latent upscale)": the init image is encoded at its own size (its VAE sample drawn first)
    and its latents resized bilinearly to the target; diffusers' img2img is given those latents."""
    parts, ours = sd1
    init = Image.fromarray(np.random.default_rng(6).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    generator = generators(9, 1)
    vae = parts["vae"]
    with torch.no_grad():
        pixels = torch.from_numpy(np.asarray(init, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        dist = vae.encode(pixels).latent_dist
        latents = (
            dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator[0])
        ) * vae.config.scaling_factor
        latents = torch.nn.functional.interpolate(latents, size=(8, 8), mode="bilinear", align_corners=False)
    pipe = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, "EulerDiscreteScheduler")
    expected = pipe(PROMPT, image=latents, strength=0.6, num_inference_steps=6, guidance_scale=5.0,
                    generator=generator, output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, resize_mode="latent", width=64, height=64, strength=0.6,
                           steps=6, guidance=5.0, seed=9, sampler="EulerDiscreteScheduler")  # fmt: skip
    check(result, expected, "latent resize mode")
    with pytest.raises(ValueError, match="without a mask"):
        ours.generate(prompt=PROMPT, init_image=init, mask=_mask(48, 40), resize_mode="latent", steps=2)


def test_eta_noise_seed_delta_matches_diffusers_with_a_second_generator(sd1):
    """A1111's ENSD: the initial noise comes from seed S, the ancestral sampler's noise from seed S + delta.
    Reference: diffusers given the first draw of generator(S) as latents and generator(S + delta) to step with."""
    parts, ours = sd1
    seed, delta = 12, 31337
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, "EulerAncestralDiscreteScheduler")
    expected = pipe(PROMPT, width=64, height=64, num_inference_steps=5, guidance_scale=6.0, latents=latents,
                    generator=generators(seed + delta, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=5, guidance=6.0, seed=seed,
                           sampler="EulerAncestralDiscreteScheduler", eta_noise_seed_delta=delta)  # fmt: skip
    check(result, expected, "ENSD")
    assert "ENSD: 31337" in result.infotexts[0]
    tree = ours.generate(prompt=PROMPT, width=64, height=64, steps=3, seed=seed, sampler="DPM++ SDE",
                         eta_noise_seed_delta=delta)  # fmt: skip
    plain = ours.generate(prompt=PROMPT, width=64, height=64, steps=3, seed=seed, sampler="DPM++ SDE")
    assert np.array_equal(as_array(tree.images), as_array(plain.images))  # trees keep the images' seeds
    assert "ENSD" not in tree.infotexts[0]
