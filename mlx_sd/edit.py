"""InstructPix2Pix (Brooks et al. 2023): models that edit an image as the prompt says ("make it winter").

The UNet takes 8 channels: the latents and, beside them, the init image's VAE latents (the distribution's mode,
unscaled, as diffusers' `StableDiffusionInstructPix2PixPipeline` / `StableDiffusionXLInstructPix2PixPipeline` and
A1111 pass them; scaled by the VAE's scaling factor for CosXL Edit, an EDM v-prediction SDXL edit model, as diffusers'
`is_cosxl_edit` and ComfyUI's `SDXL_instructpix2pix` do). Guidance is three-way (diffusers' and A1111's
`combine_denoised_for_edit_model`): one batch holds the prompt with the image, the negative prompt with the image, and
the negative prompt with zeros for the image (SDXL's pooled text and micro-conditioning in the same rows); the
output is
    uncond + guidance (text - image) + image_guidance (image - uncond),
`image_guidance` (A1111's "Image CFG scale", default 1.5) weighing the init image. As in A1111, the request runs as
img2img: the sampler starts from the init latents noised to `strength` (1: all the steps).
"""

from __future__ import annotations

import mlx.core as mx

from .denoiser import ModelFn

CHANNELS = 8  # the UNet input of an edit model: 4 latent + 4 image channels


def check_edit(request, model) -> None:
    """Raise ValueError naming what an edit model (`model`, 8 UNet channels) cannot do with `request`."""
    name = model.info.name
    problems = [
        (request.init_image is None, "needs an init image (it edits an image as the prompt says): give init_image"),
        (request.mask is not None, "does not inpaint: drop the mask"),
        (bool(request.controlnet), "runs without ControlNets here: drop the units"),
        (request.ip_adapter_image is not None, "runs without an image prompt here: drop ip_adapter_image"),
        (request.guidance_rescale > 0 or request.s_min_uncond > 0, "takes no guidance_rescale or s_min_uncond"),
    ]
    for failed, why in problems:
        if failed:
            raise ValueError(f"{name} is an InstructPix2Pix model (8-channel UNet): it {why}")


def guided_rows(cond: mx.array, uncond: mx.array) -> mx.array:
    """The text rows of the three-way batch (context, pooled or micro-conditioning): [prompt, negative, negative]."""
    return mx.concatenate([cond, uncond, uncond])


def image_rows(image_latents: mx.array) -> mx.array:
    """The image rows beside them: [image, image, zeros]."""
    return mx.concatenate([image_latents, image_latents, mx.zeros_like(image_latents)])


def image_latents(mode: mx.array, vae_config, schedule) -> mx.array:
    """The init image's latents as the UNet sees them beside the latents: the VAE's mode unscaled, or times the
    scaling factor for an EDM model (CosXL Edit: diffusers' `is_cosxl_edit`, ComfyUI's V_PREDICTION_EDM rule)."""
    return mode * vae_config.scaling_factor if schedule.is_edm else mode


def edit_guidance(model: ModelFn, guidance: float, image_guidance: float) -> ModelFn:
    """The three-way guidance folded into a model function: `model` evaluates the tripled batch `[x; x; x]` against
    the rows `guided_rows` / `image_rows` make, and returns the three outputs stacked on the batch axis."""

    def guided(x: mx.array, t: float) -> mx.array:
        text, image, uncond = mx.split(model(mx.concatenate([x, x, x], axis=0), t), 3, axis=0)
        return uncond + guidance * (text - image) + image_guidance * (image - uncond)

    return guided
