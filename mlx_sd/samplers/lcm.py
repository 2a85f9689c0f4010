"""LCM: the multistep consistency sampler of latent consistency models.

Luo et al. 2023, "Latent Consistency Models", Algorithm 3; diffusers' LCMScheduler. Each step maps x to the
consistency function's estimate f(x, t) = c_skip(t) x_VP + c_out(t) x0 (the boundary condition, with
sigma_data = 0.5 and t scaled by `timestep_scaling`), then noises it afresh to the next level.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .common import emit, noise_like

SIGMA_DATA = 0.5  # LCM's boundary-condition scale (diffusers: "Default: 0.5")


def lcm(denoiser, x, sigmas, rng=None, *, timestep_scaling=10.0, clip_sample=False, clip_sample_range=1.0):
    """LCM steps (one model call each; stochastic: fresh noise after every step but the last).

    The boundary condition needs the training timestep t of each level: `denoiser.sigma_to_t`.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma)
        if clip_sample:
            x0 = mx.clip(x0, -clip_sample_range, clip_sample_range)
        scaled_t = denoiser.sigma_to_t(sigma) * timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / math.sqrt(scaled_t**2 + SIGMA_DATA**2)
        x = c_out * x0 + c_skip * (x / math.sqrt(1.0 + sigma * sigma))
        if sigma_next > 0:
            x = x + noise_like(rng, x) * sigma_next
        x = yield from emit(x)
