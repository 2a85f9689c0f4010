"""Stable Diffusion 3 / 3.5 in the pipeline: the MMDiT's model function, its defaults and what it cannot run yet.

SD3 shares the pipeline's request, noise, samplers (in rectified-flow space, mlx_sd/schedules.py), VAE handling
(16 channels, shifted latents), img2img and inpainting (the known region pasted back after every step, as with a
4-channel UNet) with the UNet families. The conditioning is diffusers' `StableDiffusion3Pipeline.encode_prompt`
(mlx_sd/conditioning.py); the network takes it as one joint token sequence and a pooled vector, with no cross-attention
cache, no micro-conditioning and no added embeddings.

LoRAs apply to the MMDiT and the text encoders as to a UNet model's (mlx_sd/lora.py). ControlNet units run SD3
ControlNets (mlx_sd/models/sd3_controlnet.py) as diffusers' StableDiffusion3ControlNetPipeline does: each active unit's
network sees the MMDiT's latents and timestep and its control image's VAE latents, its per-block residuals are scaled
by the unit's weight, summed over the units and added inside the MMDiT; the guidance window follows diffusers' rule
whatever the sampler. The hires fix runs as for the UNet families (mlx_sd/hires.py: the first pass's latents
interpolated, or decoded, upscaled and encoded again, then img2img on the MMDiT). The features built on the UNet's
layers (T2I-Adapters, IP-Adapter, reference-only, ControlNet
inpainting and A1111's control modes, textual inversion, the refiner, the hires fix's second model) have no SD3
counterpart here yet; a request that asks for one is refused by name before any work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import mlx.core as mx

from .conditioning import Conditioning
from .controlnet import INPAINT_MODULES, Controls
from .denoiser import ModelFn, classifier_free_guidance
from .hires import LATENT_SCALE, hires_target
from .params import FamilyDefaults, defaults_for, edm_defaults
from .reference import REFERENCE_MODULES
from .schedules import EDM_SCHEDULERS

# diffusers' model cards: SD3 medium 28 steps at CFG 7; SD3.5 large 28 at 3.5; SD3.5 medium 40 at 4.5.
SD35_LARGE = {"steps": 28, "guidance": 3.5}
SD35_MEDIUM = {"steps": 40, "guidance": 4.5}


def model_defaults(info, config, scheduler_config: Mapping | None = None) -> FamilyDefaults:
    """A converted model's defaults from its manifest (`ModelInfo`), its denoiser's config and its scheduler config
    (EDM models: mlx_sd/params.py `edm_defaults`)."""
    base = defaults_for(info.family, info.prediction_type, info.kind)
    if scheduler_config and scheduler_config.get("_class_name") in EDM_SCHEDULERS and info.kind != "turbo":
        return edm_defaults(base, scheduler_config)
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
    from .samplers.registry import check_flow_sampler, resolve

    if request.sampler is not None:
        check_flow_sampler(resolve(request.sampler)[0])
    step = LATENT_SCALE * config.patch_size  # the MMDiT cuts the latents into patch_size x patch_size patches
    sizes = {"width x height": (request.width, request.height)}
    if request.enable_hr:
        sizes["the hires size"] = hires_target(request).size[::-1]
    for what, (w, h) in sizes.items():
        if w % step or h % step:
            raise ValueError(f"{what} {w}x{h}: SD3 models take multiples of {step} pixels (an 8x VAE, then "
                             f"{config.patch_size}x{config.patch_size} patches); use e.g. {w // step * step}x"
                             f"{h // step * step}")  # fmt: skip
    depth = config.num_layers
    if any(not 0 <= i < depth for i in request.skip_guidance_layers):
        raise ValueError(f"skip_guidance_layers {list(request.skip_guidance_layers)}: this MMDiT has blocks 0 to "
                         f"{depth - 1}")  # fmt: skip
    if request.skip_guidance_layers and request.guidance is not None and request.guidance <= 1.0:
        raise ValueError("skip_guidance_layers acts on classifier-free guidance: raise guidance above 1")
    modules = {unit.module for unit in request.controlnet}
    modes = sorted({unit.control_mode for unit in request.controlnet} - {"balanced"})
    _refuse({
        "reference-only ControlNet units": bool(modules & set(REFERENCE_MODULES)),
        "ControlNet inpainting modules (inpaint, inpaint_only)": bool(modules & set(INPAINT_MODULES)),
        f"ControlNet control_mode {', '.join(modes)} (SD3 ControlNets run diffusers' 'balanced')": bool(modes),
        "an IP-Adapter image": request.ip_adapter_image is not None,
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


def sd3_model_fn(net, cond: Conditioning, uncond: Conditioning | None, request, dtype: mx.Dtype, sigmas=(),
                 controls: Controls | None = None) -> ModelFn:  # fmt: skip
    """`model(x, t)` for the sampler: the MMDiT on the batch (doubled under guidance, [uncond; cond] as diffusers)
    at timestep t = 1000 sigma, with the residuals of `controls`' active SD3 ControlNets, its velocity guided by CFG
    and, when the request asks, skip-layer guidance over the plan's `sigmas` (`skip_layer_guidance`)."""
    guided = uncond is not None
    context = mx.concatenate([uncond.context, cond.context]) if guided else cond.context
    pooled = mx.concatenate([uncond.pooled, cond.pooled]) if guided else cond.pooled
    context, pooled = context.astype(dtype), pooled.astype(dtype)
    last = {"residuals": ()}  # the last call's ControlNet residuals, for skip-layer guidance's conditional pass

    def model(x_in: mx.array, t: float) -> mx.array:
        x_in = x_in.astype(dtype)
        timestep = mx.full((x_in.shape[0],), t, dtype=mx.float32)
        residuals = control_residuals(controls, net, x_in, timestep, context, pooled) if controls else ()
        last["residuals"] = residuals
        return net(x_in, timestep, context, pooled, controlnet_residuals=residuals)

    if not guided:
        return model
    slg = None
    if request.skip_guidance_layers:
        slg = skip_layer_guidance(net, cond, request, dtype, sigmas, lambda: last["residuals"])
    return classifier_free_guidance(model, request.guidance, request.guidance_rescale, after=slg)


