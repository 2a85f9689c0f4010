"""Stochastic samplers for rectified-flow models (SD3), as ComfyUI runs them on its "CONST" models.

A flow latent at noise level sigma in [0, 1] is x = alpha x0 + sigma eps with alpha = 1 - sigma (schedules.py). The ODE
solvers need nothing new (their ODE is dx/dsigma = (x - x0) / sigma there too: Euler, Heun, DPM2, LMS and DPM++ 2M run
as they are), but noise does: the signal shrinks as noise is added, so a VE step's "add noise of std sigma_up" would
leave the latent at the wrong level. ComfyUI (comfy/k_diffusion/sampling.py) gives each stochastic sampler its own flow
arithmetic, which these functions follow step for step:

- ancestral samplers (`sample_euler_ancestral_RF`, `sample_dpm_2_ancestral_RF`, `sample_dpmpp_2s_ancestral_RF`): the
  deterministic step goes down to sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta), then the latent is
  rescaled by alpha_next / alpha_down and gets noise of the std that brings it to sigma_next (`flow_ancestral_step`);
- SDE samplers (`sample_dpmpp_sde`, `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde` given a CONST model): DPM-Solver++ in
  the half-logSNR lambda = log(alpha / sigma) = log((1 - sigma) / sigma) (`half_log_snr`), with alpha factors where VE
  space has none. lambda is -inf at sigma = 1, so a schedule starting there starts their arithmetic 1e-4 of the
  timestep range lower (`offset_first_sigma`), the latent unchanged.

Noise comes from the sources the diffusion samplers use: one draw per step (`noise_like`), and for the SDE samplers
A1111's Brownian tree (`brownian.py`) spanning the schedule's flow sigmas, as ComfyUI spans its
`BrownianTreeNoiseSampler` over them.
"""

from __future__ import annotations

import math

import numpy as np

from .common import ancestral_step, emit, noise_like, to_d
from .dpm import _log_midpoint
from .dpmpp import brownian_pair, multistep_sde_2m, multistep_sde_3m

SNR_OFFSET = 1e-4  # ComfyUI's `offset_first_sigma_for_snr(percent_offset=1e-4)`: a fraction of the timestep range


