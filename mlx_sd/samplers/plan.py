"""A sampling plan: a sampler, the noise levels it walks and everything else the pipeline needs to run it.

Two ways to choose one (`plan_sampling(..., follow=...)`):
- "a1111" (the default for A1111 names): the k-diffusion function A1111 runs, over A1111's sigmas for the chosen
  "Schedule type" (Automatic = the sampler's own default), computed from the model's alphas_cumprod.
- "diffusers": the diffusers scheduler for that name (e.g. "DPM++ 2M Karras" -> DPMSolverMultistepScheduler with
  use_karras_sigmas=True), configured from the model's scheduler_config.json exactly as
  `Scheduler.from_config(config)` would be, stepping as that scheduler steps (`as_diffusers.py`).
Names without a k-diffusion function (DDIM, DDPM, PLMS, UniPC, LCM) always follow diffusers.

img2img (`strength` < 1) follows diffusers' rule in both cases: the last int(steps * strength) steps run.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from ..denoiser import Denoiser, ModelFn
from ..schedules import SCHEDULE_TYPES, NoiseSchedule, ScheduleType, check_steps, img2img_steps
from .as_diffusers import diffusers_plan
from .brownian import brownian_noise
from .registry import Sampler, check_flow_sampler, list_samplers, resolve

FOLLOW = ("a1111", "diffusers")
# The schedule types defined for rectified flow (ComfyUI's, by the same names); "uniform" and "ddim" index a
# diffusion model's timestep table.
FLOW_SCHEDULE_TYPES = ("normal", "simple", "sgm_uniform", "karras", "exponential", "polyexponential", "kl_optimal")


@dataclass(frozen=True)
class SamplingPlan:
    """What to run: `plan.sample(model, x, rng)` yields the latent after every step.

    Attributes:
        sampler: the registry entry whose function runs.
        schedule: the model's `NoiseSchedule` (for follow="diffusers", as the scheduler class configures it).
        sigmas: the VE noise levels walked, decreasing; `steps` = len(sigmas) - 1 (after img2img truncation).
        options: keyword options for the sampler function.
        timesteps: exact {sigma: t} the reference feeds the model (diffusers); other sigmas use log-interpolation.
        init_noise_sigma: txt2img starts from `noise * init_noise_sigma` (diffusers' quirks included: Euler with
            "leading" spacing starts at sqrt(sigma_max^2 + 1); VP schedulers start from unit VP noise).
        latent_space: "ve" or "vp": the space the reference holds its latents in (k-diffusion and diffusers'
            Euler-style schedulers: VE; DDIM, PNDM, DPM-Solver, UniPC, LCM: VP). It decides what is decoded when
            the last sigma is not 0 (diffusers' DDIM with set_alpha_to_one=False ends at alpha_bar[0]).
        follows: which reference this plan reproduces, in words.
        schedule_label: the schedule type or spacing, in words.
        noise_interval: (sigma_min, sigma_max) of A1111's Brownian tree for samplers that draw from one
            (`Sampler.brownian`): the whole schedule's smallest nonzero and largest sigma, img2img included (flow
            models: their flow sigmas, up to 1, as ComfyUI spans its tree).
    """

    sampler: Sampler
    schedule: NoiseSchedule
    sigmas: tuple[float, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    timesteps: Mapping[float, float] = field(default_factory=dict)
    init_noise_sigma: float = 1.0
    latent_space: str = "ve"
    follows: str = ""
    schedule_label: str = ""
    noise_interval: tuple[float, float] | None = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def function(self) -> Callable:
        """The sampler function that runs: the entry's `flow` variant for a rectified-flow model (SD3)."""
        return self.sampler.flow if self.schedule.is_flow else self.sampler.function

    def denoiser(self, model: ModelFn) -> Denoiser:
        return Denoiser(model, self.schedule, self.timesteps)

    def sample(self, model: ModelFn, x: mx.array, rng=None) -> Iterator[mx.array]:
        """Run the sampler: yields x (VE) after every step; `send()` replaces it (see `common`).

        With a `noise_interval`, noise comes from Brownian trees seeded by `rng`'s seeds (`brownian_noise`); a
        source without seeds (a replay of given draws) keeps giving one draw per step.
        """
        if self.sampler.stochastic and rng is None and self.options.get("eta", 1.0):
            raise ValueError(f"sampler {self.sampler.name!r} is stochastic: pass a noise source (rng)")
        if self.noise_interval is not None and rng is not None:
            rng = brownian_noise(rng, x.shape, *self.noise_interval) or rng
        return self.function(self.denoiser(model), x, self.sigmas, rng, **self.options)

    def initial_latents(self, noise: mx.array) -> mx.array:
        """txt2img: the starting latent from unit noise."""
        return noise * self.init_noise_sigma

    def noised_latents(self, x0: mx.array, noise: mx.array, level: int = 0) -> mx.array:
        """img2img/inpainting: the clean latent `x0` noised to `sigmas[level]` (diffusers' `add_noise` at the start
        step for level 0; after step i < steps - 1, level i + 1 is what inpainting pastes back; after the last step
        diffusers pastes `x0` itself). Flow models: (1 - sigma) x0 + sigma noise (diffusers' `scale_noise`)."""
        sigma = self.sigmas[level]
        if self.schedule.is_flow:
            return x0 * (1.0 - sigma) + noise * sigma
        return x0 + noise * sigma

    def to_reference(self, x: mx.array, level: int) -> mx.array:
        """The latent the reference holds at `sigmas[level]` (VP references: x / sqrt(1 + sigma^2))."""
        if self.latent_space == "ve":
            return x
        return x * (1.0 / math.sqrt(1.0 + self.sigmas[level] ** 2))

    def latents_to_decode(self, x: mx.array) -> mx.array:
        """The final latent the VAE decodes, given the sampler's last yield."""
        return self.to_reference(x, self.steps)

    def describe(self) -> dict:
        """For image metadata and logs."""
        return {"sampler": self.sampler.name, "schedule": self.schedule_label, "follows": self.follows,
                "steps": self.steps}  # fmt: skip


