"""Noise schedules: which noise level each training timestep has, and which levels a sampler walks.

Schedule, parameterisation and sampler rule are three separate things (STYLE.md). This file is the schedule:
`NoiseSchedule` is a model's training schedule (betas -> alphas_cumprod -> the table of noise levels
sigma(t), t = 0..999), built from the model's published `scheduler_config.json`; the functions below it choose
the noise levels a sampler walks: A1111's "Schedule type" list (k-diffusion's Karras, exponential, ...) and
diffusers' timestep spacings. `denoiser.py` turns a model output into a denoised estimate; `samplers/` holds the
update rules.

Rectified-flow models (SD3, prediction_type "flow") are the exception: their latent at noise level sigma in [0, 1]
is x = (1 - sigma) * x0 + sigma * eps, the network predicts the velocity eps - x0 at timestep 1000 * sigma, and the
samplers run in that space as ComfyUI's (its "CONST" model sampling): the ODE there is dx/dsigma = (x - x0) / sigma
as in VE space, so Euler, Heun, DPM2 and LMS are exact ODE solvers of it, and Euler is diffusers'
FlowMatchEulerDiscreteScheduler; the ancestral and SDE samplers take ComfyUI's flow arithmetic (samplers/flow.py). VE
space cannot hold them: sigma = 1 (pure noise) is sigma_VE = inf.

EDM models (Karras et al. 2022's preconditioning: Playground v2.5, CosXL) are trained on continuous noise levels
sigma in [sigma_min, sigma_max] of VE space itself; their table (for the schedule types that index one) is ComfyUI's
ModelSamplingContinuousEDM's, 1000 levels evenly spaced in log sigma, and the network sees 0.25 ln sigma.

Everything runs in k-diffusion's variance-exploding ("VE") space, x = x0 + sigma * eps. The DDPM/diffusers
"VP" latent at the same noise level is x / sqrt(1 + sigma^2), with sigma^2 = (1 - alpha_bar) / alpha_bar.
Tables are float32 and computed as diffusers computes them: alphas_cumprod is bit-identical to diffusers' on
x86-64, sigma within one float32 ulp (torch's float32 sqrt is not correctly rounded), and the timesteps a
diffusers scheduler fixes are the same numbers here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"  # the scheduler class of rectified-flow models (SD3)
EDM_SCHEDULERS = ("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler")  # the scheduler classes of EDM models
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# VE space cannot hold alpha_bar = 0 (sigma = inf) at the last step of a zero-terminal-SNR schedule. diffusers'
# Euler, DPM-Solver and UniPC use 2^-24 there ("FP16 smallest positive subnormal", sigma 4096); its DDIM, DDPM and
# LCM keep the exact 0, which 2^-64 (sigma 2^32) stands in for to ~1e-10 (float32 handles the large latents).
ZERO_SNR_ALPHA_BAR = 2.0**-24
ZERO_SNR_EXACT_ALPHA_BAR = 2.0**-64

# The schedulers published with each family (scheduler_config.json), for single-file checkpoints that ship none.
FAMILY_SCHEDULER_CONFIGS: dict[str, dict] = {
    "sd1": {
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    },
    "sd2": {  # SD 2.x 512 "base": epsilon prediction
        "_class_name": "PNDMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    },
    "sd2-v": {  # SD 2.x 768: v prediction
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
    },
    "sd3": {"_class_name": FLOW_SCHEDULER, "num_train_timesteps": 1000, "shift": 3.0},
    "sdxl": {
        "_class_name": "EulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "interpolation_type": "linear",
        "timestep_spacing": "leading",
        "use_karras_sigmas": False,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "sample_max_value": 1.0,
    },
}


# --- the training schedule -----------------------------------------------------------------------------------


def torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` on CPU, bit for bit.

    torch computes `start + step * i` (one fused rounding, step in float32) for the first half and
    `end - step * (n - 1 - i)` for the second; numpy's float64 linspace rounded to float32 differs in the last bit.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32], np.float32)
    step = np.float64(np.float32((end32 - start32) / np.float32(n - 1)))
    i = np.arange(n, dtype=np.float64)
    first = np.float64(start32) + step * i
    second = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, first, second).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """Glide's cosine schedule ("squaredcos_cap_v2"), as diffusers' `betas_for_alpha_bar`."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in double and rounds each partial product once.
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1 (float32)."""
    sqrt_ab = np.sqrt(_cumprod_f32(np.float32(1) - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * np.float32(first / (first - last))
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return (np.float32(1) - alphas).astype(np.float32)


@dataclass(frozen=True)
class EDM:
    """An EDM model's continuous noise levels and preconditioning (diffusers' EDM schedulers' config)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"  # the published schedule type: "karras" or "exponential" ("Automatic")


