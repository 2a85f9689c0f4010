"""Drivers for the sampler parity tests: one model function and one stream of noise fed to our samplers and to the
references (k-diffusion's sampling functions, diffusers' scheduler step loops), every intermediate latent kept.

Latents: ours are NHWC, the references' NCHW. Noise is drawn as NCHW arrays (what a torch-compatible noise source
returns) and our samplers transpose it (`samplers.common.noise_like`), so a transposition bug shows up here.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import sys

import mlx_sd  # noqa: F401  (first: loads OpenBLAS before mlx.core)

# isort: split
import diffusers
import mlx.core as mx
import numpy as np
import torch

# Import the img2img pipeline (for its get_timesteps) now, before oracles put the torchvision stand-in on sys.path:
# transformers' image processors, which the pipeline module imports, would take the stand-in for torchvision.
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import StableDiffusionImg2ImgPipeline

from oracles import k_diffusion_sampling

diffusers.utils.logging.set_verbosity_error()  # from_config warns about the keys other scheduler classes use

# The scheduler_config keys Stable Diffusion models publish (SD 1.5 / 2.1 / SDXL share these values).
SD_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
)
SHAPE_NCHW = (1, 4, 5, 7)


def analytic_model(x: np.ndarray, t, dtype=np.float32) -> np.ndarray:
    """A smooth deterministic stand-in for a UNet (an eps- or v-like output of unit scale), in `dtype`.

    It depends on t gently (a float32 rounding of t moves it by ~1e-7), so references that compute the same t with
    different float32 rounding still agree; it is elementwise, so NHWC and NCHW give the same values.
    """
    x = np.asarray(x, dtype)
    t, c = dtype(t), dtype
    w = c(0.7) + c(0.3) * np.cos(t / c(400))
    return (np.tanh(x * w) + c(0.2) * np.sin(c(2) * x + t / c(150))).astype(dtype)


def mlx_model(x: mx.array, t: float) -> mx.array:
    return mx.array(analytic_model(np.array(x), t))


def torch_model(x: torch.Tensor, t) -> torch.Tensor:
    t = float(torch.as_tensor(t).reshape(-1)[0])
    if x.dtype == torch.float64:  # the float64 run that measures a reference's own float32 rounding
        return torch.from_numpy(analytic_model(x.detach().numpy(), t, np.float64))
    return torch.from_numpy(analytic_model(x.detach().numpy(), np.float32(t)))


def draws(n: int, seed: int = 0, shape=SHAPE_NCHW) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def nhwc(a) -> mx.array:
    return mx.array(np.ascontiguousarray(np.asarray(a, np.float32).transpose(0, 2, 3, 1)))


def nchw(a: mx.array) -> np.ndarray:
    return np.array(a).transpose(0, 3, 1, 2)


class ReplayNoise:
    """A noise source for our samplers that returns the given NCHW draws in order."""

    def __init__(self, arrays):
        self.arrays, self.used = list(arrays), 0

    def normal(self, shape, dtype=mx.float32):
        a = self.arrays[self.used]
        self.used += 1
        assert tuple(shape) == a.shape, f"noise shape {tuple(shape)} != {a.shape}"
        return mx.array(a).astype(dtype)


def as_float64(arrays):
    return [a.astype(np.float64) for a in arrays]


class BrownianReplay:
    """k-diffusion / diffusers `noise_sampler(sigma, sigma_next)` for DPM++ SDE that returns what a Brownian motion in
    sigma gives for the step's two nested intervals, built from the draws our sampler consumes (two per step,
    `samplers.dpmpp.brownian_pair`): (sigma -> sigma_mid) = z1, (sigma -> sigma_next) = the bridge of z1 and z2."""

    def __init__(self, arrays):
        self.arrays, self.used, self.first = list(arrays), 0, None

    def __call__(self, sigma, sigma_next):
        sigma, sigma_next = float(sigma), float(sigma_next)
        if self.first is None:
            z1 = self.arrays[self.used]
            self.used += 1
            self.first = (sigma, sigma_next, z1)
            return torch.from_numpy(z1)
        s, s_mid, z1 = self.first
        assert s == sigma, "the second interval of a step starts where the first did"
        z2 = self.arrays[self.used]
        self.used += 1
        self.first = None
        a, b = s - s_mid, s_mid - sigma_next
        return torch.from_numpy(((math.sqrt(a) * z1 + math.sqrt(b) * z2) / math.sqrt(a + b)).astype(z1.dtype))


class IIDReplay:
    """`noise_sampler(sigma, sigma_next)` returning the draws in order."""

    def __init__(self, arrays):
        self.arrays, self.used = list(arrays), 0

    def __call__(self, *_):
        self.used += 1
        return torch.from_numpy(self.arrays[self.used - 1])


# --- ours ----------------------------------------------------------------------------------------------------


def run_ours(plan, x_init: mx.array, noise, model=mlx_model) -> list[np.ndarray]:
    """Every latent after each step, in the reference's space (VP for VP schedulers), NCHW."""
    out = []
    for i, x in enumerate(plan.sample(model, x_init, noise)):
        out.append(nchw(plan.to_reference(x, i + 1)))
    return out


