"""Stable Diffusion 3 / 3.5 in the pipeline: the MMDiT's model function, its defaults and what it cannot run yet.

SD3 shares the pipeline's request, noise, samplers (in rectified-flow space, mlx_sd/schedules.py), VAE handling
(16 channels, shifted latents), img2img and inpainting (the known region pasted back after every step, as with a
4-channel UNet) with the UNet families. The conditioning is diffusers' `StableDiffusion3Pipeline.encode_prompt`
(mlx_sd/conditioning.py); the network takes it as one joint token sequence and a pooled vector, with no cross-attention
cache, no micro-conditioning and no added embeddings.

LoRAs apply to the MMDiT and the text encoders as to a UNet model's (mlx_sd/lora.py). The features built on the UNet's
layers (ControlNet and T2I-Adapters, IP-Adapter, reference-only, textual inversion, the refiner, the hires fix's second
model) have no SD3 counterpart here yet; a request that asks for one is refused by name before any work.
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


def check_sd3_params(request, config) -> None:
    """Refuse, by name, what a (resolved) request asks that an SD3 model with MMDiT `config` cannot run here; needs
    no loaded model (the server checks at submission)."""
    from .samplers.registry import FLOW_SAMPLERS, resolve

    if request.sampler is not None and resolve(request.sampler)[0].name not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {request.sampler!r} does not run rectified-flow models (SD3); choose one of "
                         f"{list(FLOW_SAMPLERS)}")  # fmt: skip
    depth = config.num_layers
    if any(not 0 <= i < depth for i in request.skip_guidance_layers):
        raise ValueError(f"skip_guidance_layers {list(request.skip_guidance_layers)}: this MMDiT has blocks 0 to "
                         f"{depth - 1}")  # fmt: skip
    if request.skip_guidance_layers and request.guidance is not None and request.guidance <= 1.0:
        raise ValueError("skip_guidance_layers acts on classifier-free guidance: raise guidance above 1")
    _refuse({
        "ControlNet units": bool(request.controlnet),
        "an IP-Adapter image": request.ip_adapter_image is not None,
        "the hires fix (enable_hr)": request.enable_hr,
        "seamless tiling": request.tiling,
        "s_min_uncond (NGMS)": request.s_min_uncond > 0,
    })  # fmt: skip


def check_sd3_request(request, pipe) -> None:
    """`check_sd3_params`, and what the pipeline holds that an SD3 model cannot use (see the module docstring)."""
    check_sd3_params(request, pipe.model.unet.config)
    asked = {
        "a refiner": pipe.refiner is not None,
        "a hires model": pipe.hires_model is not None,
        "textual-inversion embeddings": bool(pipe.embeddings),
    }
    _refuse(asked)


def _refuse(asked: dict[str, bool]) -> None:
    wanted = [name for name, yes in asked.items() if yes]
    if wanted:
        raise ValueError(f"SD3 models do not support {', '.join(wanted)} yet; drop them from the request, or use an "
                         "SD 1.x/2.x/XL model")  # fmt: skip


def sd3_model_fn(net, cond: Conditioning, uncond: Conditioning | None, request, dtype: mx.Dtype,
                 sigmas=()) -> ModelFn:  # fmt: skip
    """`model(x, t)` for the sampler: the MMDiT on the batch (doubled under guidance, [uncond; cond] as diffusers)
    at timestep t = 1000 sigma, its velocity guided by CFG and, when the request asks, skip-layer guidance over the
    plan's `sigmas` (`skip_layer_guidance`)."""
    guided = uncond is not None
    context = mx.concatenate([uncond.context, cond.context]) if guided else cond.context
    pooled = mx.concatenate([uncond.pooled, cond.pooled]) if guided else cond.pooled
    context, pooled = context.astype(dtype), pooled.astype(dtype)

    def model(x_in: mx.array, t: float) -> mx.array:
        return net(x_in.astype(dtype), mx.full((x_in.shape[0],), t, dtype=mx.float32), context, pooled)

    if not guided:
        return model
    slg = skip_layer_guidance(net, cond, request, dtype, sigmas) if request.skip_guidance_layers else None
    return classifier_free_guidance(model, request.guidance, request.guidance_rescale, after=slg)


def skip_layer_guidance(net, cond: Conditioning, request, dtype: mx.Dtype, sigmas):
    """SD3.5's skip-layer guidance (diffusers' `skip_guidance_layers`; ComfyUI's SkipLayerGuidanceSD3): at steps i
    with steps * start < i < steps * stop, the conditional pass runs again without `skip_guidance_layers` and
    (cond - that) * scale is added to the guided output, steering away from what those blocks alone contribute.

    The step of an evaluation is read from its noise level: the last step whose level is at least sigma (a second-
    order sampler's evaluation at the next level counts for the next step)."""
    steps = len(sigmas) - 1
    active = {i for i in range(steps) if steps * request.skip_layer_guidance_start < i
              < steps * request.skip_layer_guidance_stop}  # fmt: skip
    context, pooled = cond.context.astype(dtype), cond.pooled.astype(dtype)
    layers = frozenset(request.skip_guidance_layers)

    def after(x: mx.array, t: float, cond_out: mx.array) -> mx.array | None:
        sigma = t / 1000.0
        step = max((i for i in range(steps) if sigmas[i] >= sigma - 1e-7), default=0)
        if step not in active:
            return None
        timestep = mx.full((x.shape[0],), t, dtype=mx.float32)
        skipped = net(x.astype(dtype), timestep, context, pooled, skip_layers=layers)
        return (cond_out - skipped) * request.skip_layer_guidance_scale

    return after