@dataclass(frozen=True)
class NoiseSchedule:
    """A model's training noise schedule and its table of noise levels.

    Build it with `NoiseSchedule.from_config(scheduler_config_json_dict)` or `NoiseSchedule.for_family("sdxl")`.
    The original config dict is kept (`scheduler_config`) because "run as diffusers would" needs its other keys.

    Attributes:
        sigmas: float32 array (num_train_timesteps,): sigma(t) for t = 0..N-1, increasing.
        alphas_cumprod: float32 array (num_train_timesteps,): alpha_bar(t) (diffusion models only).
        shift: rectified flow's timestep shift (SD3: 3.0): sigma = shift * s / (1 + (shift - 1) * s) for the
            uniform s = t / N, as diffusers' FlowMatchEulerDiscreteScheduler and ComfyUI's ModelSamplingDiscreteFlow.
        edm: an EDM model's noise range and sigma_data (`EDM`), or None.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    rescale_betas_zero_snr: bool = False
    terminal_alpha_bar: float = ZERO_SNR_ALPHA_BAR  # alpha_bar(N - 1) when rescale_betas_zero_snr (see above)
    shift: float = 1.0
    edm: EDM | None = None
    scheduler_config: Mapping = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; the samplers handle {PREDICTION_TYPES}"
            )
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported; choose one of {BETA_SCHEDULES}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    @property
    def is_edm(self) -> bool:
        """An EDM model: VE latents at continuous noise levels, Karras et al.'s preconditioning (denoiser.py)."""
        return self.edm is not None

    @property
    def is_flow(self) -> bool:
        """A rectified-flow model (SD3): latents (1 - sigma) x0 + sigma eps, sigma in [0, 1]."""
        return self.prediction_type == "flow"

    @classmethod
    def from_config(cls, config: Mapping) -> NoiseSchedule:
        """From a diffusers `scheduler_config.json` dict; keys that do not define the training schedule are kept
        in `scheduler_config` for the samplers that follow diffusers."""
        if config.get("_class_name") == FLOW_SCHEDULER:
            return cls._flow(config)
        if config.get("_class_name") in EDM_SCHEDULERS:
            return cls._edm(config)
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        kwargs = {k: config[k] for k in keys if config.get(k) is not None}
        if config.get("trained_betas") is not None:
            kwargs["trained_betas"] = tuple(float(b) for b in config["trained_betas"])
        kwargs["rescale_betas_zero_snr"] = bool(config.get("rescale_betas_zero_snr", False))
        return cls(**kwargs, scheduler_config=dict(config))

    @classmethod
    def _flow(cls, config: Mapping) -> NoiseSchedule:
        # the settings that change the noise levels beyond a fixed shift (Flux-style resolution-dependent shifting,
        # stretched ends, inverted sigmas) are not part of any SD3 release
        unsupported = {k: config[k] for k in ("use_dynamic_shifting", "shift_terminal", "invert_sigmas",
                                               "stochastic_sampling") if config.get(k)}  # fmt: skip
        if unsupported:
            raise ValueError(f"{FLOW_SCHEDULER} with {unsupported} is not supported (SD3 uses a fixed shift)")
        n = int(config.get("num_train_timesteps", 1000))
        return cls(num_train_timesteps=n, prediction_type="flow", shift=float(config.get("shift", 1.0)),
                   scheduler_config=dict(config))  # fmt: skip

    @classmethod
    def _edm(cls, config: Mapping) -> NoiseSchedule:
        edm = EDM(
            **{k: float(config[k]) for k in ("sigma_min", "sigma_max", "sigma_data") if config.get(k) is not None},
            sigma_schedule=config.get("sigma_schedule", "karras"),
        )
        prediction = config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction") or edm.sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"{config.get('_class_name')} with prediction_type {prediction!r} and sigma_schedule "
                             f"{edm.sigma_schedule!r}: EDM models predict epsilon or v over karras or exponential "
                             "sigmas")  # fmt: skip
        if not 0 < edm.sigma_min < edm.sigma_max or edm.sigma_data <= 0:
            raise ValueError(f"EDM sigmas must satisfy 0 < sigma_min < sigma_max and sigma_data > 0, got {edm}")
        n = int(config.get("num_train_timesteps", 1000))
        return cls(num_train_timesteps=n, prediction_type=prediction, edm=edm, scheduler_config=dict(config))

    @classmethod
    def for_family(cls, family: str, **overrides) -> NoiseSchedule:
        """The schedule published with a model family: "sd1", "sd2" (512, epsilon), "sd2-v" (768, v), "sdxl"."""
        if family not in FAMILY_SCHEDULER_CONFIGS:
            raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILY_SCHEDULER_CONFIGS)}")
        return cls.from_config({**FAMILY_SCHEDULER_CONFIGS[family], **overrides})

    @cached_property
    def betas(self) -> np.ndarray:
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, np.float32)
        elif self.beta_schedule == "linear":
            betas = torch_linspace_f32(self.beta_start, self.beta_end, n)
        elif self.beta_schedule == "scaled_linear":  # linear in sqrt(beta): the latent-diffusion schedule
            betas = torch_linspace_f32(self.beta_start**0.5, self.beta_end**0.5, n) ** 2
        else:
            betas = _cosine_betas(n)
        return _rescale_zero_terminal_snr(betas) if self.rescale_betas_zero_snr else betas

    @cached_property
    def alphas_cumprod(self) -> np.ndarray:
        if self.is_flow:
            raise ValueError("a rectified-flow model (SD3) has no alpha_bar table; this needs a diffusion model")
        if self.is_edm:  # the VP latent's alpha_bar at each table level
            return (1 / (1 + self.sigmas.astype(np.float64) ** 2)).astype(np.float32)
        alphas_cumprod = _cumprod_f32(np.float32(1) - self.betas)
        if self.rescale_betas_zero_snr:
            alphas_cumprod[-1] = self.terminal_alpha_bar
        return alphas_cumprod

    @cached_property
    def sigmas(self) -> np.ndarray:
        if self.is_flow:  # diffusers: linspace(1, N, N) / N, shifted, in float32
            s = np.linspace(1, self.num_train_timesteps, self.num_train_timesteps, dtype=np.float32)
            s = s / np.float32(self.num_train_timesteps)
            return (self.shift * s / (1 + (self.shift - 1) * s)).astype(np.float32)
        if self.is_edm:  # ComfyUI's ModelSamplingContinuousEDM table
            e = self.edm
            return np.exp(np.linspace(math.log(e.sigma_min), math.log(e.sigma_max), self.num_train_timesteps)).astype(
                np.float32
            )
        ab = self.alphas_cumprod
        return np.sqrt((np.float32(1) - ab) / ab).astype(np.float32)

    @cached_property
    def log_sigmas(self) -> np.ndarray:
        return np.log(self.sigmas).astype(np.float64)  # float32 logs (as diffusers), held in float64

    @property
    def sigma_min(self) -> float:
        return self.edm.sigma_min if self.is_edm else float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return self.edm.sigma_max if self.is_edm else float(self.sigmas[-1])

    def sigma_to_t(self, sigma):
        """The (fractional) training timestep of a noise level: linear in log sigma between table entries
        (k-diffusion `DiscreteSchedule.sigma_to_t`, diffusers `_sigma_to_t`). Accepts a float or an array.

        Flow models: the timestep the network is given, 1000 * sigma (diffusers and ComfyUI; not the inverse of
        `t_to_sigma`, which applies the shift: both references define them so)."""
        if self.is_flow:
            t = np.asarray(sigma, np.float64) * self.num_train_timesteps
            return float(t) if t.ndim == 0 else t
        log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
        low = np.clip(np.searchsorted(self.log_sigmas, log_sigma, side="right") - 1, 0, len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        t = (1 - w) * low + w * (low + 1)
        return float(t) if t.ndim == 0 else t

    def t_to_sigma(self, t):
        """The noise level of a (fractional) timestep: log sigma interpolated linearly (k-diffusion `t_to_sigma`);
        flow models: the shifted t / N (ComfyUI's `ModelSamplingDiscreteFlow.sigma`)."""
        t = np.asarray(t, np.float64)
        if self.is_flow:
            s = t / self.num_train_timesteps
            sigma = self.shift * s / (1 + (self.shift - 1) * s)
            return float(sigma) if sigma.ndim == 0 else sigma
        low = np.floor(t).astype(int)
        high = np.ceil(t).astype(int)
        w = t - low
        sigma = np.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high])
        return float(sigma) if sigma.ndim == 0 else sigma


