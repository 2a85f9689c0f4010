"""Stochastic samplers on rectified-flow models (SD3) against ComfyUI's arithmetic for its CONST models.

ComfyUI is not installable here, so the references below are a transcription in torch of comfy/k_diffusion/
sampling.py's flow code: `sample_euler_ancestral_RF`, `sample_dpm_2_ancestral_RF`, `sample_dpmpp_2s_ancestral_RF`, and
`sample_dpmpp_sde`, `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde` as they run a CONST model (half-logSNR
`sigma.logit().neg()`, `offset_first_sigma_for_snr` with `ModelSamplingDiscreteFlow.percent_to_sigma`), in float32
tensors as ComfyUI holds sigmas. Both sides get one velocity model (`sampling_refs.analytic_model`; the CONST denoiser
x - v sigma at timestep 1000 sigma) and the same noise: per-image torch generators (seeds 11, 12; our
`PerImageNoise` of `TorchCPUNoise`) for the ancestral samplers, k-diffusion's `BrownianTreeNoiseSampler` with those
seeds (ComfyUI's, bit for bit: tests/test_brownian.py) over the flow sigmas for the SDE samplers. Every latent after
every step must agree to 1e-5 of the reference's range.
"""

from __future__ import annotations

import math
import re

import mlx.core as mx
import numpy as np
import pytest
import torch
from sampling_refs import BrownianReplay, IIDReplay, ReplayNoise, draws, nhwc, run_ours, torch_model
from test_samplers import TOL, _compare

from mlx_sd.rng import PerImageNoise, TorchCPUNoise
from mlx_sd.samplers import FLOW_SAMPLERS, SAMPLERS, plan_sampling
from mlx_sd.samplers.registry import check_flow_sampler
from mlx_sd.schedules import FLOW_SCHEDULER, NoiseSchedule
from oracles import assert_close, k_diffusion_sampling

# torchsde warns when a float32 sigma lies just outside its tree, whose ends are rounded to 6 decimals (it clamps)
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
SHAPE = (2, 4, 5, 7)  # NCHW: a batch of two images, each with its own noise
SEEDS = (11, 12)


def flow_schedule(shift: float = 3.0) -> NoiseSchedule:
    return NoiseSchedule.from_config({"_class_name": FLOW_SCHEDULER, "num_train_timesteps": 1000, "shift": shift})


# --- ComfyUI's flow samplers, transcribed ------------------------------------------------------------------------


def const_model(x: torch.Tensor, sigma) -> torch.Tensor:
    """ComfyUI's CONST `calculate_denoised` on a velocity model fed timestep 1000 sigma (ModelSamplingDiscreteFlow)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    return x - torch_model(x, sigma * 1000) * sigma


def time_snr_shift(shift, t):
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def offset_first_sigma_for_snr(sigmas, shift, percent_offset=1e-4):
    if len(sigmas) <= 1:
        return sigmas
    if sigmas[0] >= 1:
        sigmas = sigmas.clone()
        # ModelSamplingDiscreteFlow.percent_to_sigma, stored in ComfyUI's float32 sigmas (the float64 run keeps it)
        sigmas[0] = torch.tensor(time_snr_shift(shift, 1.0 - percent_offset), dtype=torch.float32)
    return sigmas


def lambda_const(sigma):  # sigma_to_half_log_snr for CONST
    return sigma.logit().neg()


def sigma_const(half_log_snr):  # half_log_snr_to_sigma for CONST
    return half_log_snr.neg().sigmoid()


def rf_step(sigmas, i, eta):
    """The downstep of ComfyUI's three RF ancestral samplers."""
    downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
    sigma_down = sigmas[i + 1] * downstep_ratio
    alpha_ip1 = 1 - sigmas[i + 1]
    alpha_down = 1 - sigma_down
    renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_ip1, alpha_down, renoise_coeff


def comfy_euler_ancestral_rf(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, **_):
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            sigma_down, alpha_ip1, alpha_down, renoise_coeff = rf_step(sigmas, i, eta)
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
            if eta > 0:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
        out.append(x)
    return out