def control_residuals(controls: Controls, net, x: mx.array, timestep: mx.array, context: mx.array,
                      pooled: mx.array) -> list[mx.array]:  # fmt: skip
    """The summed residuals of the units' SD3 ControlNets that act at this step, each scaled by its unit's weight
    (diffusers' SD3MultiControlNetModel), for the MMDiT's batch `x`; () when none acts. A network gets the text
    tokens only if it has a text stream, and zeros for the pooled vector if it was trained so
    (`force_zeros_for_pooled_projection`), as diffusers' pipeline gives them."""
    total = ()
    for unit in controls.units:
        if not controls.active(unit):
            continue
        network = unit.model.model
        cfg = network.config
        image = controls.images[id(unit)]  # (1, h, w, C) latents
        image = mx.broadcast_to(image, (x.shape[0], *image.shape[1:])).astype(x.dtype)
        own_pooled = mx.zeros_like(pooled) if cfg.force_zeros_for_pooled_projection else pooled
        out = network(x, timestep, context if cfg.joint else None, own_pooled, image, net.pos_embed)
        if total and len(out) != len(total):
            raise ValueError(f"SD3 ControlNet units with different block counts ({len(total)}, {len(out)}) cannot "
                             "be summed; use ControlNets of one kind together")  # fmt: skip
        out = [r * unit.weight for r in out]
        total = out if not total else [a + b for a, b in zip(total, out)]
    return total


def control_latents(config, latents: mx.array, vae) -> mx.array:
    """An SD3 ControlNet's control latents from the control image's latents as the MMDiT sees them ((z - shift) *
    scale, `vae` the VAE's config): InstantX's networks (`force_zeros_for_pooled_projection`) take them unshifted,
    z * scale, as diffusers' pipeline gives them."""
    return latents + vae.shift_factor * vae.scaling_factor if config.force_zeros_for_pooled_projection else latents


def skip_layer_guidance(net, cond: Conditioning, request, dtype: mx.Dtype, sigmas, residuals=lambda: ()):
    """SD3.5's skip-layer guidance (diffusers' `skip_guidance_layers`; ComfyUI's SkipLayerGuidanceSD3): at steps i
    with steps * start < i < steps * stop, the conditional pass runs again without `skip_guidance_layers` and
    (cond - that) * scale is added to the guided output, steering away from what those blocks alone contribute.

    The step of an evaluation is read from its noise level: the last step whose level is at least sigma (a second-
    order sampler's evaluation at the next level counts for the next step). `residuals()`: the guided call's
    ControlNet residuals, whose conditional half the second pass gets too."""
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
        control = [r[-x.shape[0] :] for r in residuals()]  # the conditional half of [uncond; cond]
        skipped = net(x.astype(dtype), timestep, context, pooled, skip_layers=layers, controlnet_residuals=control)
        return (cond_out - skipped) * request.skip_layer_guidance_scale

    return after
