"""What every sampler shares: the signature, the send() protocol, the noise draw and two small formulas.

Every sampler is a generator function with one signature:

    sampler(denoiser, x, sigmas, rng=None, **options) -> Iterator[mx.array]

- `denoiser(x, sigma) -> x0`: a `mlx_sd.denoiser.Denoiser` (samplers that evaluate between the listed levels pass
  `between_levels=True`; LCM reads `denoiser.sigma_to_t`);
- `x`: the VE latent (x = x0 + sigma * eps) at `sigmas[0]`, (B, H, W, C);
- `sigmas`: the n + 1 decreasing noise levels of n steps (the last is usually 0), Python floats;
- `rng`: a noise source, anything with `.normal(shape, dtype) -> mx.array` returning successive standard
  normal draws in torch's NCHW element order (see `mlx_sd.rng`); only stochastic samplers draw from it. The SDE
  samplers also take a `brownian.BrownianNoise` (A1111's Brownian tree), whose noise depends on the step's
  interval: they draw through `step_noise`.

It yields x after every step: after step i, x is the VE latent at `sigmas[i + 1]`, evaluated; the last yield is
the result. Multistep history lives in the generator's local variables. A consumer may send a replacement for the
x it was just given, `gen.send(new_x)` (inpainting pastes the known region back after every step, as diffusers
does); the sampler continues from the replacement and keeps its history. Plain iteration sends None and keeps x.
"""

from __future__ import annotations

import math

import mlx.core as mx


def emit(x: mx.array, *state: mx.array):
    """`x = yield from emit(x, ...)`: evaluate x (and state it depends on), yield it, take a sent replacement."""
    mx.eval(x, *state)
    sent = yield x
    return x if sent is None else sent


def noise_like(rng, x: mx.array) -> mx.array:
    """A standard normal draw shaped like x. Noise sources draw in torch's NCHW order; latents are NHWC."""
    if rng is None:
        raise ValueError("this sampler is stochastic: pass a noise source (rng), e.g. mlx_sd.rng.MLXNoise(seed)")
    if x.ndim == 4:
        b, h, w, c = x.shape
        return rng.normal((b, c, h, w), dtype=x.dtype).transpose(0, 2, 3, 1)
    return rng.normal(tuple(x.shape), dtype=x.dtype)


def step_noise(rng, x: mx.array, sigma: float, sigma_next: float) -> mx.array:
    """Standard normal noise for the step sigma -> sigma_next: the normalised increment of a Brownian tree over that
    interval when `rng` is one (`brownian.BrownianNoise`), else the source's next draw."""
    increment = getattr(rng, "increment", None)
    return noise_like(rng, x) if increment is None else increment(x, sigma, sigma_next)


def to_d(x: mx.array, sigma: float, denoised: mx.array) -> mx.array:
    """The probability-flow ODE derivative dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step from sigma_from to sigma_to into a deterministic step down to sigma_down and fresh noise of
    std sigma_up, sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion `get_ancestral_step`; eta=1 is DDPM)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def vp_rescale(x: mx.array, sigma_from: float, sigma_to: float) -> mx.array:
    """The same VP latent read at another noise level: x * sqrt(1 + sigma_to^2) / sqrt(1 + sigma_from^2).

    diffusers' DDIM/PNDM step to `t - 1000 // steps`, which is not always the next timestep they evaluate; their
    VP latent then silently changes noise level. In VE space that is this rescale.
    """
    if sigma_from == sigma_to:
        return x
    return x * (math.sqrt(1.0 + sigma_to**2) / math.sqrt(1.0 + sigma_from**2))