def comfy_dpm_2_ancestral_rf(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, **_):
    to_d = k_diffusion_sampling().to_d
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, alpha_ip1, alpha_down, renoise_coeff = rf_step(sigmas, i, eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
        out.append(x)
    return out


def comfy_dpmpp_2s_ancestral_rf(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, **_):
    to_d = k_diffusion_sampling().to_d
    sigma_fn = lambda lbda: (lbda.exp() + 1) ** -1  # noqa: E731
    lambda_fn = lambda sigma: ((1 - sigma) / sigma).log()  # noqa: E731
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, alpha_ip1, alpha_down, renoise_coeff = rf_step(sigmas, i, eta)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            if sigmas[i] == 1.0:
                sigma_s = 0.9999
            else:
                t_i, t_down = lambda_fn(sigmas[i]), lambda_fn(sigma_down)
                sigma_s = sigma_fn(t_i + 0.5 * (t_down - t_i))
            sigma_s_i_ratio = sigma_s / sigmas[i]
            u = sigma_s_i_ratio * x + (1 - sigma_s_i_ratio) * denoised
            big_d = model(u, sigma_s)
            sigma_down_i_ratio = sigma_down / sigmas[i]
            x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * big_d
        if sigmas[i + 1] > 0 and eta > 0:
            x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
        out.append(x)
    return out


def comfy_dpmpp_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=0.5, shift=3.0):
    get_ancestral_step = k_diffusion_sampling().get_ancestral_step
    sigmas = offset_first_sigma_for_snr(sigmas, shift)
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_const(sigmas[i]), lambda_const(sigmas[i + 1])
            h = lambda_t - lambda_s
            lambda_s_1 = lambda_s + r * h
            fac = 1 / (2 * r)
            sigma_s_1 = sigma_const(lambda_s_1)
            alpha_s = sigmas[i] * lambda_s.exp()
            alpha_s_1 = sigma_s_1 * lambda_s_1.exp()
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_s_1.neg().exp(), eta)
            h_ = sd.log().neg() - lambda_s
            x_2 = (alpha_s_1 / alpha_s) * (-h_).exp() * x - alpha_s_1 * (-h_).expm1() * denoised
            if eta > 0 and s_noise > 0:
                x_2 = x_2 + alpha_s_1 * noise_sampler(sigmas[i], sigma_s_1) * s_noise * su
            denoised_2 = model(x_2, sigma_s_1)
            sd, su = get_ancestral_step(lambda_s.neg().exp(), lambda_t.neg().exp(), eta)
            h_ = sd.log().neg() - lambda_s
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (alpha_t / alpha_s) * (-h_).exp() * x - alpha_t * (-h_).expm1() * denoised_d
            if eta > 0 and s_noise > 0:
                x = x + alpha_t * noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * su
        out.append(x)
    return out


