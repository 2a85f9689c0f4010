"""The DPM-Solver++ family: exponential-integrator steps in lambda = -log sigma on the data prediction x0.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"; the
k-diffusion functions `sample_dpmpp_2m`, `_2m_sde`, `_3m_sde`, `_sde`, `_2s_ancestral` are what A1111 runs.
In VE space a first-order step from sigma to sigma_next is x' = (sigma_next / sigma) x - expm1(-h) x0 with
h = log(sigma / sigma_next). diffusers' DPMSolverMultistepScheduler ("dpmsolver++", "sde-dpmsolver++") and
DPMSolverSDEScheduler take the same steps in VP space.
"""

from __future__ import annotations

import math

import numpy as np

from .common import ancestral_step, emit, noise_like, step_noise, to_d


def dpmpp_2m(denoiser, x, sigmas, rng=None, *, solver_type="midpoint", lower_order_final=False):
    """DPM-Solver++(2M): second-order multistep (one model call per step).

    The first step, and a last step to sigma 0, are first order. `lower_order_final=True` also makes a last
    step to a nonzero sigma first order (diffusers' `lower_order_final` with fewer than 15 steps, or
    `euler_at_final`). `solver_type` "midpoint" (k-diffusion, diffusers' default) or "heun" (diffusers).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    n = len(sigmas) - 1
    old_denoised = None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            if old_denoised is None or (lower_order_final and i == n - 1):
                x = (sigma_next / sigma) * x - math.expm1(-h) * denoised
            else:
                r = math.log(sigmas[i - 1] / sigma) / h
                if solver_type == "midpoint":
                    denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
                    x = (sigma_next / sigma) * x - math.expm1(-h) * denoised_d
                else:
                    d1 = (denoised - old_denoised) / r
                    x = (sigma_next / sigma) * x - math.expm1(-h) * denoised + (math.expm1(-h) / h + 1) * d1
        old_denoised = denoised
        x = yield from emit(x, old_denoised)


def dpmpp_2m_sde(
    denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0, solver_type="midpoint", lower_order_final=False
):
    """DPM-Solver++(2M) SDE: the 2M step with a fraction eta of the noise renewed each step (stochastic)."""
    return (yield from multistep_sde_2m(denoiser, x, sigmas, rng, eta, s_noise, solver_type, lower_order_final))


def dpmpp_3m_sde(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(3M) SDE: third-order multistep with renewed noise (k-diffusion only)."""
    return (yield from multistep_sde_3m(denoiser, x, sigmas, rng, eta, s_noise))


# The multistep SDE solvers run in VE space and, with `flow=True`, on rectified-flow latents (samplers/flow.py):
# there the half-logSNR is lambda = log(alpha / sigma), alpha = 1 - sigma, and each x0 term carries alpha_next
# (ComfyUI's CONST branch); in VE space alpha = 1 and lambda = -log sigma. k-diffusion draws the step's noise whenever
# eta is set, ComfyUI only when it adds some (s_noise > 0 too).


def _half_log_snr(sigma: float, flow: bool) -> float:
    return math.log((1.0 - sigma) / sigma) if flow else -math.log(sigma)


def _renews_noise(eta: float, s_noise: float, flow: bool) -> bool:
    return eta > 0 and s_noise > 0 if flow else bool(eta)


