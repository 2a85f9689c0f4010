"""Running a sampler exactly as a diffusers scheduler runs it, from a model's scheduler_config.

`diffusers_plan` configures a scheduler class as `Class.from_config(config)` would (the class's own defaults for
missing keys, `_use_default_values` honoured) and computes what makes our VE-space sampler take that scheduler's
steps: its sigmas, the timesteps it feeds the model, its quirks as sampler options (DDIM/PNDM landing on
t - 1000 // steps, LMS img2img coefficients, DPM-Solver's lower-order final step) and its initial noise scale.
Only the settings that published Stable Diffusion configs use are supported; the others are errors that say so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from ..schedules import (
    FLOW_SCHEDULER,
    ZERO_SNR_EXACT_ALPHA_BAR,
    NoiseSchedule,
    ScheduleType,
    diffusers_timesteps,
    exponential_sigmas,
    img2img_steps,
    karras_sigmas,
)
from .registry import SAMPLERS, Sampler

_TRAINING = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                 trained_betas=None, prediction_type="epsilon")  # fmt: skip
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012)
_FLAGS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_CLIP = dict(clip_sample=True, clip_sample_range=1.0, thresholding=False)
_ZSNR = dict(rescale_betas_zero_snr=False)
_SPACING = dict(timestep_spacing="linspace", steps_offset=0)
_MULTISTEP = dict(solver_order=2, thresholding=False, lower_order_final=True, use_flow_sigmas=False,
                  final_sigmas_type="zero", use_dynamic_shifting=False)  # fmt: skip

# The constructor defaults (diffusers 0.42) of the keys each class reads; other config keys are ignored, as
# diffusers ignores them. tests/test_schedules.py checks these against the installed diffusers.
DIFFUSERS_DEFAULTS: dict[str, dict] = {
    "EulerDiscreteScheduler": {**_TRAINING, **_FLAGS, **_SPACING, **_ZSNR, "interpolation_type": "linear",
                               "sigma_min": None, "sigma_max": None, "timestep_type": "discrete",
                               "final_sigmas_type": "zero"},
    "EulerAncestralDiscreteScheduler": {**_TRAINING, **_SPACING, **_ZSNR},
    "HeunDiscreteScheduler": {**_TRAINING, **_SD_BETAS, **_FLAGS, **_SPACING, "clip_sample": False,
                              "clip_sample_range": 1.0},
    "KDPM2DiscreteScheduler": {**_TRAINING, **_SD_BETAS, **_FLAGS, **_SPACING},
    "KDPM2AncestralDiscreteScheduler": {**_TRAINING, **_SD_BETAS, **_FLAGS, **_SPACING},
    "LMSDiscreteScheduler": {**_TRAINING, **_FLAGS, **_SPACING},
    "DPMSolverSDEScheduler": {**_TRAINING, **_SD_BETAS, **_FLAGS, **_SPACING},
    "DDIMScheduler": {**_TRAINING, **_CLIP, **_ZSNR, "set_alpha_to_one": True, "timestep_spacing": "leading",
                      "steps_offset": 0},
    "DDPMScheduler": {**_TRAINING, **_CLIP, **_ZSNR, "variance_type": "fixed_small", "timestep_spacing": "leading",
                      "steps_offset": 0},
    "PNDMScheduler": {**_TRAINING, "skip_prk_steps": False, "set_alpha_to_one": False, "timestep_spacing": "leading",
                      "steps_offset": 0},
    "DPMSolverMultistepScheduler": {**_TRAINING, **_FLAGS, **_SPACING, **_ZSNR, **_MULTISTEP,
                                    "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                                    "euler_at_final": False, "use_lu_lambdas": False,
                                    "lambda_min_clipped": -math.inf, "variance_type": None},
    "UniPCMultistepScheduler": {**_TRAINING, **_FLAGS, **_SPACING, **_ZSNR, **_MULTISTEP, "predict_x0": True,
                                "solver_type": "bh2", "disable_corrector": [], "solver_p": None,
                                "sigma_min": None, "sigma_max": None},
    "LCMScheduler": {**_TRAINING, **_SD_BETAS, "beta_schedule": "scaled_linear", "original_inference_steps": 50,
                     "clip_sample": False, "clip_sample_range": 1.0, "thresholding": False, "set_alpha_to_one": True,
                     "steps_offset": 0, "timestep_spacing": "leading", "timestep_scaling": 10.0, **_ZSNR},
    FLOW_SCHEDULER: {"num_train_timesteps": 1000, "shift": 1.0, **_FLAGS, "use_dynamic_shifting": False,
                     "invert_sigmas": False, "shift_terminal": None, "stochastic_sampling": False},
}  # fmt: skip
_VE_CLASSES = {"EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
               "HeunDiscreteScheduler": "Heun", "KDPM2DiscreteScheduler": "DPM2",
               "KDPM2AncestralDiscreteScheduler": "DPM2 a", "LMSDiscreteScheduler": "LMS",
               "DPMSolverSDEScheduler": "DPM++ SDE"}  # fmt: skip
_NO_SAMPLE_PREDICTION = {"EulerAncestralDiscreteScheduler", "KDPM2DiscreteScheduler", "PNDMScheduler",
                         "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"}  # fmt: skip


def scheduler_settings(class_name: str, config: Mapping, overrides: Mapping = ()) -> dict:
    """The settings `class_name.from_config(config, **overrides)` ends up with, for the keys we read."""
    defaults = DIFFUSERS_DEFAULTS[class_name]
    used_defaults = set(config.get("_use_default_values", ()))  # keys saved as defaults: the class's own apply
    settings = {k: config.get(k, d) if k not in used_defaults else d for k, d in defaults.items()}
    overrides = dict(overrides)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"{class_name} has no setting {unknown}; settings read here: {sorted(defaults)}")
    return {**settings, **overrides}


def _require(class_name: str, settings: Mapping, **supported) -> None:
    for key, value in supported.items():
        if key in settings and settings[key] != value:
            raise ValueError(
                f"{class_name} with {key}={settings.get(key)!r} is not supported (only {key}={value!r}); "
                "use another sampler or remove the setting"
            )


def _level(schedule: NoiseSchedule, final: float):
    """sigma at an integer timestep, or `final` below 0 (DDIM/PNDM's `final_alpha_cumprod`)."""
    return lambda t: float(schedule.sigmas[int(t)]) if t >= 0 else final


def _plan(sampler, schedule, sigmas, timesteps, run, options, latent_space, init, class_name, label, extra=None):
    """Truncate per-step lists for img2img (the last `run` steps) and assemble the plan's fields."""
    start = len(sigmas) - 1 - run
    table = {float(s): float(np.float32(t)) for s, t in zip(sigmas[start:-1], timesteps[start:])}
    table.update(extra or {})
    return dict(sampler=sampler, schedule=schedule, sigmas=tuple(float(s) for s in sigmas[start:]), options=options,
                timesteps=table, init_noise_sigma=float(init), latent_space=latent_space,
                follows=f"diffusers {class_name}", schedule_label=label)  # fmt: skip


def _f32(values) -> list[float]:
    return [float(v) for v in np.asarray(values, np.float64).astype(np.float32)]


def _converted_sigmas(settings, sig, steps, sigma_min=None, sigma_max=None):
    """use_karras_sigmas / use_exponential_sigmas between the ends of `sig` (or the configured ends)."""
    lo = sigma_min if sigma_min is not None else float(sig[-1])
    hi = sigma_max if sigma_max is not None else float(sig[0])
    if settings.get("use_karras_sigmas"):
        return karras_sigmas(steps, lo, hi), "karras"
    return exponential_sigmas(steps, lo, hi), "exponential"


def _euler_family(class_name, settings, schedule, steps, run, options):
    _require(class_name, settings, use_beta_sigmas=False)
    if class_name == "EulerDiscreteScheduler":
        _require(class_name, settings, interpolation_type="linear", timestep_type="discrete")
    if class_name == "HeunDiscreteScheduler":
        _require(class_name, settings, clip_sample=False)
    N, spacing = schedule.num_train_timesteps, settings["timestep_spacing"]
    family = "euler64" if class_name == "DPMSolverSDEScheduler" else "euler"
    ts = diffusers_timesteps(spacing, steps, N, settings["steps_offset"], family=family)
    sig = np.interp(ts, np.arange(N), schedule.sigmas)
    label = f"{spacing} spacing"
    if settings.get("use_karras_sigmas") or settings.get("use_exponential_sigmas"):
        sig, label = _converted_sigmas(settings, sig, steps, settings.get("sigma_min"), settings.get("sigma_max"))
        ts = schedule.sigma_to_t(sig)
        if label == "karras" and class_name.startswith("KDPM2"):
            ts = np.round(ts)
        label = label.capitalize()
    final = schedule.sigma_min if settings.get("final_sigmas_type") == "sigma_min" else 0.0
    sigmas = _f32(np.concatenate([sig, [final]]))
    sigma_max = max(sigmas)
    init = sigma_max if spacing in ("linspace", "trailing") else math.sqrt(sigma_max**2 + 1)
    sampler = SAMPLERS[_VE_CLASSES[class_name]]
    if class_name == "LMSDiscreteScheduler":
        options = {"skipped_sigmas": tuple(sigmas[: steps - run]), **options}
    return _plan(sampler, schedule, sigmas, ts, run, options, "ve", init, class_name, label)


def _ddim_family(class_name, settings, schedule, steps, run, options):
    _require(class_name, settings, thresholding=False)
    if class_name == "DDPMScheduler":
        _require(class_name, settings, variance_type="fixed_small")
    N, spacing = schedule.num_train_timesteps, settings["timestep_spacing"]
    ts = diffusers_timesteps(spacing, steps, N, settings["steps_offset"], family="ddim")
    options = {"clip_sample": settings["clip_sample"], "clip_sample_range": settings["clip_sample_range"], **options}
    if class_name == "DDPMScheduler":  # steps to the next timestep of the list, the last to alpha_bar = 1
        sigmas = [float(schedule.sigmas[t]) for t in ts] + [0.0]
        return _plan(SAMPLERS["DDPM"], schedule, sigmas, ts, run, options, "vp",
                     math.sqrt(1 + sigmas[0] ** 2), class_name, f"{spacing} spacing")  # fmt: skip
    level = _level(schedule, 0.0 if settings["set_alpha_to_one"] else schedule.sigma_min)
    ratio = N // steps
    targets = [level(t - ratio) for t in ts]  # DDIM steps to t - N // steps, whatever the spacing
    sigmas = [level(t) for t in ts] + [targets[-1]]
    if targets != sigmas[1:]:
        options = {"targets": tuple(targets[steps - run :]), **options}
    return _plan(SAMPLERS["DDIM"], schedule, sigmas, ts, run, options, "vp", math.sqrt(1 + sigmas[0] ** 2),
                 class_name, f"{spacing} spacing")  # fmt: skip


def _pndm(class_name, settings, schedule, steps, run, options):
    _require(class_name, settings, skip_prk_steps=True)
    N, spacing, offset = schedule.num_train_timesteps, settings["timestep_spacing"], settings["steps_offset"]
    ratio = N // steps
    if spacing == "linspace":
        ascending = np.linspace(0, N - 1, steps).round().astype(np.int64)
    elif spacing == "leading":
        ascending = (np.arange(0, steps) * ratio).round().astype(np.int64) + offset
    else:
        ascending = diffusers_timesteps("trailing", steps, N, family="ddim")[::-1]
    # the model calls: the second-to-last timestep repeated (the pseudo improved-Euler first step), newest first
    calls = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    calls = [int(t) for t in calls[steps - run :]]  # img2img slices the call list itself (PNDM has order 1)
    level = _level(schedule, 0.0 if settings["set_alpha_to_one"] else schedule.sigma_min)
    if len(calls) == 1:
        sigmas, targets, evals, first_step, extra = [level(calls[0]), level(calls[0] - ratio)], None, calls, None, {}
    else:
        # step 0 = calls 0 and 1; step j >= 1 = call j + 1, landing on t - N // steps
        evals = [calls[0]] + calls[2:]
        targets = [level(calls[1])] + [level(t - ratio) for t in calls[2:]]
        sigmas = [level(t) for t in evals] + [targets[-1]]
        first_step = (level(calls[0] - ratio), level(calls[1]), level(calls[1] + ratio))
        extra = {level(calls[1]): float(calls[1])}
    if schedule.prediction_type == "v_prediction":
        options = {"history": "v", **options}  # diffusers' PNDM combines raw v outputs
    if first_step is not None and (first_step != (targets[0], targets[0], sigmas[0]) or len(evals) == 1):
        options = {"first_step": first_step, **options}
    if targets is not None and targets != sigmas[1:]:
        options = {"targets": tuple(targets), **options}
    return _plan(SAMPLERS["PLMS"], schedule, sigmas, evals, len(sigmas) - 1, options, "vp",
                 math.sqrt(1 + sigmas[0] ** 2), class_name, f"{spacing} spacing", extra)  # fmt: skip


def _multistep(class_name, settings, schedule, steps, run, options):
    _require(class_name, settings, thresholding=False, use_beta_sigmas=False, use_flow_sigmas=False,
             use_dynamic_shifting=False)  # fmt: skip
    N, spacing = schedule.num_train_timesteps, settings["timestep_spacing"]
    ts = diffusers_timesteps(spacing, steps, N, settings["steps_offset"], family="multistep")
    unipc = class_name == "UniPCMultistepScheduler"
    table, label = schedule.sigmas, f"{spacing} spacing"
    if settings.get("use_karras_sigmas") or settings.get("use_exponential_sigmas"):
        # both convert between the ends of the whole training table
        ends = (settings.get("sigma_min"), settings.get("sigma_max")) if unipc else (None, None)
        sig, label = _converted_sigmas(settings, table[::-1], steps, *ends)
        ts = schedule.sigma_to_t(sig)
        if label == "karras" and schedule.beta_schedule != "squaredcos_cap_v2":
            ts = np.round(ts)
        ts = ts.astype(np.int64)  # diffusers stores int64 timesteps: a fractional one is truncated
        label = label.capitalize()
        last = float(sig[-1]) if unipc else schedule.sigma_min
    else:
        sig, last = table[ts], schedule.sigma_min
    sigmas = _f32(np.concatenate([sig, [last if settings["final_sigmas_type"] == "sigma_min" else 0.0]]))
    init = math.sqrt(1 + sigmas[0] ** 2)
    order = settings["solver_order"]
    if unipc:
        _require(class_name, settings, predict_x0=True, solver_p=None)
        options = {"order": order, "variant": settings["solver_type"],
                   "lower_order_final": settings["lower_order_final"],
                   "disable_corrector": tuple(settings["disable_corrector"]), **options}  # fmt: skip
        return _plan(SAMPLERS["UniPC"], schedule, sigmas, ts, run, options, "vp", init, class_name, label)
    _require(class_name, settings, solver_order=2, use_lu_lambdas=False, variance_type=None,
             lambda_min_clipped=-math.inf)  # fmt: skip
    algorithm = settings["algorithm_type"]
    if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"{class_name} with algorithm_type={algorithm!r} is not supported; use 'dpmsolver++' or "
                         "'sde-dpmsolver++'")  # fmt: skip
    # diffusers makes the last step first order with few steps; to sigma 0 it is first order anyway
    lower_final = settings["euler_at_final"] or (settings["lower_order_final"] and steps < 15)
    options = {"solver_type": settings["solver_type"], "lower_order_final": lower_final, **options}
    if algorithm == "dpmsolver++":
        sampler = SAMPLERS["DPM++ 2M"]
    else:
        sampler = SAMPLERS["DPM++ 2M SDE Heun" if settings["solver_type"] == "heun" else "DPM++ 2M SDE"]
    return _plan(sampler, schedule, sigmas, ts, run, options, "vp", init, class_name, label)