def comfy_dpmpp_2m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint", shift=3.0):
    sigmas = offset_first_sigma_for_snr(sigmas, shift)
    old_denoised, h, h_last = None, None, None
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_const(sigmas[i]), lambda_const(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
        out.append(x)
    return out


def comfy_dpmpp_3m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, shift=3.0):
    sigmas = offset_first_sigma_for_snr(sigmas, shift)
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    out = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = lambda_const(sigmas[i]), lambda_const(sigmas[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + (alpha_t * phi_2) * d
            if eta > 0 and s_noise > 0:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
        out.append(x)
    return out


# registry name -> (ComfyUI's function as transcribed, its keyword arguments)
COMFY = {
    "Euler a": (comfy_euler_ancestral_rf, {}),
    "DPM2 a": (comfy_dpm_2_ancestral_rf, {}),
    "DPM++ 2S a": (comfy_dpmpp_2s_ancestral_rf, {}),
    "DPM++ SDE": (comfy_dpmpp_sde, {}),
    "DPM++ 2M SDE": (comfy_dpmpp_2m_sde, {}),
    "DPM++ 2M SDE Heun": (comfy_dpmpp_2m_sde, {"solver_type": "heun"}),
    "DPM++ 3M SDE": (comfy_dpmpp_3m_sde, {}),
}
CASES = [(1, "Normal"), (2, "Normal"), (5, "Karras"), (9, "Simple"), (13, "Exponential"), (20, "SGM Uniform"),
         (7, "KL Optimal"), (28, "Normal")]  # fmt: skip


# --- driving both ------------------------------------------------------------------------------------------------


def per_image_draws(seeds=SEEDS, shape=SHAPE):
    """ComfyUI's `default_noise_sampler` with one torch generator per image (A1111's and our per-image noise)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda *_: torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generators])


def no_noise(*_):
    raise AssertionError("no noise is drawn here")


def start(plan, seed=3) -> np.ndarray:
    """The latent at the plan's first level: noise, or an image noised as (1 - sigma) x0 + sigma noise."""
    rng = np.random.default_rng(seed)
    noise, x0 = rng.standard_normal(SHAPE), 0.8 * rng.standard_normal(SHAPE)
    sigma = plan.sigmas[0]
    return ((1 - sigma) * x0 + sigma * noise).astype(np.float32)


def compare(name, steps, schedule_type="Normal", strength=1.0, schedule=None, replayed=None, **options):
    """Our plan against ComfyUI's function on the same sigmas and noise, every step (or, where ComfyUI's float32
    arithmetic is itself off its float64 run by more than TOL, against that run). Noise: per-image torch-cpu sources
    (trees for the SDE samplers), or with `replayed` the given draws, one per step (DPM++ SDE: two, correlated)."""
    schedule = schedule or flow_schedule()
    plan = plan_sampling(name, schedule, steps, schedule_type=schedule_type, strength=strength, **options)
    x = start(plan)
    source = PerImageNoise([TorchCPUNoise(s) for s in SEEDS]) if replayed is None else ReplayNoise(replayed)
    ours = run_ours(plan, nhwc(x), source)
    function, kwargs = COMFY[name]
    tree = None
    if SAMPLERS[name].brownian:
        kwargs = {**kwargs, "shift": schedule.shift}
    if SAMPLERS[name].brownian and replayed is None:
        whole = plan_sampling(name, schedule, steps, schedule_type=schedule_type).sigmas  # the tree spans all of it
        lo, hi = min(s for s in whole if s > 0), max(whole)
        if lo < hi:  # a single step to 0 draws nothing, and a tree needs an interval
            assert plan.noise_interval == (lo, hi) and hi == 1.0
            tree = k_diffusion_sampling().BrownianTreeNoiseSampler(
                torch.from_numpy(x), torch.tensor(np.float32(lo)), torch.tensor(np.float32(hi)), seed=list(SEEDS)
            )
        else:
            assert plan.noise_interval is None

    drawn = []  # the float32 run's noise, which the float64 run replays (its own levels can round to other tree points)

    def reference(dtype):
        if dtype == torch.float64:
            replay = iter(drawn)
            noise = lambda *_: next(replay).double()  # noqa: E731
        else:
            if replayed is not None:
                draw = BrownianReplay(replayed) if name == "DPM++ SDE" else IIDReplay(replayed)
            else:
                draw = (tree or no_noise) if SAMPLERS[name].brownian else per_image_draws()
            noise = lambda *a: drawn.append(draw(*a)) or drawn[-1]  # noqa: E731
        sigmas = torch.tensor(plan.sigmas, dtype=torch.float32).to(dtype)
        return [r.numpy() for r in function(const_model, torch.from_numpy(x).to(dtype), sigmas, noise, **kwargs,
                                            **options)]  # fmt: skip

    assert len(ours) == plan.steps
    what = f"{name} {steps} steps {schedule_type} strength {strength} shift {schedule.shift} {options}"
    worst = _compare(ours, reference(torch.float32), what, lambda: reference(torch.float64))
    print(f"{what}: worst {worst:.2g}")


@pytest.mark.parametrize("eta", [1.0, 0.6])
@pytest.mark.parametrize("steps,schedule_type", CASES)
@pytest.mark.parametrize("name", list(COMFY))
def test_flow_samplers_match_comfyui(name, steps, schedule_type, eta):
    compare(name, steps, schedule_type, eta=eta)


@pytest.mark.parametrize("name", list(COMFY))
def test_flow_samplers_match_comfyui_with_s_noise_img2img_and_shift_1(name):
    compare(name, 10, "Normal", eta=0.8, s_noise=0.9)
    compare(name, 10, "Karras", strength=0.6)  # the tree still spans the whole schedule (A1111's rule)
    compare(name, 6, "Normal", schedule=flow_schedule(1.0))


@pytest.mark.parametrize("name", list(COMFY))
def test_eta_0_needs_no_noise(name):
    """eta 0: the deterministic part alone, and no draws (plan.sample takes no noise source). ComfyUI's DPM2 a RF
    draws with eta 0 too, multiplied by a renoise coefficient that float32 rounds to sqrt(-tiny) = NaN in some
    schedules (5 of 20 tried; not in this one): it gets zeros, and ours draws nothing."""
    schedule = flow_schedule()
    plan = plan_sampling(name, schedule, 8, eta=0.0)
    x = start(plan)
    ours = run_ours(plan, nhwc(x), None)
    function, kwargs = COMFY[name]
    if SAMPLERS[name].brownian:
        kwargs = {**kwargs, "shift": 3.0}
    noise = (lambda *_: torch.zeros(SHAPE)) if name == "DPM2 a" else no_noise
    ref = function(const_model, torch.from_numpy(x), torch.tensor(plan.sigmas, dtype=torch.float32), noise, eta=0.0,
                   **kwargs)  # fmt: skip
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b.numpy(), TOL, f"{name} eta 0, step {i}")


@pytest.mark.parametrize("name", ["DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE"])
def test_sde_samplers_with_a_source_without_seeds_draw_per_step(name):
    """A noise source without seeds (a replay of given draws) grows no tree: one draw per step, or DPM++ SDE's two
    correlated draws, as the UNet path does."""
    compare(name, 7, replayed=draws(14, seed=5, shape=SHAPE))


def test_the_first_level_of_the_sde_samplers_moves_as_comfyuis():
    """ComfyUI evaluates a CONST model's first step of DPM++ SDE / 2M SDE / 3M SDE at percent_to_sigma(1e-4), not 1."""
    seen = []

    def model(x, t):
        seen.append(t)
        return mx.zeros_like(x)

    for shift, expected in ((3.0, 3 * 0.9999 / (1 + 2 * 0.9999)), (1.0, 0.9999)):
        for name in ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 3M SDE", "Euler a"):
            seen.clear()
            plan = plan_sampling(name, flow_schedule(shift), 4)
            *_, out = plan.sample(model, mx.zeros((1, 2, 2, 4)), PerImageNoise([TorchCPUNoise(1)]))
            first = 1.0 if name == "Euler a" else float(np.float32(expected))
            assert seen[0] == pytest.approx(1000 * first, rel=1e-9), (name, shift, seen[0])
            assert plan.sigmas[0] == 1.0


# --- what runs where -----------------------------------------------------------------------------------------------


def test_the_registry_says_what_runs_rectified_flow():
    assert FLOW_SAMPLERS == tuple(s.name for s in SAMPLERS.values() if s.flow is not None)
    assert set(FLOW_SAMPLERS) == {"Euler", "LMS", "Heun", "DPM2", "DPM++ 2M", *COMFY}
    for name in ("Euler", "LMS", "Heun", "DPM2", "DPM++ 2M"):  # the ODE solvers are exact in flow space
        assert SAMPLERS[name].flow is SAMPLERS[name].function
    for name in COMFY:
        assert SAMPLERS[name].flow is not SAMPLERS[name].function
    schedule = flow_schedule()
    plan = plan_sampling("k_dpmpp_2m_sde_heun", schedule, 5)
    assert plan.function is SAMPLERS["DPM++ 2M SDE"].flow and plan.options == {"solver_type": "heun"}
    assert plan.follows == "ComfyUI sample_dpmpp_2m_sde on rectified flow"
    assert plan_sampling("Euler a", NoiseSchedule.for_family("sd1"), 5).function is SAMPLERS["Euler a"].function
    with pytest.raises(ValueError, match=r"has no option \['lower_order_final'\]"):
        plan_sampling("DPM++ 2M SDE", schedule, 5, lower_order_final=True)


@pytest.mark.parametrize("name,entry", [("DDIM", "DDIM"), ("DDPM", "DDPM"), ("PLMS", "PLMS"), ("PNDM", "PLMS"),
                                        ("UniPC", "UniPC"), ("LCM", "LCM"), ("ddim", "DDIM")])  # fmt: skip
def test_samplers_without_a_flow_variant_are_refused_by_name(name, entry):
    listed = re.escape(repr(list(FLOW_SAMPLERS)))
    message = rf"sampler '{entry}' does not run rectified-flow models \(SD3\).*choose one of {listed}"
    with pytest.raises(ValueError, match=message):
        plan_sampling(name, flow_schedule(), 5)
    with pytest.raises(ValueError, match=message):
        check_flow_sampler(SAMPLERS[entry])


def test_flow_ancestral_eta_that_would_overshoot_is_refused():
    """ComfyUI's downstep sigma_next (1 + (sigma_next / sigma - 1) eta) turns negative for a large eta."""
    plan = plan_sampling("Euler a", flow_schedule(), 2, eta=3.0)
    with pytest.raises(ValueError, match=r"eta=3.0 is too large for the step 1 -> 0.008929 .* eta <= 1.01"):
        list(plan.sample(lambda x, t: x, mx.zeros((1, 2, 2, 4)), PerImageNoise([TorchCPUNoise(0)])))


def _sigma_mid_reference(sigma, sigma_next, r=0.5):
    s, t = torch.tensor(sigma, dtype=torch.float32), torch.tensor(sigma_next, dtype=torch.float32)
    lambda_s, lambda_t = lambda_const(s), lambda_const(t)
    return float(sigma_const(lambda_s + r * (lambda_t - lambda_s)))


def test_dpmpp_sde_midpoints_are_comfyuis_float32_numbers():
    """The Brownian tree rounds its query points to 6 decimals, so DPM++ SDE's midpoint must be torch's float32
    number. Ours takes torch's float32 steps, each log and exp rounded once: torch's float32 log is not always
    correctly rounded (1 ulp off at some arguments, and its kernels differ between CPUs), so nearly all midpoints
    agree to the bit and all but a few in 10^4 give the same tree point; float64 arithmetic rounded at the end would
    agree in half of them and move ~1% of the tree points."""
    from mlx_sd.samplers.flow import _sde_midpoint, offset_first_sigma

    schedule = flow_schedule()
    points = []
    for steps in range(2, 41):
        for stype in ("Normal", "Karras", "Exponential", "Simple"):
            sigmas = offset_first_sigma(
                schedule, plan_sampling("DPM++ SDE", schedule, steps, schedule_type=stype).sigmas
            )
            points += list(zip(sigmas, sigmas[1:-1]))
    ours = np.array([_sde_midpoint(a, b, 0.5) for a, b in points])
    ref = np.array([_sigma_mid_reference(a, b) for a, b in points])
    float64 = np.array([float(np.float32(1 / (1 + math.sqrt((1 - a) / a * (1 - b) / b)))) for a, b in points])
    same, same_point = np.mean(ours == ref), np.mean(ours.round(6) == ref.round(6))
    print(
        f"{len(points)} midpoints: {same:.2%} bit-identical, {same_point:.2%} the same tree point (float64 "
        f"arithmetic: {np.mean(float64 == ref):.2%}, {np.mean(float64.round(6) == ref.round(6)):.2%})"
    )
    assert same > 0.95 and same_point > 0.995
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


# --- end to end: an SD3 pipeline -----------------------------------------------------------------------------------

PROMPT = "a red lighthouse on mars, photo"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from tiny_sd3 import sd3_folder, tiny_sd3

    from mlx_sd.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("sd3-flow-samplers")
    pipe = tiny_sd3(tmp)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Pipeline(sd3_folder(pipe, tmp / "mlx"))


@torch.no_grad()
def comfy_sd3_images(pipe, name, steps, seed, batch, guidance, width, height, **options):
    """diffusers' SD3 networks sampled by ComfyUI's function (transcribed above) under classifier-free guidance, fed
    the noise our request draws: one torch generator per image giving its initial latent and then the sampler's
    draws, or for the SDE samplers trees seeded with the images' seeds over the schedule's sigmas. The levels are
    diffusers' FlowMatchEulerDiscreteScheduler's (our "Normal" schedule: tests/test_schedules.py)."""
    context, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, None, None, negative_prompt="blurry")
    context, pooled = torch.cat([negative, context]), torch.cat([negative_pooled, pooled])
    context, pooled = context.repeat_interleave(batch, 0), pooled.repeat_interleave(batch, 0)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    shape = (1, 16, height // 8, width // 8)
    x = torch.cat([torch.randn(shape, generator=g) for g in generators])
    pipe.scheduler.set_timesteps(steps)
    sigmas = pipe.scheduler.sigmas.float()

    def model(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        timestep = (sigma * 1000).expand(2 * x.shape[0])
        out = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=timestep, encoder_hidden_states=context,
                               pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
        uncond, cond = out.chunk(2)
        return x - (uncond + guidance * (cond - uncond)) * sigma

    function, kwargs = COMFY[name]
    if SAMPLERS[name].brownian:
        lo = float(sigmas[sigmas > 0].min())
        noise = k_diffusion_sampling().BrownianTreeNoiseSampler(x, torch.tensor(lo), torch.tensor(1.0),
                                                                seed=[seed + i for i in range(batch)])  # fmt: skip
        kwargs = {**kwargs, "shift": pipe.scheduler.config.shift}
    else:
        noise = lambda *_: torch.cat([torch.randn(shape, generator=g) for g in generators])  # noqa: E731
    latents = function(model, x, sigmas, noise, **kwargs, **options)[-1]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("name,options", [("Euler a", {"eta": 0.7}), ("DPM++ 2M SDE", {})])
def test_sd3_generates_with_flow_samplers_as_comfyui(sd3, name, options):
    """SD3 txt2img, batch 2, through the pipeline: the images ComfyUI's arithmetic gives on diffusers' networks with
    the request's noise, not the Euler ones; the infotext makes them again."""
    from test_pipeline import as_array

    from mlx_sd.infotext import request_fields
    from mlx_sd.params import GenerationRequest
    from oracles import psnr

    ref, ours = sd3
    params = dict(prompt=PROMPT, negative_prompt="blurry", width=64, height=48, steps=6, guidance=5.0, seed=7)
    result = ours.generate(**params, sampler=name, batch_size=2, **options)
    expected = comfy_sd3_images(ref, name, 6, 7, 2, 5.0, 64, 48, **options)
    value = psnr(as_array(result.images), expected, data_range=1.0)
    print(f"SD3 {name} {options}: {value:.1f} dB against ComfyUI's arithmetic on diffusers' networks")
    assert value >= 58.0, value
    euler = ours.generate(**params, sampler="Euler", batch_size=2)
    assert psnr(as_array(euler.images), as_array(result.images), data_range=1.0) < 40
    fields, _ = request_fields(result.infotexts[0])
    assert fields["sampler"] == name and fields["seed"] == 7 and fields.get("eta") == options.get("eta"), fields
    again = ours.generate(GenerationRequest(**fields, batch_size=2))  # a batch of 1 can differ in an 8-bit level
    np.testing.assert_array_equal(as_array(again.images), as_array(result.images))