# --- k-diffusion ---------------------------------------------------------------------------------------------


def k_diffusion_denoiser(model, alphas_cumprod: np.ndarray, prediction_type: str):
    k_diffusion_sampling()  # registers the bare k_diffusion package first
    external = importlib.import_module("k_diffusion.external")
    cls = external.DiscreteVDDPMDenoiser if prediction_type == "v_prediction" else external.DiscreteEpsDDPMDenoiser
    return cls(model, torch.from_numpy(alphas_cumprod.copy()), quantize=False)


class _TorchWithReplayedRandn:
    """Stands in for `torch` inside k_diffusion.sampling so `torch.randn_like` (the churn noise of Euler/Heun/DPM2)
    replays draws, as A1111 does with its TorchHijack."""

    def __init__(self, arrays):
        self.queue = iter(arrays)

    def randn_like(self, x):
        return torch.from_numpy(next(self.queue)).to(x.dtype)

    def __getattr__(self, name):
        return getattr(torch, name)


def run_k_diffusion(function: str, prediction_type: str, alphas_cumprod, sigmas, x, noise_sampler=None,
                    randn_like=None, dtype=torch.float32, timesteps=None, **kwargs):  # fmt: skip
    """Every latent after each step of k-diffusion's `function` over `sigmas`, computed in `dtype`; `timesteps`
    ({sigma: t}) overrides the t it gives the model at those sigmas (to stand in for a diffusers scheduler)."""
    sampling = k_diffusion_sampling()
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    denoiser = k_diffusion_denoiser(torch_model, alphas_cumprod.astype(np_dtype), prediction_type)
    if timesteps:
        interpolate = denoiser.sigma_to_t

        def sigma_to_t(sigma, quantize=None):
            exact = [timesteps.get(float(np.float32(s))) for s in sigma.reshape(-1).tolist()]
            if any(t is None for t in exact):
                return interpolate(sigma, quantize)
            return torch.tensor(exact, dtype=sigma.dtype).reshape(sigma.shape)

        denoiser.sigma_to_t = sigma_to_t
    seen = []
    if noise_sampler is not None:
        kwargs["noise_sampler"] = noise_sampler
    patched = sampling.torch
    if randn_like is not None:
        sampling.torch = _TorchWithReplayedRandn(randn_like)
    try:
        out = getattr(sampling, function)(denoiser, torch.from_numpy(np.asarray(x, np_dtype)),
                                          torch.tensor(sigmas, dtype=dtype), disable=True,
                                          callback=lambda d: seen.append(d["x"].clone()), **kwargs)  # fmt: skip
    finally:
        sampling.torch = patched
    return [s.numpy() for s in seen[1:]] + [out.numpy()]


