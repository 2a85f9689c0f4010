"""EDM models on SDXL's UNet (Karras et al. 2022's preconditioning; mlx_sd/schedules.py, mlx_sd/denoiser.py):
Playground v2.5 (EDM epsilon, sigma_data 0.5, per-channel latent statistics) and CosXL (EDM v-prediction, sigma_data
1, sigmas up to 120), against diffusers' StableDiffusionXL pipelines running its EDM schedulers, on tiny random
models converted from diffusers folders; and the markers of their single files (ComfyUI's edm_mean / edm_std,
edm_vpred.sigma_*, and v_pred + ztsnr), which must convert to the folders' configs.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from sgm_fixtures import diffusers_parts, sgm_state
from test_pipeline import check, generators

from mlx_sd.pipeline import Pipeline
from mlx_sd.schedules import ZERO_SNR_ALPHA_BAR, NoiseSchedule
from mlx_sd_convert import convert
from mlx_sd_convert.families import COSXL_SCHEDULER, PLAYGROUND_LATENTS, PLAYGROUND_SCHEDULER
from oracles import psnr

PROMPT = "a lighthouse on a cliff, oil painting"
STATS = {"latents_mean": [0.31, -0.42, 0.15, 0.6], "latents_std": [1.7, 0.8, 1.3, 2.1]}


def edm_pipeline(scheduler: dict, statistics: dict | None = None, seed: int = 4):
    """A tiny StableDiffusionXLPipeline with an EDM scheduler (and a VAE with latent statistics)."""
    import diffusers

    parts = diffusers_parts("base", seed)
    if statistics is not None:
        vae = parts["vae"]
        config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
        parts["vae"] = diffusers.AutoencoderKL(**{**config, **statistics, "scaling_factor": 0.5})
        parts["vae"].load_state_dict(vae.state_dict())
    config = {k: v for k, v in scheduler.items() if k != "_class_name"}
    parts["scheduler"] = getattr(diffusers, scheduler["_class_name"])(**config)
    pipe = diffusers.StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def converted(pipe, tmp) -> Pipeline:
    pipe.save_pretrained(tmp / "folder")
    convert(tmp / "folder", tmp / "mlx", dtype="float32")
    return Pipeline(tmp / "mlx")


@pytest.fixture(scope="module")
def playground(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    pipe = edm_pipeline(PLAYGROUND_SCHEDULER, STATS)
    return pipe, converted(pipe, tmp), tmp


@pytest.fixture(scope="module")
def cosxl(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cosxl")
    pipe = edm_pipeline(COSXL_SCHEDULER, seed=6)
    return pipe, converted(pipe, tmp), tmp


@pytest.mark.parametrize("batch", [1, 2])
def test_playground_txt2img_matches_diffusers(playground, batch):
    """EDMDPMSolverMultistepScheduler (DPM-Solver++ 2M over Karras sigmas from 80) is the model's default: DPM++ 2M
    Karras at CFG 3 here; the latents decode through the VAE's per-channel statistics."""
    ref, ours, _ = playground
    expected = ref(PROMPT, negative_prompt="blurry", width=64, height=64, num_inference_steps=8, guidance_scale=3.0,
                   generator=generators(3, batch), num_images_per_prompt=batch, output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, negative_prompt="blurry", width=64, height=64, steps=8, seed=3,
                           batch_size=batch)  # fmt: skip
    assert (result.request.sampler, result.request.schedule_type, result.request.guidance) == ("DPM++ 2M", "Karras", 3)
    check(result, expected, f"playground txt2img batch {batch}")


