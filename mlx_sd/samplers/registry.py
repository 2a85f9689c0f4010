"""The sampler registry: A1111 display names, aliases, what each name runs, and name resolution."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..schedules import FLOW_SCHEDULER, SCHEDULE_TYPES, ScheduleType, schedule_type
from .ddim import ddim, ddpm, plms
from .dpm import dpm_2, dpm_2_ancestral
from .dpmpp import dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde, dpmpp_sde
from .euler import euler, euler_ancestral, heun
from .flow import (
    dpm_2_ancestral_flow,
    dpmpp_2m_sde_flow,
    dpmpp_2s_ancestral_flow,
    dpmpp_3m_sde_flow,
    dpmpp_sde_flow,
    euler_ancestral_flow,
)
from .lcm import lcm
from .lms import lms
from .unipc import unipc


@dataclass(frozen=True)
class Sampler:
    """One sampler as users name it.

    Attributes:
        name: A1111's display name ("DPM++ 2M").
        function: the generator function (see `common` for the signature).
        aliases: other accepted names (A1111's `k_*` names, ComfyUI's names), matched case-insensitively.
        stochastic: whether it draws noise at every step (needs a noise source).
        model_calls: model evaluations per step.
        kdiffusion: the k-diffusion function A1111 runs for this name; None when A1111's name is a diffusers-style
            scheduler (DDIM, PLMS, UniPC, ...), which then always follows diffusers.
        default_schedule: the schedule type A1111's "Automatic" picks for this sampler.
        discard_penultimate: A1111 computes steps + 1 sigmas and drops the next-to-last one (DPM2, 3M SDE).
        options: options this name fixes ("DPM++ 2M SDE Heun" = 2M SDE with solver_type="heun").
        diffusers: the diffusers scheduler class that runs this name with follow="diffusers".
        diffusers_config: scheduler_config values the name implies for that class.
        brownian: A1111 draws its noise from a Brownian tree seeded per image (k-diffusion's
            `BrownianTreeNoiseSampler`; mlx_sd/samplers/brownian.py), not one fresh draw per step.
        flow: the function that runs this name on a rectified-flow model (SD3), with the same options: the ODE
            solvers themselves, the stochastic samplers ComfyUI's flow arithmetic (`flow.py`); None: refused there
            (the sampler's noise or VP arithmetic assumes a diffusion model).
    """

    name: str
    function: Callable
    aliases: tuple[str, ...] = ()
    stochastic: bool = False
    model_calls: int = 1
    kdiffusion: str | None = None
    default_schedule: str = "uniform"
    discard_penultimate: bool = False
    options: Mapping = field(default_factory=dict)
    diffusers: str | None = None
    diffusers_config: Mapping = field(default_factory=dict)
    brownian: bool = False
    flow: Callable | None = None

    @property
    def follows(self) -> str:
        """Which reference the A1111 name reproduces."""
        if self.kdiffusion:
            return f"k-diffusion {self.kdiffusion} (as A1111 runs it)"
        return f"diffusers {self.diffusers}"


_SDE = {"algorithm_type": "sde-dpmsolver++"}
SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("Euler a", euler_ancestral, ("k_euler_a", "k_euler_ancestral", "euler_ancestral"), True, 1,
                "sample_euler_ancestral", diffusers="EulerAncestralDiscreteScheduler", flow=euler_ancestral_flow),
        Sampler("Euler", euler, ("k_euler",), False, 1, "sample_euler", diffusers="EulerDiscreteScheduler",
                flow=euler),
        Sampler("LMS", lms, ("k_lms",), False, 1, "sample_lms", diffusers="LMSDiscreteScheduler", flow=lms),
        Sampler("Heun", heun, ("k_heun",), False, 2, "sample_heun", diffusers="HeunDiscreteScheduler", flow=heun),
        Sampler("DPM2", dpm_2, ("k_dpm_2", "dpm_2"), False, 2, "sample_dpm_2", "karras", True,
                diffusers="KDPM2DiscreteScheduler", flow=dpm_2),
        Sampler("DPM2 a", dpm_2_ancestral, ("k_dpm_2_a", "dpm_2_ancestral"), True, 2, "sample_dpm_2_ancestral",
                "karras", True, diffusers="KDPM2AncestralDiscreteScheduler", flow=dpm_2_ancestral_flow),
        Sampler("DPM++ 2S a", dpmpp_2s_ancestral, ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), True, 2,
                "sample_dpmpp_2s_ancestral", "karras", flow=dpmpp_2s_ancestral_flow),
        Sampler("DPM++ 2M", dpmpp_2m, ("k_dpmpp_2m", "dpmpp_2m"), False, 1, "sample_dpmpp_2m", "karras",
                diffusers="DPMSolverMultistepScheduler", flow=dpmpp_2m),
        Sampler("DPM++ SDE", dpmpp_sde, ("k_dpmpp_sde", "dpmpp_sde"), True, 2, "sample_dpmpp_sde", "karras",
                diffusers="DPMSolverSDEScheduler", brownian=True, flow=dpmpp_sde_flow),
        Sampler("DPM++ 2M SDE", dpmpp_2m_sde, ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), True, 1, "sample_dpmpp_2m_sde",
                "exponential", diffusers="DPMSolverMultistepScheduler", diffusers_config=_SDE, brownian=True,
                flow=dpmpp_2m_sde_flow),
        Sampler("DPM++ 2M SDE Heun", dpmpp_2m_sde, ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"), True, 1,
                "sample_dpmpp_2m_sde", "exponential", options={"solver_type": "heun"},
                diffusers="DPMSolverMultistepScheduler", diffusers_config={**_SDE, "solver_type": "heun"},
                brownian=True, flow=dpmpp_2m_sde_flow),
        Sampler("DPM++ 3M SDE", dpmpp_3m_sde, ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), True, 1, "sample_dpmpp_3m_sde",
                "exponential", True, brownian=True, flow=dpmpp_3m_sde_flow),
        Sampler("DDIM", ddim, ("ddim",), False, 1, diffusers="DDIMScheduler"),
        Sampler("DDPM", ddpm, ("ddpm",), True, 1, diffusers="DDPMScheduler"),
        Sampler("PLMS", plms, ("PNDM", "plms", "pndm"), False, 1, diffusers="PNDMScheduler"),
        Sampler("UniPC", unipc, ("uni_pc", "unipc"), False, 1, diffusers="UniPCMultistepScheduler"),
        Sampler("LCM", lcm, ("lcm",), True, 1, diffusers="LCMScheduler"),
    )
}  # fmt: skip


def list_samplers() -> list[Sampler]:
    """Every sampler, in A1111's order."""
    return list(SAMPLERS.values())


def sampler_table() -> list[dict]:
    """The listing users see (CLI, HTTP): one plain dict per sampler."""
    return [
        {
            "name": s.name,
            "aliases": list(s.aliases),
            "stochastic": s.stochastic,
            "model_calls_per_step": s.model_calls,
            "default_schedule": SCHEDULE_TYPES[s.default_schedule].label if s.kdiffusion else None,
            "follows": s.follows,
            "diffusers": s.diffusers,
            "options": [p.name for p in inspect.signature(s.function).parameters.values() if p.kind is p.KEYWORD_ONLY],
            "rectified_flow": s.flow is not None,  # runs SD3 (ComfyUI's flow arithmetic for the stochastic ones)
        }
        for s in SAMPLERS.values()
    ]


def _lookup() -> dict[str, Sampler]:
    table = {}
    for s in SAMPLERS.values():
        for key in (s.name, *s.aliases):
            table[key.lower()] = s
    return table


def _unknown(name: str) -> ValueError:
    names = [s.name for s in SAMPLERS.values()]
    spellings = [*names, *(a for s in SAMPLERS.values() for a in s.aliases), *DIFFUSERS_CLASSES]
    spellings += [f"{n} {st.label}" for n in names for st in SCHEDULE_TYPES.values()]  # legacy combined names
    by_lower = {s.lower(): s for s in spellings}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(by_lower[c]) for c in close)}?" if close else ""
    return ValueError(f"unknown sampler {name!r}{hint} Valid samplers: {', '.join(names)}")