def _check_edm(entry: Sampler, diffusers_class: str | None, name: str) -> None:
    """EDM models (Playground v2.5, CosXL) run k-diffusion's samplers over their continuous sigmas; the DDPM-family
    schedulers (diffusers' classes, DDIM, PLMS, UniPC, LCM) index a diffusion model's timestep table."""
    if diffusers_class or entry.kdiffusion is None:
        runnable = [s.name for s in list_samplers() if s.kdiffusion is not None]
        raise ValueError(f"sampler {name!r} runs a diffusion model's (DDPM) timestep table; EDM models (Playground "
                         f"v2.5, CosXL) run {runnable} (diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler"
                         " are Euler and DPM++ 2M)")  # fmt: skip


def _check_options(sampler: Sampler, options: Mapping, flow: bool = False) -> None:
    function = sampler.flow if flow else sampler.function
    accepted = [
        p.name for p in inspect.signature(function).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"sampler {sampler.name!r} has no option {unknown}; its options: {accepted}")


def a1111_plan(sampler: Sampler, stype: ScheduleType | None, schedule: NoiseSchedule, steps: int, strength: float,
               options: Mapping, run_steps: int | None = None) -> SamplingPlan:  # fmt: skip
    """A k-diffusion sampler over A1111's sigmas (A1111 `KDiffusionSampler.get_sigmas`)."""
    if schedule.is_flow:  # "Automatic": the published scheduler's levels (ComfyUI's "normal" = diffusers' Euler)
        stype = stype or SCHEDULE_TYPES["normal"]
        if stype.name not in FLOW_SCHEDULE_TYPES:
            raise ValueError(f"schedule type {stype.label!r} indexes a diffusion model's timestep table; for a "
                             f"rectified-flow model (SD3) choose one of "
                             f"{[SCHEDULE_TYPES[n].label for n in FLOW_SCHEDULE_TYPES]}")  # fmt: skip
    stype = stype or SCHEDULE_TYPES[sampler.default_schedule]
    sigmas = stype.function(schedule, steps + 1 if sampler.discard_penultimate else steps)
    if sampler.discard_penultimate:
        sigmas = sigmas[:-2] + sigmas[-1:]
    # A1111 spans its Brownian tree over the whole schedule, also when img2img runs only its end; a single step to 0
    # draws no noise and spans no interval (k-diffusion's tree would refuse it)
    interval = (min(s for s in sigmas if s > 0), max(sigmas)) if sampler.brownian else None
    interval = interval if interval and interval[0] < interval[1] else None
    total = len(sigmas) - 1  # A1111's "DDIM" schedule type can give more levels than steps
    sigmas = sigmas[total - (img2img_steps(total, strength) if run_steps is None else run_steps) :]
    # on flow models ComfyUI's function of the same name (its CONST branch) is the reference
    follows = f"ComfyUI {sampler.kdiffusion} on rectified flow" if schedule.is_flow else sampler.follows
    return SamplingPlan(
        sampler, schedule, sigmas, {**sampler.options, **options}, init_noise_sigma=sigmas[0], latent_space="ve",
        follows=follows, schedule_label=stype.label, noise_interval=interval,
    )  # fmt: skip


