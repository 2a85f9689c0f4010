"""DDIM, DDPM and PLMS, the DDPM-family (VP) samplers of diffusers and the original LDM code, in VE space.

With x_VP = x / sqrt(1 + sigma^2) their updates become:
- DDIM (Song et al. 2020, eq. 12): x' = x0 + sigma_down * eps + sigma_up * noise, the ancestral split of the step
  with std eta * (DDIM's sigma_t); eta = 0 is an Euler step, eta = 1 the DDPM posterior.
- DDPM (Ho et al. 2020, eq. 7): the posterior mean x' = x0 + (sigma'^2 / sigma^2)(x - x0) plus noise.
- PLMS / PNDM (Liu et al. 2022, "Pseudo Numerical Methods"; crowsonkb's PLMS): DDIM transfers with
  Adams-Bashforth combinations of the last four eps estimates, the first step a pseudo improved-Euler step.

diffusers' DDIM and PNDM step from timestep t to t - 1000 // steps, which for some spacings is not the next
timestep they evaluate; the `targets` option reproduces that (see `common.vp_rescale`).
"""

from __future__ import annotations

import math

import mlx.core as mx

from .common import emit, noise_like, vp_rescale


def _targets(sigmas, targets):
    n = len(sigmas) - 1
    targets = list(sigmas[1:]) if targets is None else [float(t) for t in targets]
    if len(targets) != n:
        raise ValueError(f"targets must give one noise level per step ({n}), got {len(targets)}")
    return targets


def _clip(x0, clip_sample, clip_sample_range):
    return mx.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def ddim(denoiser, x, sigmas, rng=None, *, eta=0.0, clip_sample=False, clip_sample_range=1.0, targets=None):
    """DDIM steps (one model call each); stochastic when eta > 0.

    Args:
        eta: the fraction of DDIM's posterior noise renewed each step (0: deterministic DDIM).
        clip_sample: clip x0 to [-clip_sample_range, clip_sample_range] (diffusers' `clip_sample`); the noise
            direction keeps the model's own eps, as diffusers does without `use_clipped_model_output`.
        targets: per step, the noise level the step lands on (default: the next sigma).
    """
    targets = _targets(sigmas, targets)
    for i in range(len(sigmas) - 1):
        sigma, target = sigmas[i], targets[i]
        denoised = denoiser(x, sigma)
        eps = (x - denoised) / sigma
        sigma_up = eta * math.sqrt(target**2 * (sigma**2 - target**2) / sigma**2) if eta else 0.0
        x = _clip(denoised, clip_sample, clip_sample_range) + eps * math.sqrt(target**2 - sigma_up**2)
        if sigma_up > 0:
            x = x + noise_like(rng, x) * sigma_up
        x = vp_rescale(x, target, sigmas[i + 1])
        x = yield from emit(x)


def ddpm(denoiser, x, sigmas, rng=None, *, clip_sample=False, clip_sample_range=1.0):
    """Ancestral DDPM steps with the "fixed_small" posterior variance (stochastic; one model call each).

    The last step to sigma 0 adds no noise (diffusers adds noise of std 1e-10 there when the last timestep is
    not 0, from the variance clamp; that is below float32 resolution of the latents).
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = _clip(denoiser(x, sigma), clip_sample, clip_sample_range)
        ratio = sigma_next**2 / sigma**2
        x = (1 - ratio) * x0 + ratio * x
        if sigma_next > 0:
            x = x + noise_like(rng, x) * (sigma_next * math.sqrt(1 - ratio))
        x = yield from emit(x)


_ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def plms(denoiser, x, sigmas, rng=None, *, targets=None, first_step=None, history="eps"):
    """PLMS (diffusers' PNDMScheduler with skip_prk_steps, and the LDM PLMSSampler): one model call per step plus
    one extra in the first step.

    Args:
        targets: per step, the noise level its transfer lands on (default: the next sigma).
        first_step: the pseudo improved-Euler first step as (predictor_target, second_sigma, source): the
            predictor lands on predictor_target, the model is evaluated again at second_sigma, and the averaged
            estimate is applied from `x` read at `source` to targets[0]. Default: (targets[0], targets[0],
            sigmas[0]) when there is more than one step, none for a single step; diffusers differs for linspace
            spacing and img2img (where a single step is two model calls).
        history: what the Adams-Bashforth combination averages: "eps" (LDM, A1111), or "v", the raw output of a
            v-prediction model, converted to eps only at the transfer (diffusers' PNDMScheduler).
    """
    if history not in ("eps", "v"):
        raise ValueError(f"history must be 'eps' or 'v', got {history!r}")
    targets = _targets(sigmas, targets)

    def output(x, sigma):
        x0 = denoiser(x, sigma)
        if history == "eps":
            return (x - x0) / sigma
        return (x * (1 / (1 + sigma**2)) - x0) * (math.sqrt(1 + sigma**2) / sigma)  # v, from x0

    def transfer(x, source, target, out):  # a DDIM (eta 0) step with the estimate `out`, x read at `source`
        eps = out if history == "eps" else out * (1 / math.sqrt(1 + source**2)) + x * (source / (1 + source**2))
        return x + eps * (target - source)

    n = len(sigmas) - 1
    outputs = []
    for i in range(n):
        sigma = sigmas[i]
        out = output(x, sigma)
        if i == 0 and (n > 1 or first_step is not None):
            pred_target, second_sigma, source = first_step or (targets[0], targets[0], sigma)
            x_pred = vp_rescale(transfer(x, sigma, pred_target, out), pred_target, second_sigma)
            out_2 = output(x_pred, second_sigma)
            x = transfer(vp_rescale(x, sigma, source), source, targets[0], (out + out_2) / 2)
        else:
            # diffusers keeps the first step's estimate, not its predictor's, in the history
            recent = outputs[-3:] + [out] if i > 0 else [out]
            combined = sum(w * o for w, o in zip(_ADAMS_BASHFORTH[len(recent)], reversed(recent)))
            x = transfer(x, sigma, targets[i], combined)
        outputs = (outputs + [out])[-4:]
        x = vp_rescale(x, targets[i], sigmas[i + 1])
        x = yield from emit(x, *outputs)
