"""ControlNet generation against diffusers' ControlNet pipelines (txt2img, img2img, inpainting, SDXL, several units,
guess mode, guidance windows) and A1111's control modes, on tiny random-weight models."""

from __future__ import annotations

import copy
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import tiny_controlnet
from test_pipeline import PROMPT, as_array, diffusers_pipe, generators
from test_pipeline import inpaint9 as inpaint9  # noqa: F401  (the 9-channel fixture)
from test_sdxl_pipeline import sdxl, xl_pipe  # noqa: F401  (the SDXL fixture)

from mlx_sd.controlnet import ControlNetUnit, Controls
from mlx_sd_convert.controlnet import read_controlnet
from oracles import psnr

SCHEDULER = "EulerDiscreteScheduler"  # diffusers-style: the guidance window follows diffusers' rule
# Images agree to 8-bit rounding (~59 dB); a guidance window off by one step at its end still gives ~40 dB.
MIN_PSNR = 50.0


def check(result, expected: np.ndarray, what: str) -> None:
    value = psnr(as_array(result.images), expected, data_range=1.0)
    assert value >= MIN_PSNR, f"{what}: PSNR {value:.1f} dB < {MIN_PSNR}"


def control_image(seed: int, size=(64, 64)) -> Image.Image:
    rough = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(rough).resize(size, Image.NEAREST)


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """Two tiny SD 1.x ControlNets: (diffusers models, ours)."""
    tmp = tmp_path_factory.mktemp("controlnets")
    references, ours = [], []
    for seed in (11, 12):
        reference = tiny_controlnet("sd1", seed)
        reference.save_pretrained(tmp / f"cn{seed}")
        references.append(reference)
        ours.append(read_controlnet(tmp / f"cn{seed}", mx.float32))
    return references, ours


def cn_pipe(cls, parts, controlnet, scheduler=SCHEDULER):
    return diffusers_pipe(cls, {**parts, "controlnet": controlnet}, scheduler)


WINDOWS = [  # weight, start, end, guess mode
    (1.0, 0.0, 1.0, False),
    (0.7, 0.2, 0.8, False),
    (1.3, 0.0, 0.6, True),
]


@pytest.mark.parametrize("weight,start,end,guess", WINDOWS)
def test_txt2img_matches_diffusers(sd1, controlnets, weight, start, end, guess):
    parts, ours = sd1
    (reference, _), (controlnet, _) = controlnets
    image = control_image(1)
    pipe = cn_pipe("StableDiffusionControlNetPipeline", parts, reference)
    expected = pipe(PROMPT, image=image, width=64, height=64, num_inference_steps=5, guidance_scale=6.0,
                    controlnet_conditioning_scale=weight, control_guidance_start=start, control_guidance_end=end,
                    guess_mode=guess, generator=generators(7, 1), output_type="np").images  # fmt: skip
    unit = ControlNetUnit(controlnet, image, weight, start, end, "guess" if guess else "balanced")
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=5, guidance=6.0, seed=7, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    check(result, expected, f"controlnet txt2img w={weight} [{start}, {end}] guess={guess}")
    plain = ours.generate(prompt=PROMPT, width=64, height=64, steps=5, guidance=6.0, seed=7, sampler=SCHEDULER)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))  # the control acted


@pytest.mark.parametrize("batching", [dict(batch_size=2), dict(batch_count=2)])
def test_two_units_match_multicontrolnet(sd1, controlnets, batching):
    parts, ours = sd1
    references, loaded = controlnets
    images = [control_image(2), control_image(3)]
    pipe = cn_pipe("StableDiffusionControlNetPipeline", parts, list(references))  # a MultiControlNetModel
    expected = pipe(PROMPT, image=images, width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                    controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                    control_guidance_end=[1.0, 0.75], generator=generators(9, 2), num_images_per_prompt=2,
                    output_type="np").images  # fmt: skip
    units = (ControlNetUnit(loaded[0], images[0], 0.8), ControlNetUnit(loaded[1], images[1], 0.5, 0.25, 0.75))
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=5.0, seed=9, sampler=SCHEDULER,
                           controlnet=units, **batching)  # fmt: skip
    check(result, expected, f"two ControlNets, two images ({batching})")


