"""The denoiser: a model's eps-, v- or x0-prediction turned into a denoised estimate, in VE space.

Samplers hold x = x0 + sigma * eps ("VE", k-diffusion). The model was trained on the VP latent
x / sqrt(sigma^2 + 1) at the timestep t whose noise level is sigma, so (Karras et al. 2022, Table 1, "VP";
k-diffusion `DiscreteEpsDDPMDenoiser` / `DiscreteVDDPMDenoiser`):

    out = model(x * c_in, t(sigma)),    c_in = 1 / sqrt(sigma^2 + 1)
    epsilon:      x0 = x - sigma * out
    v_prediction: x0 = x / (sigma^2 + 1) - out * sigma / sqrt(sigma^2 + 1)
    sample:       x0 = out

Rectified-flow models (SD3, "flow") hold x = (1 - sigma) x0 + sigma eps instead (schedules.py says why), see x
itself at timestep 1000 * sigma and predict the velocity eps - x0:

    flow:         x0 = x - sigma * out

EDM models (Playground v2.5, CosXL; schedules.py) are preconditioned as Karras et al. 2022, Table 1, with their
sigma_data s: out = model(x * c_in, 0.25 ln sigma), c_in = 1 / sqrt(sigma^2 + s^2), and

    x0 = c_skip * x + c_out * out,   c_skip = s^2 / (sigma^2 + s^2),   c_out = sigma * s / sqrt(sigma^2 + s^2)

(c_out negated for v_prediction, which with s = 1 is the VP v formula above), as diffusers' EDM schedulers.

Classifier-free guidance is linear in the model output, so guiding eps or v (what diffusers and A1111 do) equals
guiding x0: fold it into the model function with `classifier_free_guidance` before building the denoiser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import mlx.core as mx

from .schedules import NoiseSchedule

# model(x_in, t) -> eps / v / x0, with x_in the VP latent and t the training timestep (a float; fractional
# between table entries). The pipeline closes over the conditioning (text embeddings, guidance, ...).
ModelFn = Callable[[mx.array, float], mx.array]


class Denoiser:
    """`denoiser(x, sigma) -> x0` for a model function and its training schedule.

    Args:
        model: `model(x_in, t) -> output`, the output being what `schedule.prediction_type` says.
        schedule: the model's `NoiseSchedule` (its prediction type and sigma <-> t table).
        timesteps: optional exact `{sigma: t}` pairs. A diffusers scheduler fixes the timestep it feeds the model
            for each of its sigmas (integers for DDIM, rounded values for Karras sigmas in DPM-Solver, ...); the
            plan passes them here so the model sees the same t. Other sigmas map through `schedule.sigma_to_t`
            (log-sigma interpolation, as k-diffusion and A1111 do).

    Attributes:
        schedule: the `NoiseSchedule` (samplers such as LCM read t from `sigma_to_t`).
    """

    def __init__(self, model: ModelFn, schedule: NoiseSchedule, timesteps: Mapping[float, float] | None = None):
        self.model = model
        self.schedule = schedule
        self.timesteps = dict(timesteps or {})

    def sigma_to_t(self, sigma: float) -> float:
        """The timestep the model is given at noise level `sigma`."""
        t = self.timesteps.get(float(sigma))
        return float(t) if t is not None else self.schedule.sigma_to_t(float(sigma))

    def __call__(self, x: mx.array, sigma: float, *, between_levels: bool = False) -> mx.array:
        """The denoised estimate x0 of the VE latent `x` at noise level `sigma` (> 0).

        `between_levels=True` marks an evaluation between the listed levels (a DPM2 or DPM++ SDE midpoint): its
        timestep is interpolated even when the value happens to equal a listed sigma (DPM2 a's midpoint is exactly
        the next sigma), as the references do.
        """
        sigma = float(sigma)
        t = self.schedule.sigma_to_t(sigma) if between_levels else self.sigma_to_t(sigma)
        kind = self.schedule.prediction_type
        if kind == "flow":
            return x - self.model(x, t).astype(x.dtype) * sigma
        if self.schedule.is_edm:
            data = self.schedule.edm.sigma_data
            norm = sigma * sigma + data * data
            out = self.model(x * (1.0 / math.sqrt(norm)), 0.25 * math.log(sigma)).astype(x.dtype)
            c_out = sigma * data / math.sqrt(norm)
            return x * (data * data / norm) + out * (c_out if kind == "epsilon" else -c_out)
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        out = self.model(x * c_in, t).astype(x.dtype)
        if kind == "epsilon":
            return x - out * sigma
        if kind == "v_prediction":
            return out * (-sigma * c_in) + x * (1.0 / (sigma * sigma + 1.0))
        return out  # "sample": the model predicts x0 itself


def classifier_free_guidance(
    model: ModelFn, guidance: float, rescale: float = 0.0, cond_model: ModelFn | None = None, skip=None, after=None
) -> ModelFn:
    """Classifier-free guidance (Ho & Salimans 2022) folded into a model function.

    Args:
        model: evaluates a doubled batch `[x; x]` against `[unconditional; conditional]` conditioning (diffusers'
            order) and returns both outputs stacked on the batch axis.
        guidance: the guidance scale; 1.0 returns the conditional output.
        rescale: diffusers' `guidance_rescale` (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
            are Flawed", eq. 15-16): blend in the guided output rescaled to the conditional output's std, which
            keeps zero-terminal-SNR models from over-exposing. 0 disables it.
        cond_model, skip: A1111's "Negative Guidance minimum sigma" (NGMS): every second call (the 2nd, 4th, ...)
            for which `skip(t)` holds evaluates `cond_model` (the conditional pass alone) and returns its output,
            unguided, at half the cost (A1111's CFGDenoiser with s_min_uncond).
        after: `after(x, t, cond)` -> a term added to the guided output, or None (SD3's skip-layer guidance, which
            needs the conditional output; mlx_sd/sd3.py).

    Returns:
        `guided(x, t) = uncond + guidance * (cond - uncond)` (rescaled if asked), a model function for `Denoiser`.
    """

    calls = 0

    def guided(x: mx.array, t: float) -> mx.array:
        nonlocal calls
        calls += 1
        if cond_model is not None and calls % 2 == 0 and skip(t):
            return cond_model(x, t)
        uncond, cond = mx.split(model(mx.concatenate([x, x], axis=0), t), 2, axis=0)
        out = uncond + guidance * (cond - uncond)
        if rescale:
            axes = tuple(range(1, out.ndim))
            out = rescale * out * (_std(cond, axes) / _std(out, axes)) + (1 - rescale) * out
        if after is not None:
            extra = after(x, t, cond)
            out = out if extra is None else out + extra
        return out

    return guided


def _std(x: mx.array, axes: tuple[int, ...]) -> mx.array:
    """torch.std (unbiased) over `axes`, keeping them, as diffusers' rescale_noise_cfg computes it."""
    n = math.prod(x.shape[a] for a in axes)
    mean = x.mean(axis=axes, keepdims=True)
    return mx.sqrt(mx.square(x - mean).sum(axis=axes, keepdims=True) / (n - 1))