# --- diffusers -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def replayed_randn(scheduler, arrays):
    """Make the scheduler's module draw `arrays` in order instead of `randn_tensor`."""
    module = sys.modules[type(scheduler).__module__]
    queue = iter(arrays)
    original = getattr(module, "randn_tensor", None)

    def randn(shape, generator=None, device=None, dtype=None, **_):
        a = next(queue)
        assert tuple(shape) == a.shape
        return torch.from_numpy(a).to(dtype or torch.float32)

    module.randn_tensor = randn
    try:
        yield
    finally:
        module.randn_tensor = original


_FRESH_SCHEDULERS = {}


def diffusers_scheduler(class_name: str, config: dict, steps: int):
    """`Class.from_config(config)` after `set_timesteps(steps)`; constructed once per config (KDPM2's constructor
    alone takes 0.4 s) and copied."""
    key = (class_name, repr(sorted(config.items())))
    if key not in _FRESH_SCHEDULERS:
        _FRESH_SCHEDULERS[key] = getattr(diffusers, class_name).from_config(config)
    scheduler = copy.deepcopy(_FRESH_SCHEDULERS[key])
    scheduler.set_timesteps(steps)
    return scheduler


def img2img_timesteps(scheduler, steps: int, strength: float):
    """diffusers' img2img `get_timesteps` (the SD pipeline's method), which also sets the begin index."""
    holder = type("Holder", (), {"scheduler": scheduler})()
    return StableDiffusionImg2ImgPipeline.get_timesteps(holder, steps, strength, "cpu")


def _float64_tables(scheduler) -> None:
    """KDPM2 ancestral derives sigma_up, sigma_down and the midpoints in float32, where
    sigma_down = sqrt(sigma_next^2 - sigma_up^2) cancels when sigma_next << sigma (1e-2 relative error for
    14.6 -> 0.029, linspace spacing with 2 steps). For the float64 run, recompute them as diffusers does, in float64."""
    s = scheduler.sigmas.double()
    sigmas = torch.cat([s[:1], s[1:-1][::2]])
    sigmas_next = sigmas.roll(-1)
    sigmas_next[-1] = 0.0
    up = (sigmas_next**2 * (sigmas**2 - sigmas_next**2) / sigmas**2) ** 0.5
    down = (sigmas_next**2 - up**2) ** 0.5
    down[-1] = 0.0
    interpol = sigmas.log().lerp(down.log(), 0.5).exp()
    interpol[-2:] = 0.0
    for name, values in (("sigmas_up", up), ("sigmas_down", down), ("sigmas_interpol", interpol)):
        setattr(scheduler, name, torch.cat([values[:1], values[1:].repeat_interleave(2), values[-1:]]))


def run_diffusers(scheduler, x: torch.Tensor, arrays, model=torch_model, timesteps=None, **step_kwargs):
    """Every latent after each completed step of a diffusers scheduler loop (as the SD pipelines run it); with
    float64 latents the scheduler's derived tables are float64 too where diffusers' float32 ones lose precision."""
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    if x.dtype == torch.float64 and type(scheduler).__name__ == "KDPM2AncestralDiscreteScheduler":
        _float64_tables(scheduler)
    outs, complete = [], []
    if type(scheduler).__name__ == "DPMSolverSDEScheduler":
        scheduler.noise_sampler = BrownianReplay(arrays)
    with replayed_randn(scheduler, arrays):
        for t in timesteps:
            model_out = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(model_out, t, x, **step_kwargs).prev_sample
            outs.append(x.numpy())
            complete.append(getattr(scheduler, "state_in_first_order", True))
    if type(scheduler).__name__ == "PNDMScheduler":
        return outs[1:] if len(outs) > 1 else outs  # its first two calls make one step
    kept = [o for o, c in zip(outs, complete) if c]
    return kept if complete[-1] else kept + [outs[-1]]