def half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) of a flow level, alpha = 1 - sigma (ComfyUI `sigma_to_half_log_snr`, CONST)."""
    return math.log((1.0 - sigma) / sigma)


def flow_sigma(lam: float) -> float:
    """The flow level of half-logSNR `lam`: 1 / (1 + e^lam) (ComfyUI `half_log_snr_to_sigma`, CONST)."""
    return 1.0 / (1.0 + math.exp(lam))


def offset_first_sigma(schedule, sigmas):
    """ComfyUI's `offset_first_sigma_for_snr`: a schedule starting at sigma 1 (pure noise) starts at the level of
    timestep (1 - 1e-4) N instead (shift applied, rounded to float32 as ComfyUI holds its sigmas)."""
    if len(sigmas) < 2 or sigmas[0] < 1:
        return sigmas
    first = schedule.t_to_sigma(schedule.num_train_timesteps * (1 - SNR_OFFSET))
    return (float(np.float32(first)), *sigmas[1:])


def flow_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float, float]:
    """Split a flow step sigma -> sigma_next > 0 into a deterministic step to sigma_down and a renoising step:
    x_next = (alpha_next / alpha_down) x_down + renoise * noise, renoise^2 = sigma_next^2 - (sigma_down alpha_next /
    alpha_down)^2, which puts the latent at sigma_next (ComfyUI's RF samplers). eta = 0: no noise; 1: sigma_down =
    sigma_next^2 / sigma.

    Returns:
        (sigma_down, alpha_next / alpha_down, renoise).
    """
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    if sigma_down < 0:
        raise ValueError(f"eta={eta} is too large for the step {sigma:.4g} -> {sigma_next:.4g} of a rectified-flow "
                         f"model: its deterministic part would go below sigma 0 (here eta <= "
                         f"{sigma / (sigma - sigma_next):.3g})")  # fmt: skip
    scale = (1 - sigma_next) / (1 - sigma_down)
    return sigma_down, scale, math.sqrt(max(sigma_next**2 - (sigma_down * scale) ** 2, 0.0))


def _towards(x, denoised, ratio: float):
    """The flow latent moved from level sigma to level ratio * sigma along the straight line to `denoised`."""
    return ratio * x + (1 - ratio) * denoised


def euler_ancestral_flow(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """Euler a on a flow model (ComfyUI `sample_euler_ancestral_RF`): an Euler step to sigma_down, then renoise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, scale, renoise = flow_ancestral_step(sigma, sigma_next, eta)
            x = _towards(x, denoised, sigma_down / sigma)
            if eta > 0:
                x = scale * x + noise_like(rng, x) * (s_noise * renoise)
        x = yield from emit(x)


def dpm_2_ancestral_flow(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """DPM2 a on a flow model (ComfyUI `sample_dpm_2_ancestral_RF`): a DPM2 step (midpoint in log sigma) to
    sigma_down, then renoise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, sigma, denoiser(x, sigma))
        sigma_down, scale, renoise = flow_ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid, between_levels=True))
            x = scale * (x + d_2 * (sigma_down - sigma))
            if eta > 0:  # ComfyUI draws here whatever eta; with eta 0 the draw is multiplied by 0
                x = x + noise_like(rng, x) * (s_noise * renoise)
        x = yield from emit(x)


# ComfyUI's 2S midpoint when a step starts at sigma 1, whose half-logSNR is -inf
FIRST_MIDPOINT = 0.9999


def dpmpp_2s_ancestral_flow(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """DPM++ 2S a on a flow model (ComfyUI `sample_dpmpp_2s_ancestral_RF`): two straight-line moves, to the
    half-logSNR midpoint towards sigma_down and then to sigma_down with the midpoint's estimate, then renoise."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, scale, renoise = flow_ancestral_step(sigma, sigma_next, eta)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            if sigma == 1.0:
                sigma_s = FIRST_MIDPOINT
            else:
                lam = half_log_snr(sigma)
                sigma_s = flow_sigma(lam + 0.5 * (half_log_snr(sigma_down) - lam))
            denoised_2 = denoiser(_towards(x, denoised, sigma_s / sigma), sigma_s, between_levels=True)
            x = _towards(x, denoised_2, sigma_down / sigma)
            if eta > 0:
                x = scale * x + noise_like(rng, x) * (s_noise * renoise)
        x = yield from emit(x)


def _sde_midpoint(sigma: float, sigma_next: float, r: float) -> float:
    """DPM++ SDE's level sigma_fn(lambda + r h) between sigma and sigma_next, computed as ComfyUI computes it, in
    torch's float32 steps (logit, sigmoid), each rounded once. The Brownian tree rounds its query points to 6 decimals,
    so an ulp matters; torch's float32 log is an ulp off at some arguments, so ~98% of midpoints are torch's to the
    bit and ~99.97% give its tree point (tests/test_flow_samplers.py)."""
    f32, one = np.float32, np.float32(1)

    def lam(s):
        s = f32(s)
        return -f32(math.log(s / (one - s)))

    lam_s = lam(sigma)
    lam_mid = lam_s + f32(r) * (lam(sigma_next) - lam_s)
    return float(one / (one + f32(math.exp(float(lam_mid)))))


def dpmpp_sde_flow(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0, r=0.5):
    """DPM++ SDE on a flow model (ComfyUI `sample_dpmpp_sde`, CONST): the VE sampler's two ancestral steps taken on
    the levels sigma / alpha = e^-lambda, each result scaled by its alpha. Noise from the Brownian tree when `rng` is
    one, else two fresh draws correlated as the tree's (`brownian_pair`)."""
    sigmas = offset_first_sigma(denoiser.schedule, sigmas)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            lam, lam_next = half_log_snr(sigma), half_log_snr(sigma_next)
            lam_mid = lam + r * (lam_next - lam)
            sigma_mid = _sde_midpoint(sigma, sigma_next, r)  # where ComfyUI evaluates and queries the tree
            z_mid = z_next = None
            if eta > 0 and s_noise > 0 and hasattr(rng, "increment"):
                z_mid, z_next = rng.increment(x, sigma, sigma_mid), rng.increment(x, sigma, sigma_next)
            elif eta > 0 and s_noise > 0:
                z_mid, z_next = brownian_pair(rng, x, sigma, sigma_mid, sigma_next)
            # step 1: to the midpoint
            x_2 = _sde_step(x, denoised, lam, lam_mid, eta, z_mid, s_noise)
            denoised_2 = denoiser(x_2, sigma_mid, between_levels=True)
            # step 2: the whole step with the blended estimate
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = _sde_step(x, denoised_d, lam, lam_next, eta, z_next, s_noise)
        x = yield from emit(x)


def _sde_step(x, denoised, lam: float, lam_to: float, eta: float, noise, s_noise: float):
    """One DPM++ SDE ancestral step between the half-logSNRs lam -> lam_to of a flow model: the VE step on the levels
    e^-lambda, the latents scaled by alpha = 1 / (1 + e^-lambda)."""
    alpha, alpha_to = 1 / (1 + math.exp(-lam)), 1 / (1 + math.exp(-lam_to))
    sigma_down, sigma_up = ancestral_step(math.exp(-lam), math.exp(-lam_to), eta)
    h = -math.log(sigma_down) - lam
    x = (alpha_to / alpha) * math.exp(-h) * x - alpha_to * math.expm1(-h) * denoised
    return x if noise is None else x + noise * (alpha_to * s_noise * sigma_up)


def dpmpp_2m_sde_flow(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    """DPM++ 2M SDE on a flow model (ComfyUI `sample_dpmpp_2m_sde`, CONST); `solver_type` "midpoint" or "heun"."""
    sigmas = offset_first_sigma(denoiser.schedule, sigmas)
    return (yield from multistep_sde_2m(denoiser, x, sigmas, rng, eta, s_noise, solver_type, False, flow=True))


def dpmpp_3m_sde_flow(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """DPM++ 3M SDE on a flow model (ComfyUI `sample_dpmpp_3m_sde`, CONST)."""
    sigmas = offset_first_sigma(denoiser.schedule, sigmas)
    return (yield from multistep_sde_3m(denoiser, x, sigmas, rng, eta, s_noise, flow=True))