def multistep_sde_2m(denoiser, x, sigmas, rng, eta, s_noise, solver_type, lower_order_final, flow=False):
    """DPM-Solver++(2M) SDE in VE space or (`flow`) on rectified-flow latents; `solver_type` "midpoint" or "heun"."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    n = len(sigmas) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = _half_log_snr(sigma_next, flow) - _half_log_snr(sigma, flow)
            eta_h = eta * h
            alpha_next = 1 - sigma_next if flow else 1.0
            decay = -math.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
            x = (sigma_next / sigma) * math.exp(-eta_h) * x + (alpha_next * decay) * denoised
            if old_denoised is not None and not (lower_order_final and i == n - 1):
                r = h_last / h
                if solver_type == "heun":
                    x = x + (alpha_next * (decay / (-h - eta_h) + 1) / r) * (denoised - old_denoised)
                else:
                    x = x + (0.5 * alpha_next * decay / r) * (denoised - old_denoised)
            if _renews_noise(eta, s_noise, flow):
                x = x + step_noise(rng, x, sigma, sigma_next) * (
                    sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                )
            h_last = h
        old_denoised = denoised
        x = yield from emit(x, old_denoised)


def multistep_sde_3m(denoiser, x, sigmas, rng, eta, s_noise, flow=False):
    """DPM-Solver++(3M) SDE in VE space or (`flow`) on rectified-flow latents."""
    denoised_1 = denoised_2 = None
    h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = _half_log_snr(sigma_next, flow) - _half_log_snr(sigma, flow)
            h_eta = h * (eta + 1)
            alpha_next = 1 - sigma_next if flow else 1.0
            x = (sigma_next / sigma) * math.exp(-h * eta) * x + (alpha_next * -math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + (alpha_next * phi_2) * d1 - (alpha_next * (phi_2 / h_eta - 0.5)) * d2
            elif h_1 is not None:
                x = x + (alpha_next * phi_2) * ((denoised - denoised_1) / (h_1 / h))
            if _renews_noise(eta, s_noise, flow):
                noise = step_noise(rng, x, sigma, sigma_next)
                x = x + noise * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
        x = yield from emit(x, *(d for d in (denoised_1, denoised_2) if d is not None))


def brownian_pair(rng, x, sigma: float, sigma_mid: float, sigma_next: float):
    """Noise for the intervals (sigma -> sigma_mid) and (sigma -> sigma_next) of one DPM++ SDE step, normalised
    increments of one Brownian motion in sigma, as k-diffusion's `BrownianTreeNoiseSampler` gives them: the
    second interval contains the first, so the two draws are correlated (coefficient
    sqrt((sigma - sigma_mid) / (sigma - sigma_next))). Two fresh standard normal draws z1, z2 per step:
    first = z1, second = (sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next).
    """
    z1 = noise_like(rng, x)
    z2 = noise_like(rng, x)
    a, b = sigma - sigma_mid, sigma_mid - sigma_next
    return z1, (math.sqrt(a) * z1 + math.sqrt(b) * z2) / math.sqrt(a + b)


def tree_pair(tree, x, sigma: float, sigma_next: float, r: float):
    """DPM++ SDE's two draws from a Brownian tree (`brownian.BrownianNoise`), over the intervals k-diffusion asks
    for: sigma_fn(t) -> sigma_fn(t + r h) and sigma_fn(t) -> sigma_fn(t_next), with t = -log(sigma) in float32.
    The tree rounds its points to 6 decimals, so an ulp matters: these are torch's float32 steps, each log and exp
    computed in float64 and rounded once (as C libraries nearly always round)."""
    f32 = np.float32
    t, t_next = -f32(math.log(f32(sigma))), -f32(math.log(f32(sigma_next)))
    s = t + (t_next - t) * f32(r)
    start, mid, end = (float(f32(math.exp(-float(u)))) for u in (t, s, t_next))
    return tree.increment(x, start, mid), tree.increment(x, start, end)


def dpmpp_sde(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, second order, two model calls per step), with Brownian noise: from the tree when
    `rng` is one (`tree_pair`), else two fresh draws correlated as the tree's (`brownian_pair`)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        else:
            h = math.log(sigma / sigma_next)
            sigma_mid = sigma * math.exp(-h * r)
            fac = 1 / (2 * r)
            z_mid, z_next = None, None
            if eta and hasattr(rng, "increment"):
                z_mid, z_next = tree_pair(rng, x, sigma, sigma_next, r)
            elif eta:
                z_mid, z_next = brownian_pair(rng, x, sigma, sigma_mid, sigma_next)
            # step 1: to the midpoint
            sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, eta)
            x_2 = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down / sigma)) * denoised
            if sigma_up > 0:
                x_2 = x_2 + z_mid * (s_noise * sigma_up)
            denoised_2 = denoiser(x_2, sigma_mid, between_levels=True)
            # step 2: the whole step with the blended estimate
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down / sigma)) * denoised_d
            if sigma_up > 0:
                x = x + z_next * (s_noise * sigma_up)
        x = yield from emit(x)


def dpmpp_2s_ancestral(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2S) single-step second-order steps down to sigma_down, then fresh noise ("DPM++ 2S a")."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            h = math.log(sigma / sigma_down)
            sigma_s = sigma * math.exp(-0.5 * h)
            x_2 = (sigma_s / sigma) * x - math.expm1(-0.5 * h) * denoised
            denoised_2 = denoiser(x_2, sigma_s, between_levels=True)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_2
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_like(rng, x) * (s_noise * sigma_up)
        x = yield from emit(x)
