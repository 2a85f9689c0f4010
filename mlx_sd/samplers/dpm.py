"""DPM2 and DPM2 ancestral: Karras' second-order sampler with a DPM-Solver-2 midpoint in log sigma.

k-diffusion `sample_dpm_2` / `sample_dpm_2_ancestral` ("inspired by DPM-Solver-2 and Algorithm 2 from Karras et
al. 2022"); diffusers' KDPM2DiscreteScheduler / KDPM2AncestralDiscreteScheduler take the same steps.
"""

from __future__ import annotations

import math

from .common import ancestral_step, emit, noise_like, to_d
from .euler import _churn


def _log_midpoint(a: float, b: float) -> float:
    return math.exp(math.log(a) + 0.5 * (math.log(b) - math.log(a)))


def dpm_2(denoiser, x, sigmas, rng=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Two model calls per step: at sigma and at the log-midpoint towards the next sigma."""
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, rng, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = sigmas[i + 1]
        d = to_d(x, sigma_hat, denoiser(x, sigma_hat))
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, sigma_next)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid, between_levels=True))
            x = x + d_2 * (sigma_next - sigma_hat)
        x = yield from emit(x)


def dpm_2_ancestral(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """DPM2 steps down to sigma_down, then fresh noise of std sigma_up ("DPM2 a")."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        d = to_d(x, sigma, denoiser(x, sigma))
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, sigma_mid, between_levels=True))
            x = x + d_2 * (sigma_down - sigma)
            if sigma_up > 0:
                x = x + noise_like(rng, x) * (s_noise * sigma_up)
        x = yield from emit(x)