def test_img2img_and_inpainting_match_diffusers(sd1, controlnets):
    parts, ours = sd1
    (reference, _), (controlnet, _) = controlnets
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    image = control_image(4)
    unit = ControlNetUnit(controlnet, image, 0.9)
    pipe = cn_pipe("StableDiffusionControlNetImg2ImgPipeline", parts, reference)
    expected = pipe(PROMPT, image=init, control_image=image, strength=0.7, num_inference_steps=6, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.9, generator=generators(3, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, strength=0.7, steps=6, guidance=5.0, seed=3,
                           sampler=SCHEDULER, controlnet=(unit,))  # fmt: skip
    check(result, expected, "controlnet img2img")

    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 8, 48, 40))
    pipe = cn_pipe("StableDiffusionControlNetInpaintPipeline", parts, reference)
    expected = pipe(PROMPT, image=init, mask_image=mask, control_image=image, strength=1.0, num_inference_steps=5,
                    guidance_scale=5.0, controlnet_conditioning_scale=0.9, generator=generators(6, 1),
                    output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, mask=mask, strength=1.0, steps=5, guidance=5.0, seed=6,
                           sampler=SCHEDULER, controlnet=(unit,))  # fmt: skip
    check(result, expected, "controlnet inpainting")


def make_inpaint_condition(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """diffusers' recipe for inpainting ControlNets (its ControlNet docs): the area to repaint at -1."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    pixels[np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 > 0.5] = -1.0
    return torch.from_numpy(pixels[None].transpose(0, 3, 1, 2).copy())


@pytest.mark.parametrize("which", ["sd1", "inpaint9"])
def test_inpaint_module_matches_diffusers_make_inpaint_condition(sd1, inpaint9, controlnets, which):
    parts, ours = sd1 if which == "sd1" else inpaint9
    (reference, _), (controlnet, _) = controlnets
    init = Image.fromarray(np.random.default_rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (8, 24, 40, 56))
    pipe = cn_pipe("StableDiffusionControlNetInpaintPipeline", parts, reference)
    # (the scale given: this pipeline's default is 0.5, not the others' 1.0)
    expected = pipe(PROMPT, image=init, mask_image=mask, control_image=make_inpaint_condition(init, mask),
                    strength=1.0, num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=1.0,
                    generator=generators(5, 1), output_type="np").images  # fmt: skip
    unit = ControlNetUnit(controlnet, module="inpaint")
    result = ours.generate(prompt=PROMPT, init_image=init, mask=mask, strength=1.0, steps=4, guidance=5.0, seed=5,
                           sampler=SCHEDULER, controlnet=(unit,))  # fmt: skip
    check(result, expected, f"inpaint module, {which}")
    assert "Module: inpaint_global_harmonious" in result.infotexts[0]
    with pytest.raises(ValueError, match="needs an inpainting request"):
        ours.generate(prompt=PROMPT, width=64, height=64, steps=1, controlnet=(unit,))


def restoring_unet(pipe, latents: torch.Tensor, mask: Image.Image, weight: float):
    """The pipe's UNet with the ControlNet extension's "inpaint_only" restore (its hook's "Post-processing for
    restore", transcribed): x0 from the noise prediction at the rounded timestep, the known region's x0 replaced
    by the init image's latents outside the 10x10 max-pooled mask, back to noise, blended by the weight."""
    unet, forward = pipe.unet, pipe.unet.forward
    alphas = pipe.scheduler.alphas_cumprod.double()
    recip, recip_m1 = (torch.sqrt(1.0 / alphas).float(), torch.sqrt(1.0 / alphas - 1).float())
    pixels = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 > 0.5).float()[None, None]
    pooled = torch.nn.functional.max_pool2d(pixels, (10, 10), stride=(8, 8), padding=1)
    w = max(0.0, min(1.0, weight))

    def restored(sample, timestep, *args, **kwargs):
        h = forward(sample, timestep, *args, **kwargs)[0]
        t = torch.round(torch.as_tensor(timestep).float()).long()
        xt = sample[:, :4]
        x0 = (recip[t] * xt - recip_m1[t] * h) * pooled + latents * (1 - pooled)
        return ((recip[t] * xt - x0) / recip_m1[t] * w + h * (1 - w),)

    unet.forward = restored
    return pipe


@pytest.mark.parametrize("which", ["sd1", "inpaint9"])
def test_inpaint_only_matches_the_extensions_restore_on_diffusers(sd1, inpaint9, controlnets, which):
    """ "inpaint_only": the inpaint module's control image, and the known region restored at every step, against
    diffusers' ControlNet inpainting pipeline with the extension's restore transcribed onto its UNet."""
    parts, ours = sd1 if which == "sd1" else inpaint9
    (reference, _), (controlnet, _) = controlnets
    init = Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 8, 48, 40))
    pipe = cn_pipe("StableDiffusionControlNetInpaintPipeline", {**parts, "unet": copy.deepcopy(parts["unet"])},
                   reference)  # (its UNet patched below: a copy of the module's)  # fmt: skip
    image = torch.from_numpy(np.asarray(init, dtype=np.float32)[None].transpose(0, 3, 1, 2) / 127.5 - 1)
    with torch.no_grad():
        latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
    restoring_unet(pipe, latents, mask, 0.35)  # a weak restore: its weight shows
    expected = pipe(PROMPT, image=init, mask_image=mask, control_image=make_inpaint_condition(init, mask),
                    strength=1.0, num_inference_steps=4, guidance_scale=5.0, controlnet_conditioning_scale=0.35,
                    generator=generators(5, 1), output_type="np").images  # fmt: skip
    unit = ControlNetUnit(controlnet, module="inpaint_only", weight=0.35)
    result = ours.generate(prompt=PROMPT, init_image=init, mask=mask, strength=1.0, steps=4, guidance=5.0, seed=5,
                           sampler=SCHEDULER, controlnet=(unit,))  # fmt: skip
    check(result, expected, f"inpaint_only, {which}")
    assert "Module: inpaint_only" in result.infotexts[0]
    plain = ours.generate(prompt=PROMPT, init_image=init, mask=mask, strength=1.0, steps=4, guidance=5.0, seed=5,
                          sampler=SCHEDULER, controlnet=(replace(unit, module="inpaint"),))  # fmt: skip
    if which == "inpaint9":  # (a 4-channel UNet's known region is replaced by the init latents at every step)
        assert psnr(as_array(plain.images), as_array(result.images), data_range=1.0) < 40  # the restore shows


