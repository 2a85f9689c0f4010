"""Every sampler against its reference, step by step.

A1111 names run k-diffusion's sampling function over A1111's sigmas; with follow="diffusers" (and for the
diffusers-style names) they run as the diffusers scheduler configured from a Stable Diffusion scheduler_config.
Both sides get the same model function (an analytic function of (x, t), and in a few cases a tiny random-weight
UNet) and the same noise; every intermediate latent must agree to 1e-5 of the reference's range.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
import pytest
import torch
from sampling_refs import (
    SD_CONFIG,
    SHAPE_NCHW,
    BrownianReplay,
    IIDReplay,
    ReplayNoise,
    as_float64,
    diffusers_scheduler,
    draws,
    img2img_timesteps,
    nhwc,
    run_diffusers,
    run_k_diffusion,
    run_ours,
)

from mlx_sd.samplers import SAMPLERS, plan_sampling
from mlx_sd.schedules import NoiseSchedule
from oracles import assert_close, relative_error

TOL = 1e-5  # max |ours - ref| / max |ref| at every step, float32
STEPS = (1, 2, 4, 10, 25, 50)
PREDICTIONS = ("epsilon", "v_prediction")

# registry name -> (k-diffusion function, reference keyword arguments, noise sampler kind)
K_DIFFUSION = {
    "Euler a": ("sample_euler_ancestral", {}, "iid"),
    "Euler": ("sample_euler", {}, None),
    "LMS": ("sample_lms", {}, None),
    "Heun": ("sample_heun", {}, None),
    "DPM2": ("sample_dpm_2", {}, None),
    "DPM2 a": ("sample_dpm_2_ancestral", {}, "iid"),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {}, "iid"),
    "DPM++ 2M": ("sample_dpmpp_2m", {}, None),
    "DPM++ SDE": ("sample_dpmpp_sde", {}, "brownian"),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {}, "iid"),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, "iid"),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", {}, "iid"),
}
# diffusers scheduler classes exercised below (each registry name's class must be here)
DIFFUSERS_TESTED = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "DPMSolverMultistepScheduler",
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
}


def test_every_registered_sampler_has_a_reference_here():
    """A sampler added to the registry without a parity case here fails this test."""
    for s in SAMPLERS.values():
        assert s.kdiffusion is None or s.name in K_DIFFUSION, f"{s.name}: add a k-diffusion parity case"
        assert s.diffusers is None or s.diffusers in DIFFUSERS_TESTED, f"{s.name}: add a diffusers parity case"
        assert s.kdiffusion or s.diffusers, f"{s.name} names no reference"


def _compare(ours, ref, what, ref64=None):
    """Every step within TOL of the reference, or else within TOL of the reference's own float64 run, or no further
    from it than the float32 reference is (steps to tiny sigmas cancel large numbers, and the float32 reference is
    then itself off by more than TOL); such steps are printed (-s) and listed in the README."""
    assert len(ours) == len(ref), f"{what}: {len(ours)} steps, reference {len(ref)}"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours, ref)):
        err = relative_error(a, b)
        if err > TOL and ref64 is not None:
            ref64 = ref64() if callable(ref64) else ref64  # computed only when needed
            own, err64 = relative_error(b, ref64[i]), relative_error(a, ref64[i])
            assert err64 <= max(TOL, own), f"{what} step {i}: {err:.3g} from the reference, {err64:.3g} from its " \
                                           f"float64 run (which the float32 reference is {own:.3g} from)"  # fmt: skip
            print(f"{what} step {i}: float32 reference off its float64 run by {own:.2e}; ours by {err64:.2e}")
            continue
        worst = max(worst, assert_close(a, b, TOL, f"{what} step {i}"))
    return worst


# --- k-diffusion (A1111) -------------------------------------------------------------------------------------


def _k_parity(name, prediction, steps, schedule_type=None, seed=0, **options):
    schedule = NoiseSchedule.from_config({**SD_CONFIG, "prediction_type": prediction})
    plan = plan_sampling(name, schedule, steps, schedule_type=schedule_type, **options)
    function, ref_kwargs, noise_kind = K_DIFFUSION[name]
    noise = draws(2 * len(plan.sigmas) + 1, seed)
    x_init = noise[0] * plan.init_noise_sigma
    ours = run_ours(plan, nhwc(x_init), ReplayNoise(noise[1:]))
    replay = {"iid": IIDReplay, "brownian": BrownianReplay, None: lambda _: None}[noise_kind]

    def reference(dtype, arrays):
        out = run_k_diffusion(function, prediction, schedule.alphas_cumprod, plan.sigmas, x_init, replay(arrays),
                              randn_like=arrays if options.get("s_churn") else None, dtype=dtype, **ref_kwargs,
                              **options)  # fmt: skip
        # k-diffusion's callback shows x after the next step's churn noise: with churn compare the results only
        return out[-1:] if options.get("s_churn") else out

    what = f"{name} {prediction} {steps} steps {schedule_type or 'Automatic'} {options}"
    ours = ours[-1:] if options.get("s_churn") else ours
    return _compare(
        ours, reference(torch.float32, noise[1:]), what, lambda: reference(torch.float64, as_float64(noise[1:]))
    )


# k-diffusion 0.1.1's 2M/3M SDE raise UnboundLocalError for a single step (`h_last = h` before h is set); ours
# takes the one step to sigma 0 as they do for the last step of longer runs (x = denoised).
_SINGLE_STEP_BROKEN = {"DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", list(K_DIFFUSION))
def test_a1111_sampler_matches_k_diffusion(name, prediction, steps):
    if steps == 1 and name in _SINGLE_STEP_BROKEN:
        pytest.skip("k-diffusion 0.1.1 raises for one step (see _SINGLE_STEP_BROKEN)")
    _k_parity(name, prediction, steps)


SCHEDULE_TYPES = ("Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal", "Simple",
                  "Normal", "DDIM")  # fmt: skip


@pytest.mark.parametrize("schedule_type", SCHEDULE_TYPES)
@pytest.mark.parametrize("name", ["DPM++ 2M", "Euler a", "Heun"])
def test_a1111_schedule_types_match_k_diffusion(name, schedule_type):
    for steps in (3, 12):
        _k_parity(name, "epsilon", steps, schedule_type)


def test_a1111_options_match_k_diffusion():
    _k_parity("Euler a", "epsilon", 10, eta=0.6, s_noise=0.9)
    _k_parity("DPM++ 2M SDE", "v_prediction", 10, eta=0.5)
    _k_parity("DPM++ SDE", "epsilon", 6, eta=0.7, r=0.4)
    _k_parity("Euler", "epsilon", 10, s_churn=2.0, s_tmin=0.5, s_tmax=8.0)
    _k_parity("DPM2", "epsilon", 6, s_churn=1.0)


# --- diffusers -----------------------------------------------------------------------------------------------


def _d_parity(class_name, prediction, steps, config=None, strength=1.0, seed=0, step_kwargs=None, **options):
    config = {**SD_CONFIG, "prediction_type": prediction, **(config or {})}
    schedule = NoiseSchedule.from_config(config)
    plan = plan_sampling(class_name, schedule, steps, strength=strength, **options)
    scheduler = diffusers_scheduler(class_name, config, steps)
    noise = draws(2 * steps + 2, seed)
    x0 = np.random.default_rng(seed + 100).standard_normal(SHAPE_NCHW).astype(np.float32)
    if strength < 1.0:
        timesteps, run = img2img_timesteps(scheduler, steps, strength)
        assert plan.steps == run, f"{class_name}: {plan.steps} steps run, diffusers {run}"
        start = scheduler.add_noise(torch.from_numpy(x0), torch.from_numpy(noise[0]), timesteps[:1])
        ours_start = plan.noised_latents(nhwc(x0), nhwc(noise[0]))
    else:
        timesteps = None
        start = torch.from_numpy(noise[0]) * scheduler.init_noise_sigma
        ours_start = plan.initial_latents(nhwc(noise[0]))
    what = f"{class_name} {prediction} {steps} steps {config} strength {strength}"
    assert_close(np.array(plan.to_reference(ours_start, 0)).transpose(0, 3, 1, 2), start, TOL, f"{what} start")
    ours = run_ours(plan, ours_start, ReplayNoise(noise[1:]))
    ref = run_diffusers(scheduler, start, noise[1:], timesteps=timesteps, **(step_kwargs or {}))

    def reference64():
        # the same loop on float64 latents (the scheduler's scalars stay float32) measures its own rounding; Euler
        # and Euler a cast latents to float32 inside `step`, so their float64 run is k-diffusion's identical function
        if class_name in _K_DIFFUSION_TWINS and strength == 1.0:
            replay = IIDReplay(as_float64(noise[1:])) if "Ancestral" in class_name else None
            return run_k_diffusion(
                _K_DIFFUSION_TWINS[class_name],
                prediction,
                schedule.alphas_cumprod,
                plan.sigmas,
                start.double().numpy(),
                replay,
                dtype=torch.float64,
                timesteps=plan.timesteps,
            )
        scheduler = diffusers_scheduler(class_name, config, steps)
        ts = img2img_timesteps(scheduler, steps, strength)[0] if strength < 1.0 else None
        return run_diffusers(scheduler, start.double(), as_float64(noise[1:]), timesteps=ts, **(step_kwargs or {}))

    return _compare(ours, ref, what, reference64)


_K_DIFFUSION_TWINS = {
    "EulerDiscreteScheduler": "sample_euler",
    "EulerAncestralDiscreteScheduler": "sample_euler_ancestral",
}


SPACINGS = ("leading", "trailing", "linspace")
VE_CLASSES = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
              "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler",
              "DPMSolverSDEScheduler")  # fmt: skip
VP_CLASSES = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
              "UniPCMultistepScheduler", "LCMScheduler")  # fmt: skip


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("class_name", VE_CLASSES + VP_CLASSES)
def test_diffusers_scheduler_parity(class_name, prediction, spacing):
    for steps in STEPS:
        _d_parity(class_name, prediction, steps, {"timestep_spacing": spacing})


KARRAS_CLASSES = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "KDPM2DiscreteScheduler",
                  "KDPM2AncestralDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverSDEScheduler",
                  "DPMSolverMultistepScheduler", "UniPCMultistepScheduler")  # fmt: skip


@pytest.mark.parametrize("flag", ["use_karras_sigmas", "use_exponential_sigmas"])
@pytest.mark.parametrize("class_name", KARRAS_CLASSES)
def test_diffusers_karras_and_exponential_sigmas(class_name, flag):
    for prediction in PREDICTIONS:
        for steps in (1, 4, 10, 25):
            _d_parity(class_name, prediction, steps, {flag: True})


DIFFUSERS_VARIANTS = [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("DPMSolverMultistepScheduler", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"solver_order": 3}),
    ("UniPCMultistepScheduler", {"solver_order": 1}),
    ("UniPCMultistepScheduler", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("UniPCMultistepScheduler", {"disable_corrector": [0, 2]}),
    ("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}),
    ("DDIMScheduler", {"set_alpha_to_one": True}),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": 1.5}),
    ("DDPMScheduler", {"clip_sample": True}),
    ("PNDMScheduler", {"set_alpha_to_one": True}),
    ("LCMScheduler", {"original_inference_steps": 40, "timestep_scaling": 5.0}),
]


@pytest.mark.parametrize("class_name,config", DIFFUSERS_VARIANTS, ids=lambda v: str(v))
def test_diffusers_scheduler_variants(class_name, config):
    for prediction in PREDICTIONS:
        for steps in (1, 3, 10, 25):
            _d_parity(class_name, prediction, steps, config)


def test_ddim_eta_matches_diffusers():
    for spacing in SPACINGS:
        for steps in (1, 3, 10):
            _d_parity("DDIMScheduler", "v_prediction", steps, {"timestep_spacing": spacing}, step_kwargs={"eta": 0.7},
                      eta=0.7)  # fmt: skip


@pytest.mark.parametrize("class_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "DDPMScheduler",
                                        "UniPCMultistepScheduler", "EulerAncestralDiscreteScheduler", "DDIMScheduler",
                                        "LCMScheduler"])  # fmt: skip
def test_zero_terminal_snr_matches_diffusers(class_name):
    """Trailing spacing with rescaled betas: sigma(999) is 4096 (diffusers' alpha_bar = 2^-24) or, for DDIM, DDPM and
    LCM, which keep alpha_bar = 0, 2^32 standing in for infinity."""
    for steps in (1, 4, 10):
        _d_parity(class_name, "v_prediction", steps, {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True})


@pytest.mark.parametrize("strength", [0.1, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("class_name", VE_CLASSES + VP_CLASSES)
def test_img2img_matches_diffusers(class_name, strength):
    """Which steps run, how many, the noised start latent, and every step after it."""
    for spacing in ("leading", "linspace"):
        for prediction in PREDICTIONS:
            _d_parity(class_name, prediction, 10, {"timestep_spacing": spacing}, strength=strength)


# --- a tiny random-weight UNet as the model ------------------------------------------------------------------


@functools.cache
def _unet_pair():
    """The diffusers UNet (torch, NCHW) and ours (NHWC) with the same random weights, as model functions."""
    from test_models import load_ours, reference_unet

    from mlx_sd_convert.diffusers import convert_weights, unet_config
    from oracles import state_dict_numpy

    ref = reference_unet("sd1", seed=1)
    cfg = unet_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("unet", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(3)
    context = torch.randn(1, 7, cfg.cross_attention_dim, generator=g)
    ctx = mx.array(context.numpy())

    def torch_unet(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)[:1]
        with torch.no_grad():
            return ref(x.float(), t, encoder_hidden_states=context).sample.to(x.dtype)

    def mlx_unet(x, t):
        return ours(x, mx.array([t], dtype=mx.float32), ctx)

    return torch_unet, mlx_unet


UNET_SHAPE = (1, 4, 16, 16)
UNET_CASES = [  # (sampler, follow, prediction, steps, scheduler_config)
    ("DPM++ 2M Karras", "a1111", "epsilon", 4, {}),
    ("Euler a", "a1111", "v_prediction", 3, {}),
    ("DPM++ SDE", "a1111", "epsilon", 2, {}),
    ("EulerDiscreteScheduler", "diffusers", "epsilon", 4, {"timestep_spacing": "leading"}),
    ("DPMSolverMultistepScheduler", "diffusers", "epsilon", 4, {"use_karras_sigmas": True}),
    ("DDIMScheduler", "diffusers", "v_prediction", 4, {}),
    ("PNDMScheduler", "diffusers", "epsilon", 4, {}),
    ("UniPCMultistepScheduler", "diffusers", "epsilon", 4, {}),
    ("LCMScheduler", "diffusers", "epsilon", 3, {}),
    ("KDPM2DiscreteScheduler", "diffusers", "v_prediction", 3, {"use_karras_sigmas": True}),
    ("HeunDiscreteScheduler", "diffusers", "epsilon", 3, {"timestep_spacing": "linspace"}),
]


@pytest.fixture
def one_torch_thread():
    # a tiny UNet runs 30x slower on two contended threads than on one (measured on the 2-core CI machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name,follow,prediction,steps,extra", UNET_CASES, ids=[c[0] for c in UNET_CASES])
def test_samplers_with_a_random_unet(name, follow, prediction, steps, extra, one_torch_thread):
    """Layout-sensitive (NHWC vs NCHW) and with the timesteps fed to a real timestep embedding."""
    from sampling_refs import run_diffusers, run_ours

    torch_unet, mlx_unet = _unet_pair()
    config = {**SD_CONFIG, "prediction_type": prediction, **extra}
    schedule = NoiseSchedule.from_config(config)
    plan = plan_sampling(name, schedule, steps)
    noise = draws(2 * steps + 2, 5, UNET_SHAPE)
    ours = run_ours(plan, plan.initial_latents(nhwc(noise[0])), ReplayNoise(noise[1:]), model=mlx_unet)
    if follow == "a1111":
        import sampling_refs

        function, ref_kwargs, kind = K_DIFFUSION[plan.sampler.name]
        replay = {"iid": IIDReplay, "brownian": BrownianReplay, None: lambda _: None}[kind](noise[1:])
        saved, sampling_refs.torch_model = sampling_refs.torch_model, torch_unet
        try:
            ref = run_k_diffusion(function, prediction, schedule.alphas_cumprod, plan.sigmas,
                                  noise[0] * plan.init_noise_sigma, replay, **ref_kwargs)  # fmt: skip
        finally:
            sampling_refs.torch_model = saved
    else:
        scheduler = diffusers_scheduler(name, config, steps)
        start = torch.from_numpy(noise[0]) * scheduler.init_noise_sigma
        ref = run_diffusers(scheduler, start, noise[1:], model=torch_unet)
    err = _compare(ours, ref, f"UNet {name} {prediction} {steps} steps")
    print(f"UNet {name} ({follow}) {prediction}, {steps} steps: worst step {err:.2e}")


# --- names, options and bad input ----------------------------------------------------------------------------


def test_names_resolve_as_a1111_and_diffusers_do():
    schedule = NoiseSchedule.for_family("sd1")
    legacy = plan_sampling("DPM++ 2M Karras", schedule, 10)
    assert (legacy.sampler.name, legacy.schedule_label) == ("DPM++ 2M", "Karras")
    assert plan_sampling("dpm++ 2m sde exponential", schedule, 10).schedule_label == "Exponential"
    assert plan_sampling("k_euler_a", schedule, 10).sampler.name == "Euler a"
    assert plan_sampling("DPM++ 2M", schedule, 10).schedule_label == "Karras"  # A1111's "Automatic"
    assert plan_sampling("Euler", schedule, 10, schedule_type="SGMUniform").schedule_label == "SGM Uniform"
    as_diffusers = plan_sampling("DPM++ 2M SDE Karras", schedule, 10, follow="diffusers")
    assert as_diffusers.follows == "diffusers DPMSolverMultistepScheduler"
    assert as_diffusers.sampler.name == "DPM++ 2M SDE" and as_diffusers.schedule_label == "Karras"
    assert plan_sampling("DDIM", schedule, 10).follows == "diffusers DDIMScheduler"  # no k-diffusion function
    assert plan_sampling("EulerDiscreteScheduler", schedule, 10).follows == "diffusers EulerDiscreteScheduler"
    assert plan_sampling("PNDM", schedule, 10).sampler.name == "PLMS"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(sampler="DPM++ 2M Karas"),
            r"unknown sampler 'DPM\+\+ 2M Karas'; did you mean 'DPM\+\+ 2M Karras'.*Valid samplers: Euler a, ",
        ),
        (dict(sampler="Eulr a"), r"did you mean 'Euler a'"),
        (dict(steps=0), r"steps must be a whole number >= 1, got 0"),
        (dict(steps=2.5), r"steps must be a whole number >= 1"),
        (dict(strength=1.5), r"strength must be in \[0, 1\], got 1.5"),
        (dict(strength=-0.1), r"strength must be in \[0, 1\]"),
        (dict(strength=0.05), r"runs int\(10 \* 0.05\) = 0 denoising steps; raise strength to at least 0.1"),
        (dict(schedule_type="Karrass"), r"unknown schedule type 'Karrass'; choose one of \['Automatic', 'Uniform'"),
        (dict(sampler="DPM++ 2M Karras", schedule_type="Exponential"), r"names schedule type 'Karras' but"),
        (dict(sampler="Euler a", follow="diffusers", schedule_type="Karras"), r"has no counterpart in diffusers"),
        (dict(sampler="DPM++ 2S a", follow="diffusers"), r"has no diffusers scheduler; use follow='a1111'"),
        (dict(follow="comfy"), r"follow must be one of \('a1111', 'diffusers'\)"),
        (dict(sampler="EulerDiscreteScheduler", follow="a1111"), r"is a diffusers scheduler"),
        (dict(eta=0.5), r"sampler 'Euler' has no option \['eta'\]; its options: \['s_churn'"),
        (dict(follow="diffusers", scheduler_config={"thresholding": True}), r"has no setting \['thresholding'\]"),
        (dict(sampler="DDIM", scheduler_config={"thresholding": True}), r"thresholding=True is not supported"),
        (dict(sampler="DDIM", steps=1001), r"steps \(1001\) cannot exceed the model's 1000 training steps"),
        (dict(sampler="LCM", steps=51), r"LCM runs at most original_inference_steps=50 steps, got 51"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    kwargs = {"sampler": "Euler", "steps": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        plan_sampling(kwargs.pop("sampler"), NoiseSchedule.for_family("sd1"), kwargs.pop("steps"), **kwargs)


def test_prediction_types_the_reference_rejects():
    sample = NoiseSchedule.for_family("sd1", prediction_type="sample")
    with pytest.raises(ValueError, match=r"EulerAncestralDiscreteScheduler cannot run a model with prediction_type="):
        plan_sampling("Euler a", sample, 10, follow="diffusers")
    plan_sampling("Euler", sample, 10, follow="diffusers")  # diffusers' Euler takes x0 predictions
    with pytest.raises(ValueError, match=r"prediction_type 'flow_prediction' is not supported"):
        NoiseSchedule.for_family("sd1", prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=r"unknown model family 'sd4'"):
        NoiseSchedule.for_family("sd4")


def test_stochastic_samplers_need_a_noise_source():
    plan = plan_sampling("Euler a", NoiseSchedule.for_family("sd1"), 3)
    with pytest.raises(ValueError, match=r"stochastic: pass a noise source"):
        next(plan.sample(lambda x, t: x, mx.zeros((1, 4, 4, 4))))


def test_send_replaces_the_latent_and_keeps_history():
    """Inpainting: a value sent back replaces x for the next step (diffusers blends after every step)."""
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    plan = plan_sampling("DPM++ 2M", schedule, 5)
    from sampling_refs import mlx_model

    x = plan.initial_latents(nhwc(draws(1)[0]))
    plain = list(plan.sample(mlx_model, x))
    gen = plan.sample(mlx_model, x)
    first = next(gen)
    replaced = [first, gen.send(first * 0.5)] + list(gen)
    manual = plan_sampling("DPM++ 2M", schedule, 5)
    assert np.allclose(np.array(first), np.array(plain[0]))
    assert not np.allclose(np.array(replaced[1]), np.array(plain[1]))
    assert len(replaced) == len(plain) == manual.steps


def test_cli_lists_the_samplers(capsys):
    import json

    from mlx_sd_apps.cli import main

    assert main(["samplers", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in listing["samplers"]] == list(SAMPLERS)
    assert {"name": "karras", "label": "Karras", "aliases": []} in listing["schedule_types"]
    assert main(["samplers"]) == 0 and "DPM++ 2M SDE" in capsys.readouterr().out


def test_unipc_bh1_to_sigma_zero_where_diffusers_gives_nan():
    """diffusers' UniPC "bh1" multiplies B(h) = -inf by 0 on its last step to sigma 0 and returns NaN; ours takes
    the first-order step there (x = x0 estimate). Every earlier step matches."""
    from sampling_refs import run_diffusers, run_ours

    config = {**SD_CONFIG, "solver_type": "bh1"}
    plan = plan_sampling("UniPCMultistepScheduler", NoiseSchedule.from_config(config), 6)
    noise = draws(2)
    ours = run_ours(plan, plan.initial_latents(nhwc(noise[0])), None)
    ref = run_diffusers(diffusers_scheduler("UniPCMultistepScheduler", config, 6), torch.from_numpy(noise[0]), [])
    assert np.isnan(ref[-1]).all() and np.isfinite(ours[-1]).all()
    _compare(ours[:-1], ref[:-1], "UniPC bh1")
