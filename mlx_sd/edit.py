"""InstructPix2Pix (Brooks et al. 2023): models that edit an image as the prompt says ("make it winter").

The UNet takes 8 channels: the latents and, beside them, the init image's VAE latents (the distribution's mode,
unscaled, as diffusers' `StableDiffusionInstructPix2PixPipeline` and A1111 pass them). Guidance is three-way
(diffusers' and A1111's `combine_denoised_for_edit_model`): one batch holds the prompt with the image, the negative
prompt with the image, and the negative prompt with zeros for the image; the output is
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
        (model.unet.config.addition_time_embed_dim is not None, "is an SDXL edit model, which mlx-sd does not run"),
        (bool(request.controlnet), "runs without ControlNets here: drop the units"),
        (request.ip_adapter_image is not None, "runs without an image prompt here: drop ip_adapter_image"),
        (request.guidance_rescale > 0 or request.s_min_uncond > 0, "takes no guidance_rescale or s_min_uncond"),
    ]
    for failed, why in problems:
        if failed:
            raise ValueError(f"{name} is an InstructPix2Pix model (8-channel UNet): it {why}")


def guided_rows(cond: mx.array, uncond: mx.array) -> mx.array:
    """The text rows of the three-way batch: [prompt, negative, negative]."""
    return mx.concatenate([cond, uncond, uncond])


def image_rows(image_latents: mx.array) -> mx.array:
    """The image rows beside them: [image, image, zeros]."""
    return mx.concatenate([image_latents, image_latents, mx.zeros_like(image_latents)])


def edit_guidance(model: ModelFn, guidance: float, image_guidance: float) -> ModelFn:
    """The three-way guidance folded into a model function: `model` evaluates the tripled batch `[x; x; x]` against
    the rows `guided_rows` / `image_rows` make, and returns the three outputs stacked on the batch axis."""

    def guided(x: mx.array, t: float) -> mx.array:
        text, image, uncond = mx.split(model(mx.concatenate([x, x, x], axis=0), t), 3, axis=0)
        return uncond + guidance * (text - image) + image_guidance * (image - uncond)

    return guided