@pytest.mark.parametrize("hr_option", ["both", "low_res_only", "high_res_only"])
def test_hires_fix_controls_the_passes_hr_option_names(sd1, controlnets, hr_option):
    """A1111 applies a unit to the passes of the hires fix its hr_option names (both by default), its image fitted to
    each size. Reference: diffusers' (ControlNet) txt2img (latents), torch's interpolate, diffusers' (ControlNet)
    img2img over int(steps / strength) steps of which the last hires steps run (tests/test_hires.py composes the
    plain hires fix the same way)."""
    parts, ours = sd1
    (reference, _), (controlnet, _) = controlnets
    image = control_image(10, (80, 80))
    control = {"image": image, "controlnet_conditioning_scale": 0.8}
    first, second = hr_option != "high_res_only", hr_option != "low_res_only"
    if first:
        txt2img, extra = cn_pipe("StableDiffusionControlNetPipeline", parts, reference), control
    else:
        txt2img, extra = diffusers_pipe("StableDiffusionPipeline", parts, SCHEDULER), {}
    latents = txt2img(PROMPT, width=64, height=64, num_inference_steps=4, guidance_scale=6.0,
                      generator=generators(12, 1), output_type="latent", **extra).images  # fmt: skip
    up = torch.nn.functional.interpolate(latents, size=(10, 10), mode="bilinear", align_corners=False)
    hr_steps, strength = 3, 0.6
    total = int(hr_steps / strength)
    if second:
        img2img = cn_pipe("StableDiffusionControlNetImg2ImgPipeline", parts, reference)
        extra = {"control_image": image, "controlnet_conditioning_scale": 0.8}
    else:
        img2img, extra = diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, SCHEDULER), {}
    expected = img2img(PROMPT, image=up, strength=(hr_steps + 0.5) / total, width=80, height=80,
                       num_inference_steps=total, guidance_scale=6.0, generator=generators(12, 1), output_type="np",
                       **extra).images  # fmt: skip
    unit = ControlNetUnit(controlnet, image, 0.8, resize_mode="resize", hr_option=hr_option)
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=6.0, seed=12, sampler=SCHEDULER,
                           enable_hr=True, hr_scale=1.25, hr_second_pass_steps=hr_steps, strength=strength,
                           controlnet=(unit,))  # fmt: skip
    check(result, expected, f"hires fix with a ControlNet, {hr_option}")
    assert ("Hr Option" in result.infotexts[0]) == (hr_option != "both")


def test_a_high_res_only_unit_is_idle_without_a_hires_fix(sd1, controlnets):
    """The extension disables a "High res only" unit outside a hires fix's second pass: the image is the plain one."""
    parts, ours = sd1
    (_, _), (controlnet, _) = controlnets
    unit = ControlNetUnit(controlnet, control_image(10), 0.8, hr_option="high_res_only")
    settings = dict(prompt=PROMPT, width=64, height=64, steps=3, guidance=6.0, seed=4, sampler=SCHEDULER)
    plain = as_array(ours.generate(**settings).images)
    assert np.array_equal(as_array(ours.generate(**settings, controlnet=(unit,)).images), plain)
    with pytest.raises(ValueError, match="hr_option='high'"):
        ours.generate(**settings, controlnet=(ControlNetUnit(controlnet, control_image(10), hr_option="high"),))


