"""Stable Diffusion 3 / 3.5 in the pipeline: the MMDiT's model function, its defaults and what it cannot run yet.

SD3 shares the pipeline's request, noise, samplers (in rectified-flow space, mlx_sd/schedules.py), VAE handling
(16 channels, shifted latents), img2img and inpainting (the known region pasted back after every step, as with a
4-channel UNet) with the UNet families. The conditioning is diffusers' `StableDiffusion3Pipeline.encode_prompt`
(mlx_sd/conditioning.py); the network takes it as one joint token sequence and a pooled vector, with no cross-attention
cache, no micro-conditioning and no added embeddings.

The features built on the UNet's layers (LoRA, ControlNet and T2I-Adapters, IP-Adapter, reference-only, textual
inversion, the refiner, the hires fix's second model) have no SD3 counterpart here yet; a request that asks for one is
refused by name before any work.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from .conditioning import Conditioning
from .denoiser import ModelFn, classifier_free_guidance
from .params import FamilyDefaults, defaults_for

# diffusers' model cards: SD3 medium 28 steps at CFG 7; SD3.5 large 28 at 3.5; SD3.5 medium 40 at 4.5.
SD35_LARGE = {"steps": 28, "guidance": 3.5}
SD35_MEDIUM = {"steps": 40, "guidance": 4.5}


def model_defaults(info, config) -> FamilyDefaults:
    """A converted model's defaults from its manifest (`ModelInfo`) and its denoiser's config."""
    base = defaults_for(info.family, info.prediction_type, info.kind)
    return sd3_defaults(base, config) if info.family == "sd3" and info.kind != "turbo" else base


def sd3_defaults(base: FamilyDefaults, config) -> FamilyDefaults:
    """The family's defaults for this release, told apart by its MMDiT (3.5: qk norms; 3.5 medium: MMDiT-X)."""
    if config.dual_attention_layers:
        return replace(base, **SD35_MEDIUM)
    if config.qk_norm:
        return replace(base, **SD35_LARGE)
    return base


def check_sd3_request(request, pipe) -> None:
    """Refuse, by name, what an SD3 model cannot run here (see the module docstring)."""
    from .lora import parse_lora_tags

    asked = {
        "a refiner": pipe.refiner is not None,
        "a hires model": pipe.hires_model is not None,
        "LoRAs": bool(pipe.loras) or any(parse_lora_tags(p)[1] for p in (request.prompt, request.negative_prompt)),
        "textual-inversion embeddings": bool(pipe.embeddings),
        "ControlNet units": bool(request.controlnet),
        "an IP-Adapter image": request.ip_adapter_image is not None,
        "the hires fix (enable_hr)": request.enable_hr,
        "seamless tiling": request.tiling,
        "s_min_uncond (NGMS)": request.s_min_uncond > 0,
    }
    wanted = [name for name, yes in asked.items() if yes]
    if wanted:
        raise ValueError(f"SD3 models do not support {', '.join(wanted)} yet; drop them from the request, or use an "
                         "SD 1.x/2.x/XL model")  # fmt: skip


def sd3_model_fn(net, cond: Conditioning, uncond: Conditioning | None, guidance: float, rescale: float,
                 dtype: mx.Dtype) -> ModelFn:  # fmt: skip
    """`model(x, t)` for the sampler: the MMDiT on the batch (doubled under guidance, [uncond; cond] as diffusers)
    at timestep t = 1000 sigma, its velocity guided by CFG."""
    guided = uncond is not None
    context = mx.concatenate([uncond.context, cond.context]) if guided else cond.context
    pooled = mx.concatenate([uncond.pooled, cond.pooled]) if guided else cond.pooled
    context, pooled = context.astype(dtype), pooled.astype(dtype)

    def model(x_in: mx.array, t: float) -> mx.array:
        return net(x_in.astype(dtype), mx.full((x_in.shape[0],), t, dtype=mx.float32), context, pooled)

    return classifier_free_guidance(model, guidance, rescale) if guided else model