# diffusers class name -> the sampler whose default algorithm it runs (the config can change it, e.g. algorithm_type)
DIFFUSERS_CLASSES = {
    s.diffusers: s.name for s in reversed(list(SAMPLERS.values())) if s.diffusers and not s.diffusers_config
} | {FLOW_SCHEDULER: "Euler"}  # rectified-flow models' (SD3) Euler
# What runs rectified-flow models (SD3, mlx_sd/schedules.py), in A1111's order: the names with a `flow` function
FLOW_SAMPLERS = tuple(s.name for s in SAMPLERS.values() if s.flow is not None)


def check_flow_sampler(entry: Sampler) -> None:
    """Refuse, by name, a sampler that cannot run a rectified-flow model (SD3)."""
    if entry.flow is None:
        raise ValueError(f"sampler {entry.name!r} does not run rectified-flow models (SD3): its noise or VP "
                         f"arithmetic assumes a diffusion model; choose one of {list(FLOW_SAMPLERS)}")  # fmt: skip


def resolve(name: str, schedule: str | None = None) -> tuple[Sampler, ScheduleType | None, str | None]:
    """Turn a user's sampler name into (sampler, schedule type, diffusers class).

    Accepts A1111 display names and aliases ("DPM++ 2M", "k_dpmpp_2m"), A1111's legacy combined names with a
    schedule type suffix ("DPM++ 2M Karras", "DPM++ 2M SDE Exponential"), and diffusers scheduler class names
    ("EulerDiscreteScheduler"; the third element is then that class). `schedule` is an explicit schedule type
    ("Karras"; None or "Automatic" for the sampler's default).

    Raises:
        ValueError: unknown name (listing valid names and close matches), unknown schedule type, or a combined
            name whose suffix contradicts `schedule`.
    """
    key = name.strip()
    explicit = schedule_type(schedule) if schedule is not None else None
    diffusers_class = next((c for c in DIFFUSERS_CLASSES if c.lower() == key.lower()), None)
    if diffusers_class is not None:
        return SAMPLERS[DIFFUSERS_CLASSES[diffusers_class]], explicit, diffusers_class
    table = _lookup()
    if key.lower() in table:
        return table[key.lower()], explicit, None
    for st in SCHEDULE_TYPES.values():  # A1111 legacy "<sampler> <schedule type>" names
        for suffix in (st.label, st.name, *st.aliases):
            if key.lower().endswith(" " + suffix.lower()):
                base = key[: -len(suffix) - 1].strip()
                if base.lower() in table:
                    if explicit is not None and explicit is not st:
                        raise ValueError(
                            f"sampler {name!r} names schedule type {st.label!r} but schedule={schedule!r} was also "
                            f"given; pass sampler={base!r} with the schedule you want"
                        )
                    return table[base.lower()], st, None
    raise _unknown(name)