def test_sdxl_matches_diffusers(sdxl, tmp_path):  # noqa: F811
    parts, ours = sdxl
    reference = tiny_controlnet("sdxl", 13)
    reference.save_pretrained(tmp_path / "cn")
    unit = ControlNetUnit(read_controlnet(tmp_path / "cn", mx.float32), control_image(6, (64, 96)), 0.8, 0.0, 0.8)
    pipe = xl_pipe("StableDiffusionXLControlNetPipeline", {**parts, "controlnet": reference}, SCHEDULER)
    expected = pipe(PROMPT, image=unit.image, width=64, height=96, num_inference_steps=5, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.8, control_guidance_end=0.8, generator=generators(8, 1),
                    output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=96, steps=5, guidance=5.0, seed=8, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    check(result, expected, "SDXL controlnet")


def a1111_modes(forward, weight: float, soft: bool, cfg: bool):
    """A diffusers ControlNetModel's forward with A1111's control modes applied to its residuals, as the extension's
    hook does: soft injection scales residual i by weight * 0.825 ** (12 - i); cfg injection multiplies by the batch's
    cond_mark (0 for the unconditional rows, 1 for the conditional ones)."""

    def modes(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale, **kwargs):
        down, mid = forward(sample, timestep, encoder_hidden_states, controlnet_cond, 1.0, **kwargs)
        control = [*down, mid]
        scales = [weight * (0.825 ** float(12 - i) if soft else 1.0) for i in range(13)]
        control = [c * s for c, s in zip(control, scales)]
        if cfg:
            half = sample.shape[0] // 2
            mark = torch.cat([torch.zeros(half), torch.ones(half)]).reshape(-1, 1, 1, 1)
            control = [c * mark for c in control]
        return control[:-1], control[-1]

    return modes


@pytest.mark.parametrize("mode,soft,cfg", [("prompt", True, False), ("controlnet", True, True)])
def test_a1111_control_modes(sd1, controlnets, mode, soft, cfg, monkeypatch):
    parts, ours = sd1
    (reference, _), (controlnet, _) = controlnets
    image = control_image(8)
    pipe = cn_pipe("StableDiffusionControlNetPipeline", parts, reference)
    monkeypatch.setattr(reference, "forward", a1111_modes(reference.forward, 0.9, soft, cfg))
    expected = pipe(PROMPT, image=image, width=64, height=64, num_inference_steps=4, guidance_scale=6.0,
                    generator=generators(2, 1), output_type="np").images  # fmt: skip
    unit = ControlNetUnit(controlnet, image, 0.9, control_mode=mode)
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=6.0, seed=2, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    check(result, expected, f"A1111 control mode {mode}")


def test_canny_module_and_infotext(sd1, controlnets):
    from mlx_sd.infotext import parse_infotext
    from mlx_sd.preprocessors import preprocess

    parts, ours = sd1
    (reference, _), (controlnet, _) = controlnets
    photo = control_image(9, (96, 64)).resize((96, 64), Image.BILINEAR)
    edges = preprocess(photo, "canny", 128, 20, 60)  # what the unit's module makes, at 192x128
    pipe = cn_pipe("StableDiffusionControlNetPipeline", parts, reference)
    expected = pipe(PROMPT, image=edges, width=96, height=64, num_inference_steps=4, guidance_scale=6.0,
                    generator=generators(4, 1), output_type="np").images  # fmt: skip
    unit = ControlNetUnit(controlnet, photo, resize_mode="resize", module="canny", processor_res=128, threshold_a=20,
                          threshold_b=60)  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=96, height=64, steps=4, guidance=6.0, seed=4, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    check(result, expected, "canny module")
    params = parse_infotext(result.infotexts[0])[2]
    assert params["ControlNet 0"] == (
        "Module: canny, Model: cn11, Weight: 1.0, Resize Mode: Just Resize, Processor Res: 128, Threshold A: 20, "
        "Threshold B: 60, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: Balanced"
    )


def test_guidance_window_rules():
    unit = ControlNetUnit("x", Image.new("RGB", (8, 8)), guidance_start=0.2, guidance_end=0.7)
    for rule, expected in [("diffusers", [2, 3, 4, 5, 6]), ("a1111", [2, 3, 4, 5, 6, 7])]:
        controls = Controls([unit], 8, 8, 10, rule)
        active = []
        for step in range(10):
            controls.step = step
            if controls.active(unit):
                active.append(step)
        # diffusers keeps step i while (i + 1) / n <= end; A1111's extension while i / n <= end
        assert active == expected, rule


def test_refused_and_mismatched(sd1, sdxl, controlnets):  # noqa: F811
    parts, ours = sd1
    _, (controlnet, _) = controlnets
    image = control_image(1)
    with pytest.raises(ValueError, match="no ControlNet folder"):
        ours.generate(prompt=PROMPT, width=64, height=64, steps=1, controlnet=(ControlNetUnit("canny", image),))
    with pytest.raises(ValueError, match="another model family"):
        sdxl[1].generate(prompt=PROMPT, width=64, height=64, steps=1, controlnet=(ControlNetUnit(controlnet, image),))