def _lcm(class_name, settings, schedule, steps, run, options):
    _require(class_name, settings, thresholding=False)
    N, original = schedule.num_train_timesteps, settings["original_inference_steps"]
    origin = (np.arange(1, original + 1) * (N // original) - 1)[::-1]  # the distillation schedule
    if steps > original:
        raise ValueError(f"LCM runs at most original_inference_steps={original} steps, got {steps}")
    ts = origin[np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)]
    sigmas = [float(schedule.sigmas[t]) for t in ts] + [0.0]
    options = {"timestep_scaling": settings["timestep_scaling"], "clip_sample": settings["clip_sample"],
               "clip_sample_range": settings["clip_sample_range"], **options}  # fmt: skip
    return _plan(SAMPLERS["LCM"], schedule, sigmas, ts, run, options, "vp", math.sqrt(1 + sigmas[0] ** 2),
                 class_name, f"LCM schedule ({original} distillation steps)")  # fmt: skip


def _flow_match(class_name, settings, schedule, steps, run, options):
    """FlowMatchEulerDiscreteScheduler: `steps` timesteps evenly spaced between 1000 * the table's ends, then
    shifted. The table's ends are shifted already, so the shift applies twice (diffusers 0.42, SD3's pipeline)."""
    _require(class_name, settings, **_FLAGS, use_dynamic_shifting=False, invert_sigmas=False, shift_terminal=None,
             stochastic_sampling=False)  # fmt: skip
    N, shift = schedule.num_train_timesteps, settings["shift"]
    s = np.linspace(float(schedule.sigmas[-1]) * N, float(schedule.sigmas[0]) * N, steps) / N  # float64, as diffusers
    sig = (shift * s / (1 + (shift - 1) * s)).astype(np.float32)
    sigmas = _f32(np.concatenate([sig, [0.0]]))
    ts = sig * np.float32(N)
    return _plan(SAMPLERS["Euler"], schedule, sigmas, ts, run, options, "ve", sigmas[0], class_name,
                 f"shift {shift:g}")  # fmt: skip


_BUILDERS = {
    FLOW_SCHEDULER: _flow_match,
    **{name: _euler_family for name in _VE_CLASSES},
    "DDIMScheduler": _ddim_family,
    "DDPMScheduler": _ddim_family,
    "PNDMScheduler": _pndm,
    "DPMSolverMultistepScheduler": _multistep,
    "UniPCMultistepScheduler": _multistep,
    "LCMScheduler": _lcm,
}


def diffusers_plan(entry: Sampler, class_name: str | None, stype: ScheduleType | None, schedule: NoiseSchedule,
                   steps: int, strength: float, overrides: Mapping, options: Mapping,
                   run_steps: int | None = None) -> dict:  # fmt: skip
    """The fields of a `SamplingPlan` that runs `entry` (or `class_name`) as diffusers does (the last `run_steps`
    steps, by default diffusers' int(steps * strength))."""
    implied = {} if class_name else dict(entry.diffusers_config)
    if schedule.is_flow:  # a rectified-flow model runs its own scheduler class, or none
        if class_name not in (None, FLOW_SCHEDULER) or entry.name != "Euler":
            raise ValueError(f"a rectified-flow model (SD3) runs only {FLOW_SCHEDULER} ('Euler') with "
                             "follow='diffusers'; use follow='a1111' for the other samplers")  # fmt: skip
        class_name, implied = FLOW_SCHEDULER, {}
    elif class_name == FLOW_SCHEDULER:
        raise ValueError(f"{FLOW_SCHEDULER} runs rectified-flow models (SD3) only; this model is a diffusion model")
    class_name = class_name or entry.diffusers
    if class_name is None:
        raise ValueError(f"sampler {entry.name!r} has no diffusers scheduler; use follow='a1111'")
    if stype is not None and stype.name != "uniform":
        if stype.diffusers_flag not in DIFFUSERS_DEFAULTS[class_name]:
            raise ValueError(f"schedule type {stype.label!r} has no counterpart in diffusers' {class_name}; "
                             "use follow='a1111' or another schedule type")  # fmt: skip
        implied[stype.diffusers_flag] = True
    settings = scheduler_settings(class_name, schedule.scheduler_config, {**implied, **overrides})
    # the training schedule as this class builds it
    schedule = NoiseSchedule.from_config({**settings, "_class_name": class_name})
    if class_name in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler"):  # exact alpha_bar = 0 at zero terminal SNR
        schedule = dataclasses.replace(schedule, terminal_alpha_bar=ZERO_SNR_EXACT_ALPHA_BAR)
    if schedule.prediction_type == "sample" and class_name in _NO_SAMPLE_PREDICTION:
        raise ValueError(f"{class_name} cannot run a model with prediction_type='sample' (diffusers raises too); "
                         "choose Euler, Heun, LMS, DDIM, DDPM, DPM++ 2M, UniPC or LCM")  # fmt: skip
    if steps > schedule.num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the model's {schedule.num_train_timesteps} training steps")
    run = img2img_steps(steps, strength) if run_steps is None else run_steps
    return _BUILDERS[class_name](class_name, settings, schedule, steps, run, dict(options))
