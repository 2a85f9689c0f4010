"""Noise schedules and sigma tables against the references.

- the training tables (alphas_cumprod, sigma) of the SD 1.5, SD 2.1-v and SDXL scheduler configs equal diffusers';
- for every diffusers scheduler built from those configs (as users swap schedulers with `from_config`), the sigmas,
  the timesteps the model is given and the initial noise scale equal the scheduler's, for every step count;
- A1111's schedule types equal k-diffusion's functions (Karras, exponential, ...) or A1111's formulas restated
  over k-diffusion's `DiscreteSchedule` primitives (SGM uniform, normal, simple, DDIM, KL optimal);
- sigma <-> t equals diffusers' `_sigma_to_t` and k-diffusion's `sigma_to_t`;
- our table of diffusers' constructor defaults equals the installed diffusers'.
"""

from __future__ import annotations

import inspect
import math

import diffusers
import mlx.core as mx
import numpy as np
import pytest
import torch
from sampling_refs import ReplayNoise, diffusers_scheduler, img2img_timesteps, k_diffusion_denoiser

from mlx_sd.samplers import SAMPLERS, brownian_pair, plan_sampling
from mlx_sd.samplers.as_diffusers import DIFFUSERS_DEFAULTS
from mlx_sd.schedules import FAMILY_SCHEDULER_CONFIGS, FLOW_SCHEDULER, NoiseSchedule, img2img_steps, karras_sigmas
from oracles import k_diffusion_sampling

FAMILIES = ("sd1", "sd2-v", "sdxl")  # SD 1.5 (PNDM), SD 2.1 768 (DDIM, v), SDXL (Euler, leading)
STEPS = (1, 2, 4, 10, 25, 50)
SIGMA_RTOL = 3e-7  # one float32 ulp: torch's float32 sqrt is not correctly rounded