def plan_sampling(
    sampler: str,
    schedule: NoiseSchedule,
    steps: int,
    *,
    schedule_type: str | None = None,
    strength: float = 1.0,
    follow: str | None = None,
    scheduler_config: Mapping | None = None,
    run_steps: int | None = None,
    **options,
) -> SamplingPlan:
    """Choose what to run for a sampler name, a model's schedule and a step count.

    Args:
        sampler: an A1111 name or alias ("Euler a", "DPM++ 2M", "k_lms"), a legacy combined name
            ("DPM++ 2M Karras"), or a diffusers scheduler class name ("EulerDiscreteScheduler", implies
            follow="diffusers").
        schedule: the model's `NoiseSchedule` (its `scheduler_config` configures follow="diffusers").
        steps: the number of steps of the full schedule (>= 1).
        schedule_type: A1111's "Schedule type" ("Karras", "Exponential", ...; None/"Automatic": the sampler's
            default). With follow="diffusers", "Karras"/"Exponential" set use_karras_sigmas/use_exponential_sigmas.
        strength: img2img strength in [0, 1]; the last int(steps * strength) steps run.
        follow: "a1111" or "diffusers" (see the module docstring); None picks "diffusers" for diffusers class names
            and for samplers without a k-diffusion function, else "a1111".
        scheduler_config: with follow="diffusers", values overriding the model's scheduler_config
            (e.g. {"timestep_spacing": "trailing"}).
        run_steps: run only the last `run_steps` steps of the schedule, whatever `strength` says (A1111's hires
            pass: a schedule of int(hires steps / strength) steps, of which the last hires steps run).
        **options: sampler options (eta, s_noise, ...; see the sampler function).

    Raises:
        ValueError: an unknown sampler or schedule type, steps < 1, strength outside [0, 1], a combination the
            reference cannot run (e.g. a prediction type the diffusers scheduler rejects), an unknown option.
    """
    entry, stype, diffusers_class = resolve(sampler, schedule_type)
    if schedule.is_flow:
        check_flow_sampler(entry)
    check_steps(steps)
    if run_steps is not None and not (isinstance(run_steps, int) and 1 <= run_steps <= steps):
        raise ValueError(f"run_steps={run_steps!r}: must be a whole number between 1 and steps ({steps})")
    if follow is not None and follow not in FOLLOW:
        raise ValueError(f"follow must be one of {FOLLOW}, got {follow!r}")
    if follow is None:
        follow = "diffusers" if diffusers_class or entry.kdiffusion is None else "a1111"
    if schedule.is_edm:
        _check_edm(entry, diffusers_class, sampler)
        follow = "a1111"  # diffusers' EDM schedulers are k-diffusion's Euler and DPM++ 2M over these sigmas
        stype = stype or SCHEDULE_TYPES[schedule.edm.sigma_schedule]  # "Automatic": the published sigma schedule
    if follow == "a1111" and diffusers_class:
        raise ValueError(f"{sampler!r} is a diffusers scheduler; use follow='diffusers' or an A1111 sampler name")
    if follow == "a1111" and scheduler_config:
        raise ValueError("scheduler_config only applies with follow='diffusers'")
    if follow == "a1111" and entry.kdiffusion is not None:
        _check_options(entry, options, schedule.is_flow)
        return a1111_plan(entry, stype, schedule, steps, strength, options, run_steps)
    fields = diffusers_plan(
        entry, diffusers_class, stype, schedule, steps, strength, scheduler_config or {}, options, run_steps
    )
    _check_options(fields["sampler"], fields["options"], schedule.is_flow)
    return SamplingPlan(**fields)