def test_playground_img2img_matches_diffusers(playground):
    """The init image enters as (z - mean) * 0.5 / std and is noised in VE space (EDM's add_noise)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    ref, ours, _ = playground
    pipe = StableDiffusionXLImg2ImgPipeline(**ref.components, requires_aesthetics_score=False)
    pipe.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.random.default_rng(8).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    expected = pipe(PROMPT, image=init, strength=0.6, num_inference_steps=10, guidance_scale=3.0,
                    generator=generators(5, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, strength=0.6, steps=10, seed=5)
    check(result, expected, "playground img2img")


def test_cosxl_txt2img_matches_diffusers(cosxl):
    """EDMEulerScheduler over exponential sigmas from 120, v-prediction with sigma_data 1: Euler Exponential."""
    ref, ours, _ = cosxl
    expected = ref(PROMPT, width=64, height=96, num_inference_steps=6, guidance_scale=5.0,
                   generator=generators(4, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=96, steps=6, guidance=5.0, seed=4)
    assert (result.request.sampler, result.request.schedule_type) == ("Euler", "Exponential")
    check(result, expected, "cosxl txt2img")
    # The preconditioning matters: the same weights as a plain (VP) SDXL model give another image.
    import diffusers

    plain = diffusers.StableDiffusionXLPipeline(**{**ref.components, "scheduler": diffusers.EulerDiscreteScheduler()})
    plain.set_progress_bar_config(disable=True)
    other = plain(PROMPT, width=64, height=96, num_inference_steps=6, guidance_scale=5.0,
                  generator=generators(4, 1), output_type="np").images  # fmt: skip
    assert psnr(np.asarray(result.images[0], np.float32) / 255, other[0]) < 30


def test_edm_defaults_reach_the_server(playground, cosxl):
    from mlx_sd_apps.server.registry import ModelRegistry

    registry = ModelRegistry(extra=[playground[2] / "mlx", cosxl[2] / "mlx"])
    defaults = {entry.folder.parent.name.rstrip("0123456789"): entry.defaults for entry in registry.list()}
    assert (defaults["playground"].sampler, defaults["playground"].schedule_type, defaults["playground"].guidance) == (
        "DPM++ 2M",
        "Karras",
        3.0,
    )
    assert (defaults["cosxl"].sampler, defaults["cosxl"].schedule_type, defaults["cosxl"].guidance) == (
        "Euler",
        "Exponential",
        7.0,
    )
    samplers = {entry.folder.parent.name.rstrip("0123456789"): entry.samplers for entry in registry.list()}
    assert "DPM++ 2M SDE" in samplers["playground"] and not {"DDIM", "UniPC", "LCM"} & set(samplers["cosxl"])


# --- single files: the markers ComfyUI reads ----------------------------------------------------------------


def _save(path, state):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
    return path


def _config(folder, component):
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / component / name).read_text())


def test_playground_file_converts_to_the_folders_model(playground, tmp_path):
    """edm_mean / edm_std (Playground's published single file): its EDM scheduler, the VAE's statistics and scale;
    the same weights and configs as the diffusers folder."""
    ref, _, tmp = playground
    parts = dict(ref.components)
    state = sgm_state("base", parts)
    state["edm_mean"] = np.array(STATS["latents_mean"], np.float32).reshape(1, 4, 1, 1)
    state["edm_std"] = np.array(STATS["latents_std"], np.float32).reshape(1, 4, 1, 1)
    info = convert(_save(tmp_path / "playground-v2.5.safetensors", state), tmp_path / "out", dtype="float32")
    assert info.detection["prediction_type"]["evidence"].startswith("marker tensors edm_mean / edm_std")
    vae, folder = _config(tmp_path / "out", "vae"), _config(tmp / "mlx", "vae")
    for key in STATS:  # the file's float32 tensors against the folder's JSON numbers
        np.testing.assert_array_equal(np.float32(vae.pop(key)), np.float32(folder.pop(key)), err_msg=key)
    assert vae == folder and vae["scaling_factor"] == PLAYGROUND_LATENTS["scaling_factor"]
    assert _config(tmp_path / "out", "scheduler") == PLAYGROUND_SCHEDULER
    for name in ("unet", "vae"):
        assert (tmp_path / "out" / name / "weights.safetensors").read_bytes() == (
            tmp / "mlx" / name / "weights.safetensors"
        ).read_bytes(), name


def test_cosxl_and_ztsnr_markers(tmp_path):
    """edm_vpred.sigma_max / sigma_min: CosXL's scheduler with the file's range; v_pred + ztsnr: the family's scheduler
    with zero terminal SNR (as ComfyUI samples those files)."""
    state = sgm_state("base")
    cosxl = {**state, "edm_vpred.sigma_max": np.float32(120.0), "edm_vpred.sigma_min": np.float32(0.002)}
    info = convert(_save(tmp_path / "cosxl.safetensors", cosxl), tmp_path / "cosxl", dtype="float32")
    scheduler = _config(tmp_path / "cosxl", "scheduler")
    assert info.prediction_type == "v_prediction"
    assert scheduler == {**COSXL_SCHEDULER, "sigma_min": float(np.float32(0.002)), "sigma_max": 120.0}
    assert NoiseSchedule.from_config(scheduler).is_edm

    noob = {**state, "v_pred": np.zeros(0, np.float32), "ztsnr": np.zeros(0, np.float32)}
    info = convert(_save(tmp_path / "noob.safetensors", noob), tmp_path / "noob", dtype="float32")
    scheduler = _config(tmp_path / "noob", "scheduler")
    assert info.prediction_type == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True
    assert NoiseSchedule.from_config(scheduler).alphas_cumprod[-1] == np.float32(ZERO_SNR_ALPHA_BAR)
    plain = convert(_save(tmp_path / "v.safetensors", {**state, "v_pred": np.zeros(0, np.float32)}), tmp_path / "v")
    assert (
        "rescale_betas_zero_snr" not in _config(tmp_path / "v", "scheduler") and plain.prediction_type == "v_prediction"
    )


def test_bad_playground_statistics_are_refused(tmp_path):
    from mlx_sd_convert import ConversionError

    state = {**sgm_state("base"), "edm_mean": np.zeros(3, np.float32), "edm_std": np.ones(4, np.float32)}
    with pytest.raises(ConversionError, match=r"edm_mean holds 3 values; Playground's latent statistics are 4"):
        convert(_save(tmp_path / "bad.safetensors", state), tmp_path / "out")


def test_edm_sampler_rules(playground):
    """diffusers' EDM schedulers are k-diffusion's samplers: follow="diffusers" plans the same steps; the DDPM-family
    samplers, which index a diffusion model's timestep table, are refused by name."""
    _, ours, _ = playground
    kwargs = dict(prompt=PROMPT, width=64, height=64, steps=4, seed=2)
    plain = ours.generate(**kwargs)
    same = ours.generate(**kwargs, follow="diffusers")
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(same.images[0]))
    for name in ("DDIM", "UniPC", "LCM", "EulerDiscreteScheduler"):
        with pytest.raises(ValueError, match=r"runs a diffusion model's \(DDPM\) timestep table; EDM models"):
            ours.generate(**kwargs, sampler=name)