@pytest.mark.parametrize("family", FAMILIES)
def test_training_tables_equal_diffusers(family):
    config = FAMILY_SCHEDULER_CONFIGS[family]
    ours = NoiseSchedule.for_family(family)
    ref = getattr(diffusers, config["_class_name"]).from_config(config)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    np.testing.assert_allclose(ours.sigmas, ((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt(), rtol=SIGMA_RTOL)
    assert ours.prediction_type == config.get("prediction_type", "epsilon")


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2", "zero_snr"])
def test_other_training_tables_equal_diffusers(schedule):
    config = {"beta_schedule": schedule}
    if schedule == "zero_snr":
        config = {**FAMILY_SCHEDULER_CONFIGS["sd1"], "rescale_betas_zero_snr": True}
    ref = diffusers.EulerDiscreteScheduler.from_config(config).alphas_cumprod.numpy()
    # zero-SNR rescaling takes float32 square roots, where torch and numpy round differently in the last bit
    np.testing.assert_allclose(NoiseSchedule.from_config(config).alphas_cumprod, ref, rtol=1e-5, atol=1e-12)


def test_a1111_table_equals_ldm():
    """A1111 (ldm) computes alphas_cumprod in float64 and stores float32; ours follows diffusers' float32 cumprod.
    They agree to float32 rounding."""
    from ldm.modules.diffusionmodules.util import make_beta_schedule

    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)  # ldm's "linear" is linear in sqrt(beta)
    ldm = np.cumprod(1 - betas).astype(np.float32)
    np.testing.assert_allclose(NoiseSchedule.for_family("sd1").alphas_cumprod, ldm, rtol=2e-6)


# --- diffusers' sigmas and timesteps -------------------------------------------------------------------------


def _reference_levels(scheduler):
    """A diffusers scheduler's main noise levels (with the final one) and the timesteps of their model calls."""
    name = type(scheduler).__name__
    sigmas = scheduler.sigmas.numpy().astype(np.float64) if hasattr(scheduler, "sigmas") else None
    ts = scheduler.timesteps.numpy().astype(np.float64)
    if name in ("HeunDiscreteScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
                "KDPM2AncestralDiscreteScheduler"):  # fmt: skip
        sigmas = np.concatenate([sigmas[:1], sigmas[1:-1][::2]] + ([sigmas[-1:]] if name[0] in "HD" else []))
        ts = ts[::2] if name != "HeunDiscreteScheduler" else np.concatenate([ts[:1], ts[1::2]])
    if name in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LCMScheduler"):
        table = ((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod).sqrt().numpy()
        if name == "PNDMScheduler" and len(ts) > 1:
            ts = np.concatenate([ts[:1], ts[2:]])  # the repeated call belongs to the first step
        sigmas = table[ts.astype(int)]
    return sigmas, ts


CLASSES = sorted(set(DIFFUSERS_DEFAULTS) - {FLOW_SCHEDULER})  # the diffusion models' (flow: below)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("class_name", CLASSES)
def test_diffusers_sigmas_and_timesteps(family, class_name):
    config = FAMILY_SCHEDULER_CONFIGS[family]
    schedule = NoiseSchedule.for_family(family)
    flags = [{}] + [
        {f: True} for f in ("use_karras_sigmas", "use_exponential_sigmas") if f in DIFFUSERS_DEFAULTS[class_name]
    ]
    for extra in flags:
        for steps in STEPS:
            if class_name == "LCMScheduler" and steps > 50:
                continue
            scheduler = diffusers_scheduler(class_name, {**config, **extra}, steps)
            plan = plan_sampling(class_name, schedule, steps, scheduler_config=extra)
            sigmas, ts = _reference_levels(scheduler)
            what = f"{class_name} {family} {extra} {steps} steps"
            ours_t = [plan.timesteps[s] for s in plan.sigmas[:-1]]
            np.testing.assert_allclose(ours_t, ts[: len(ours_t)], atol=2e-3, rtol=0, err_msg=what)
            n = len(sigmas) if len(sigmas) == len(plan.sigmas) else len(plan.sigmas) - 1
            np.testing.assert_allclose(plan.sigmas[:n], sigmas[:n], rtol=SIGMA_RTOL, err_msg=what)
            if plan.latent_space == "ve":
                assert math.isclose(plan.init_noise_sigma, float(scheduler.init_noise_sigma), rel_tol=1e-6), what
            else:
                assert float(scheduler.init_noise_sigma) == 1.0
                assert math.isclose(plan.init_noise_sigma, math.sqrt(1 + plan.sigmas[0] ** 2)), what


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_sigmas_and_timesteps(shift):
    """SD3's FlowMatchEulerDiscreteScheduler: its training table, and the levels and timesteps of `steps` steps,
    by follow="diffusers" and by A1111's "Euler" with the flow default ("Normal" = ComfyUI's normal), exactly."""
    config = {"_class_name": FLOW_SCHEDULER, "num_train_timesteps": 1000, "shift": shift}
    schedule = NoiseSchedule.from_config(config)
    fresh = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    np.testing.assert_array_equal(schedule.sigmas, fresh.sigmas.numpy()[::-1])
    for steps in STEPS:
        scheduler = diffusers_scheduler(FLOW_SCHEDULER, config, steps)
        for plan in (
            plan_sampling("Euler", schedule, steps, follow="diffusers"),
            plan_sampling("Euler", schedule, steps),
        ):
            np.testing.assert_array_equal(plan.sigmas, scheduler.sigmas.numpy(), err_msg=f"{steps} steps")
            ours_t = [plan.denoiser(None).sigma_to_t(s) for s in plan.sigmas[:-1]]
            np.testing.assert_allclose(ours_t, scheduler.timesteps.numpy(), rtol=1e-6, err_msg=f"{steps} steps")
            assert plan.init_noise_sigma == 1.0


def test_flow_match_euler_steps_and_img2img_noise_as_diffusers():
    """Euler on a rectified-flow model steps as FlowMatchEulerDiscreteScheduler.step; img2img noises as its
    scale_noise; the samplers and schedule types that do not apply to flow are refused by name."""
    config = {"_class_name": FLOW_SCHEDULER, "num_train_timesteps": 1000, "shift": 3.0}
    schedule = NoiseSchedule.from_config(config)
    scheduler = diffusers_scheduler(FLOW_SCHEDULER, config, 6)
    velocity = lambda x, t: mx.sin(x * 0.7 + t / 500.0)  # noqa: E731  a smooth stand-in network
    x0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    ref = x0.clone()
    for t in scheduler.timesteps:
        v = torch.from_numpy(np.array(velocity(mx.array(ref.numpy()), float(t))))
        ref = scheduler.step(v, t, ref).prev_sample
    plan = plan_sampling("Euler", schedule, 6)
    *_, x = plan.sample(velocity, mx.array(x0.numpy()))
    np.testing.assert_allclose(np.array(x), ref.numpy(), atol=2e-5)
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    strength_plan = plan_sampling("Euler", schedule, 6, strength=0.5)
    noised = scheduler.scale_noise(x0, torch.tensor([strength_plan.sigmas[0] * 1000]), noise)
    ours = strength_plan.noised_latents(mx.array(x0.numpy()), mx.array(noise.numpy()))
    np.testing.assert_allclose(np.array(ours), noised.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match="does not run rectified-flow"):
        plan_sampling("DDIM", schedule, 6)
    with pytest.raises(ValueError, match="Uniform"):
        plan_sampling("Euler", schedule, 6, schedule_type="Uniform")
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        plan_sampling("DPM++ 2M", schedule, 6, follow="diffusers")
    with pytest.raises(ValueError, match="diffusion model"):
        plan_sampling(FLOW_SCHEDULER, NoiseSchedule.for_family("sd1"), 6)


def test_diffusers_defaults_table_equals_installed_diffusers():
    for class_name, defaults in DIFFUSERS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        for key, value in defaults.items():
            assert key in params, f"{class_name} has no parameter {key}"
            assert params[key].default == value, f"{class_name}.{key}: {params[key].default!r} != {value!r}"


# --- A1111's sigmas (k-diffusion) ----------------------------------------------------------------------------


def _k_schedule():
    return k_diffusion_denoiser(lambda x, t: x, NoiseSchedule.for_family("sd1").alphas_cumprod, "epsilon")


def _a1111_reference(name, n):
    """A1111's sd_schedulers.py functions: k-diffusion's own where A1111 calls them, the others restated over
    k-diffusion's DiscreteSchedule (sigma_to_t, t_to_sigma, sigmas)."""
    K, m = k_diffusion_sampling(), _k_schedule()
    s_min, s_max = m.sigmas[0].item(), m.sigmas[-1].item()
    zero = [0.0]
    if name == "Uniform":
        return m.get_sigmas(n)
    if name == "Karras":
        return K.get_sigmas_karras(n, s_min, s_max)
    if name == "Exponential":
        return K.get_sigmas_exponential(n, s_min, s_max)
    if name == "Polyexponential":
        return K.get_sigmas_polyexponential(n, s_min, s_max)
    start, end = m.sigma_to_t(torch.tensor(s_max)), m.sigma_to_t(torch.tensor(s_min))
    if name == "SGM Uniform":
        return torch.tensor([m.t_to_sigma(t).item() for t in torch.linspace(start, end, n + 1)[:-1]] + zero)
    if name == "Normal":
        return torch.tensor([m.t_to_sigma(t).item() for t in torch.linspace(start, end, n)] + zero)
    if name == "Simple":
        ss = len(m.sigmas) / n
        return torch.tensor([float(m.sigmas[-(1 + int(x * ss))]) for x in range(n)] + zero)
    if name == "DDIM":
        ss, x, sigs = max(len(m.sigmas) // n, 1), 1, []
        while x < len(m.sigmas):
            sigs.append(float(m.sigmas[x]))
            x += ss
        return torch.tensor(sigs[::-1] + zero)
    if name == "KL Optimal":
        a_min, a_max = torch.arctan(torch.tensor(s_min)), torch.arctan(torch.tensor(s_max))
        i = torch.arange(n + 1)
        return torch.tan(i / n * a_min + (1.0 - i / n) * a_max)
    raise AssertionError(name)


SCHEDULE_TYPES = ("Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "Normal", "Simple", "DDIM",
                  "KL Optimal")  # fmt: skip


@pytest.mark.parametrize("schedule_type", SCHEDULE_TYPES)
def test_a1111_schedule_types_equal_reference(schedule_type):
    schedule = NoiseSchedule.for_family("sd1")
    for steps in STEPS + (3, 30):
        plan = plan_sampling("Euler", schedule, steps, schedule_type=schedule_type)
        ref = _a1111_reference(schedule_type, steps).numpy()
        np.testing.assert_allclose(plan.sigmas, ref, rtol=2e-6, atol=1e-7, err_msg=f"{schedule_type} {steps}")


def test_a1111_defaults_and_discarded_penultimate_sigma():
    """A1111 1.9+: "Automatic" is Karras for DPM++ 2M/SDE/2S a and DPM2 (a), exponential for the 2M/3M SDEs, and
    DPM2/DPM2 a/3M SDE compute steps + 1 sigmas and drop the next-to-last."""
    K, schedule = k_diffusion_sampling(), NoiseSchedule.for_family("sdxl")
    smin, smax = schedule.sigma_min, schedule.sigma_max
    karras, exponential = K.get_sigmas_karras, K.get_sigmas_exponential
    for name, fn, discard in [("DPM++ 2M", karras, False), ("DPM2", karras, True), ("DPM2 a", karras, True),
                              ("DPM++ 2M SDE", exponential, False), ("DPM++ 3M SDE", exponential, True),
                              ("DPM++ SDE", karras, False), ("DPM++ 2S a", karras, False)]:  # fmt: skip
        for steps in (1, 5, 20):
            ref = fn(steps + 1 if discard else steps, smin, smax)
            ref = torch.cat([ref[:-2], ref[-1:]]) if discard else ref
            np.testing.assert_allclose(plan_sampling(name, schedule, steps).sigmas, ref, rtol=2e-6, err_msg=name)


def test_a1111_img2img_runs_the_diffusers_number_of_steps():
    """For every sampler: the last int(steps * strength) steps of the full schedule run (diffusers' get_timesteps),
    from x0 + sigma * noise at the first of them."""
    schedule = NoiseSchedule.for_family("sd1")
    for name in SAMPLERS:
        for strength in (0.1, 0.5, 0.75, 1.0):
            for steps in (10, 30):
                full = plan_sampling(name, schedule, steps)
                plan = plan_sampling(name, schedule, steps, strength=strength)
                _, run = img2img_timesteps(diffusers_scheduler("EulerDiscreteScheduler", {}, steps), steps, strength)
                assert plan.steps == run == img2img_steps(steps, strength), (name, strength)
                if name != "PLMS":  # PNDM's img2img slices its call list, one level earlier (see test_samplers)
                    assert plan.sigmas == full.sigmas[full.steps - run :], (name, strength)


# --- sigma <-> t ---------------------------------------------------------------------------------------------


def test_sigma_to_t_equals_references():
    schedule = NoiseSchedule.for_family("sd1")
    sigmas = np.concatenate([np.geomspace(0.01, 20, 300), schedule.sigmas[::37].astype(np.float64)])
    euler = diffusers.EulerDiscreteScheduler.from_config(FAMILY_SCHEDULER_CONFIGS["sd1"])
    log_sigmas = np.log(np.array(((1 - euler.alphas_cumprod) / euler.alphas_cumprod) ** 0.5))
    ref = np.array([euler._sigma_to_t(s, log_sigmas) for s in sigmas])
    np.testing.assert_allclose(schedule.sigma_to_t(sigmas), ref, atol=2e-3)
    k = _k_schedule().sigma_to_t(torch.tensor(sigmas, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(schedule.sigma_to_t(sigmas), k, atol=2e-2)  # k-diffusion computes in float32
    t = np.linspace(0, 999, 777)
    np.testing.assert_allclose(schedule.t_to_sigma(t), _k_schedule().t_to_sigma(torch.tensor(t)).numpy(), rtol=1e-6)


# --- noise ---------------------------------------------------------------------------------------------------


def test_brownian_pair_has_the_brownian_tree_statistics():
    """DPM++ SDE's two draws per step are correlated as k-diffusion's BrownianTreeNoiseSampler makes them."""
    sigma, sigma_mid, sigma_next = 3.0, 1.2, 0.5
    x = torch.zeros(1, 200_000, dtype=torch.float64)
    tree = k_diffusion_sampling().BrownianTreeNoiseSampler(x, sigma_next, sigma, seed=0)
    a, b = tree(sigma, sigma_mid), tree(sigma, sigma_next)
    expected = math.sqrt((sigma - sigma_mid) / (sigma - sigma_next))
    assert abs(float(torch.corrcoef(torch.cat([a, b]))[0, 1]) - expected) < 0.01
    rng = np.random.default_rng(0)
    import mlx.core as mx

    z = ReplayNoise([rng.standard_normal((1, 200_000)).astype(np.float32) for _ in range(2)])
    ours = brownian_pair(z, mx.zeros((1, 200_000)), sigma, sigma_mid, sigma_next)
    got = np.corrcoef(np.array(ours[0]).ravel(), np.array(ours[1]).ravel())[0, 1]
    assert abs(got - expected) < 0.01 and abs(float(np.array(ours[1]).std()) - 1) < 0.01


def test_karras_sigmas_equal_k_diffusion():
    ref = k_diffusion_sampling().get_sigmas_karras(17, 0.03, 14.6, rho=5.0).numpy()[:-1]
    np.testing.assert_allclose(karras_sigmas(17, 0.03, 14.6, rho=5.0), ref, rtol=1e-6)
