"""Euler, Euler ancestral and Heun: steps along the probability-flow ODE dx/dsigma = (x - x0) / sigma.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models"), Algorithm 2;
k-diffusion `sample_euler`, `sample_euler_ancestral`, `sample_heun`. diffusers' EulerDiscreteScheduler,
EulerAncestralDiscreteScheduler and HeunDiscreteScheduler take the same steps over their own sigmas.
"""

from __future__ import annotations

import math

from .common import ancestral_step, emit, noise_like, to_d


def _churn(x, sigma, n, rng, s_churn, s_tmin, s_tmax, s_noise):
    """Karras' stochastic "churn": raise the noise level to sigma_hat by adding fresh noise (off by default).

    With churn on, a draw is taken every step, used or not (outside [s_tmin, s_tmax]), as k-diffusion does.
    """
    if not s_churn:
        return x, sigma
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = noise_like(rng, x) * s_noise
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + eps * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


def euler(denoiser, x, sigmas, rng=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """First-order (Euler) steps; deterministic unless s_churn > 0."""
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, rng, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, sigma_hat)
        # x + d * (sigma_next - sigma_hat), written without cancelling two latents of size sigma_hat
        x = denoised + to_d(x, sigma_hat, denoised) * sigmas[i + 1]
        x = yield from emit(x)


def euler_ancestral(denoiser, x, sigmas, rng=None, *, eta=1.0, s_noise=1.0):
    """Euler steps down to sigma_down, then fresh noise of std sigma_up ("Euler a")."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + to_d(x, sigma, denoised) * sigma_down  # x + d * (sigma_down - sigma), without cancellation
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise_like(rng, x) * (s_noise * sigma_up)
        x = yield from emit(x)


def heun(denoiser, x, sigmas, rng=None, *, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Second-order Heun steps (two model calls per step; the last step, to sigma 0, is an Euler step)."""
    n = len(sigmas) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sigmas[i], n, rng, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = sigmas[i + 1]
        d = to_d(x, sigma_hat, denoiser(x, sigma_hat))
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoiser(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        x = yield from emit(x)