# --- A1111 "Schedule type": the noise levels k-diffusion samplers walk ---------------------------------------
# Each returns n + 1 levels, decreasing, float32-rounded; the last is 0 unless the schedule says otherwise.


def _with_zero(sigmas) -> tuple[float, ...]:
    return tuple(float(s) for s in np.float32(sigmas)) + (0.0,)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho) (k-diffusion `get_sigmas_karras`, no zero)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Evenly spaced in log sigma (k-diffusion `get_sigmas_exponential`, no zero)."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def _uniform(schedule: NoiseSchedule, n: int):
    # k-diffusion DiscreteSchedule.get_sigmas(n): A1111's default ("Automatic" for most samplers)
    t = torch_linspace_f32(schedule.num_train_timesteps - 1, 0, n)
    return _with_zero(schedule.t_to_sigma(t))


def _karras(schedule: NoiseSchedule, n: int):
    return _with_zero(karras_sigmas(n, schedule.sigma_min, schedule.sigma_max))


def _exponential(schedule: NoiseSchedule, n: int):
    return _with_zero(exponential_sigmas(n, schedule.sigma_min, schedule.sigma_max))


def _polyexponential(schedule: NoiseSchedule, n: int, rho: float = 1.0):
    ramp = np.linspace(1, 0, n) ** rho
    log_min, log_max = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    return _with_zero(np.exp(ramp * (log_max - log_min) + log_min))


