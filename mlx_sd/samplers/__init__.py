"""Samplers: the update rules that walk a list of noise levels, one signature for all (see `common`).

Choose one with `plan_sampling(name, schedule, steps, ...)`, which returns a `SamplingPlan` (the sampler, its
sigmas and options, the initial noise scale, how to map latents for decoding); `list_samplers()` lists them.
"""

from .common import ancestral_step, noise_like, to_d, vp_rescale
from .ddim import ddim, ddpm, plms
from .dpm import dpm_2, dpm_2_ancestral
from .dpmpp import brownian_pair, dpmpp_2m, dpmpp_2m_sde, dpmpp_2s_ancestral, dpmpp_3m_sde, dpmpp_sde
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
from .plan import FOLLOW, SamplingPlan, plan_sampling
from .registry import DIFFUSERS_CLASSES, FLOW_SAMPLERS, SAMPLERS, Sampler, list_samplers, resolve, sampler_table

__all__ = [
    "DIFFUSERS_CLASSES",
    "FLOW_SAMPLERS",
    "FOLLOW",
    "SAMPLERS",
    "Sampler",
    "SamplingPlan",
    "ancestral_step",
    "brownian_pair",
    "ddim",
    "ddpm",
    "dpm_2",
    "dpm_2_ancestral",
    "dpm_2_ancestral_flow",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_flow",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_flow",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_flow",
    "dpmpp_sde",
    "dpmpp_sde_flow",
    "euler",
    "euler_ancestral",
    "euler_ancestral_flow",
    "heun",
    "lcm",
    "list_samplers",
    "lms",
    "noise_like",
    "plan_sampling",
    "plms",
    "resolve",
    "sampler_table",
    "to_d",
    "vp_rescale",
]