@pytest.mark.parametrize("config", [PLAYGROUND_SCHEDULER, COSXL_SCHEDULER], ids=["karras", "exponential"])
@pytest.mark.parametrize("steps", [2, 7, 30])  # one exponential step: diffusers starts at sigma_min, k-diffusion max
def test_edm_sigmas_equal_diffusers(config, steps):
    """The levels walked (the published schedule type, "Automatic") equal the EDM scheduler's sigmas, and the model
    sees its timesteps (0.25 ln sigma)."""
    import diffusers

    from mlx_sd.samplers import plan_sampling

    reference = getattr(diffusers, config["_class_name"])(**{k: v for k, v in config.items() if k != "_class_name"})
    reference.set_timesteps(steps)
    schedule = NoiseSchedule.from_config(config)
    sampler = "DPM++ 2M" if config is PLAYGROUND_SCHEDULER else "Euler"
    plan = plan_sampling(sampler, schedule, steps, schedule_type=config["sigma_schedule"])
    np.testing.assert_allclose(plan.sigmas, reference.sigmas.numpy(), rtol=1e-6)  # float64 against float32 maths
    seen = []
    plan.denoiser(lambda x, t: seen.append(t) or x)(mx.ones((1, 2, 2, 4)), plan.sigmas[0])
    np.testing.assert_allclose(seen[0], reference.timesteps.numpy()[0], rtol=1e-6)


def test_automatic_schedule_type_is_the_published_one(cosxl):
    """A request naming no schedule type (A1111 clients send none) walks the model's published sigmas."""
    _, ours, _ = cosxl
    kwargs = dict(prompt=PROMPT, width=64, height=64, steps=4, seed=2, sampler="Euler")
    automatic = ours.generate(**kwargs, schedule_type="Automatic")
    exponential = ours.generate(**kwargs, schedule_type="Exponential")
    assert np.array_equal(np.asarray(automatic.images[0]), np.asarray(exponential.images[0]))