def _sgm_uniform(schedule: NoiseSchedule, n: int):
    # evenly spaced in t from t(sigma_max), n + 1 points with the last dropped (Stability's sgm "uniform")
    t = np.linspace(schedule.sigma_to_t(schedule.sigma_max), schedule.sigma_to_t(schedule.sigma_min), n + 1)[:-1]
    return _with_zero(schedule.t_to_sigma(t))


def _normal(schedule: NoiseSchedule, n: int):
    t = np.linspace(schedule.sigma_to_t(schedule.sigma_max), schedule.sigma_to_t(schedule.sigma_min), n)
    return _with_zero(schedule.t_to_sigma(t))


def _simple(schedule: NoiseSchedule, n: int):
    stride = len(schedule.sigmas) / n
    return _with_zero([schedule.sigmas[-(1 + int(i * stride))] for i in range(n)])


def _ddim_uniform(schedule: NoiseSchedule, n: int):
    # every (N // n)-th table entry from t = 1: may give more than n levels when n does not divide N (as A1111)
    stride = max(len(schedule.sigmas) // n, 1)
    return _with_zero(schedule.sigmas[1::stride][::-1])


def _kl_optimal(schedule: NoiseSchedule, n: int):
    # Sabour et al. 2024 ("Align Your Steps"): evenly spaced in arctan(sigma); ends at sigma_min, not 0
    a_min, a_max = math.atan(schedule.sigma_min), math.atan(schedule.sigma_max)
    frac = np.arange(n + 1) / n
    return tuple(float(s) for s in np.float32(np.tan(frac * a_min + (1 - frac) * a_max)))


@dataclass(frozen=True)
class ScheduleType:
    """One entry of A1111's "Schedule type" list."""

    name: str
    label: str
    function: Callable[[NoiseSchedule, int], tuple[float, ...]]
    aliases: tuple[str, ...] = ()
    diffusers_flag: str | None = None  # the scheduler_config flag that selects it in diffusers, if any


SCHEDULE_TYPES: dict[str, ScheduleType] = {
    s.name: s
    for s in (
        ScheduleType("uniform", "Uniform", _uniform),
        ScheduleType("karras", "Karras", _karras, diffusers_flag="use_karras_sigmas"),
        ScheduleType("exponential", "Exponential", _exponential, diffusers_flag="use_exponential_sigmas"),
        ScheduleType("polyexponential", "Polyexponential", _polyexponential),
        ScheduleType("sgm_uniform", "SGM Uniform", _sgm_uniform, aliases=("SGMUniform",)),
        ScheduleType("kl_optimal", "KL Optimal", _kl_optimal),
        ScheduleType("simple", "Simple", _simple),
        ScheduleType("normal", "Normal", _normal),
        ScheduleType("ddim", "DDIM", _ddim_uniform),
    )
}
AUTOMATIC = "automatic"  # A1111's "Automatic": the sampler's own default schedule type


def schedule_type(name: str) -> ScheduleType | None:
    """Look up a schedule type by name, label or alias (case-insensitive); "Automatic" gives None."""
    key = name.strip().lower()
    if key == AUTOMATIC:
        return None
    for s in SCHEDULE_TYPES.values():
        if key in (s.name, s.label.lower(), *(a.lower() for a in s.aliases)):
            return s
    known = ["Automatic"] + [s.label for s in SCHEDULE_TYPES.values()]
    raise ValueError(f"unknown schedule type {name!r}; choose one of {known}")


# --- diffusers' timestep spacings ----------------------------------------------------------------------------


def diffusers_timesteps(
    spacing: str, steps: int, num_train_timesteps: int = 1000, steps_offset: int = 0, *, family: str = "euler"
) -> np.ndarray:
    """The timesteps a diffusers scheduler's `set_timesteps(steps)` chooses, descending.

    "linspace", "leading" and "trailing" are Table 2 of Lin et al. 2023; the schedulers implement them in
    three slightly different ways (`family`):
      "euler": Euler/Euler a/Heun/KDPM2/LMS (float32; fractional for linspace),
      "euler64": DPMSolverSDE (the same in float64),
      "ddim": DDIM/DDPM/PNDM (integers),
      "multistep": DPMSolverMultistep/UniPC (integers from steps + 1 points, the last dropped).
    """
    n, N = steps, num_train_timesteps
    if spacing not in ("linspace", "leading", "trailing"):
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; choose 'linspace', 'leading' or 'trailing'")
    if family in ("euler", "euler64"):
        dtype = np.float32 if family == "euler" else np.float64
        if spacing == "linspace":
            return np.linspace(0, N - 1, n, dtype=dtype)[::-1].copy()
        if spacing == "leading":
            return (np.arange(0, n) * (N // n)).round()[::-1].astype(dtype) + steps_offset
        return np.arange(N, 0, -N / n).round().astype(dtype) - 1
    if family == "ddim":
        if spacing == "linspace":
            return np.linspace(0, N - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n) * (N // n)).round()[::-1].astype(np.int64) + steps_offset
        return np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
    if family == "multistep":
        if spacing == "linspace":
            return np.linspace(0, N - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n + 1) * (N // (n + 1))).round()[::-1][:-1].astype(np.int64) + steps_offset
        return np.arange(N, 0, -N / n).round().astype(np.int64) - 1
    raise ValueError(f"unknown timestep family {family!r}")


# --- img2img -------------------------------------------------------------------------------------------------


def check_steps(steps: int) -> None:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")


def img2img_steps(steps: int, strength: float) -> int:
    """How many of `steps` run when img2img starts from an image noised to `strength`.

    As diffusers' `get_timesteps`: the last int(steps * strength) steps of the full schedule run (strength 1.0
    runs them all from pure noise); the image is noised to the first noise level that runs.
    """
    check_steps(steps)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise ValueError(
            f"strength {strength} with {steps} steps runs int({steps} * {strength}) = 0 denoising steps; "
            f"raise strength to at least {1 / steps:.3g} or use more steps"
        )
    return run
