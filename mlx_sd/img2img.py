"""Starting from an image: img2img and inpainting inputs, prepared as diffusers' pipelines prepare them.

img2img: the init image (resized to the working size with A1111's resize modes if needed) is VAE-encoded with
sampling noise and noised to the first level of the truncated schedule (diffusers' `strength` rule).
Inpainting: the mask (white = repaint; optionally inverted and blurred) is binarized at 0.5 as diffusers does. A
9-channel inpainting UNet reads [latents, mask, masked-image latents]; a plain UNet repaints everything and the known
region is pasted back into the latents after every step (diffusers' latent blending). "Only masked"
(`inpaint_full_res`) crops around the mask, works at the requested size and pastes the result back (A1111).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from .images import CropRegion, fill_masked, mask_crop_region, paste_back, prepare_mask, resize, to_array
from .upscale import upscale_latents

LATENT_SCALE = 8  # pixels per latent


@dataclass
class InitState:
    """Everything the sampling loop and the decoder need from the init image and mask.

    image_latents: (B, h, w, 4) scaled latents of the init image (16 channels for SD3; None for inpainting at
        strength 1 with a 9-channel UNet, which never looks at them).
    mask: (B, h, w, 1) binarized latent mask, 1 = repaint (None for img2img).
    masked_latents: (B, h, w, 4) latents of the image with the repaint region blacked out (9-channel UNets).
    noise: the initial noise draw, kept for the known-region blending.
    noise_start: start from the noised init latents (strength < 1 or img2img); else from pure noise.
    edit_latents: (B, h, w, 4) the init image's unscaled VAE mode, which an InstructPix2Pix UNet sees beside the
        latents (mlx_sd/edit.py); None for other models.
    """

    original: Image.Image
    region: CropRegion | None
    pixel_mask: Image.Image | None
    paste: bool
    image_latents: mx.array | None = None
    mask: mx.array | None = None
    masked_latents: mx.array | None = None
    noise: mx.array | None = None
    noise_start: bool = True
    edit_latents: mx.array | None = None


Encoder = Callable[[mx.array, object], mx.array]  # (images, noise source) -> scaled latents


def prepare_inputs(request) -> tuple[InitState, mx.array, mx.array | None]:
    """Resize/crop the init image and mask to the working size.

    Returns the state (without latents), the (1, H, W, 3) image in [-1, 1] and the (1, H, W, 1) binary mask.
    """
    width, height = request.width, request.height
    original = request.init_image.convert("RGB")
    if request.mask is None:
        if request.resize_mode == "latent":  # encoded as it is (to a multiple of 8); prepare_latents resizes
            w, h = original.size
            image = original.crop((0, 0, w - w % LATENT_SCALE, h - h % LATENT_SCALE))
        else:
            image = resize(original, width, height, request.resize_mode)
        return InitState(original, None, None, False), to_array(image), None

    soft_mask = prepare_mask(request.mask, request.mask_blur, request.invert_mask)
    if soft_mask.size != original.size:
        soft_mask = soft_mask.resize(original.size, Image.LANCZOS)
    region = None
    # "fill" paints the area to repaint with the colours around it; the paste-back keeps the original (A1111)
    source = fill_masked(original, soft_mask) if request.inpainting_fill == "fill" else original
    if request.inpaint_full_res:
        region = mask_crop_region(soft_mask, request.inpaint_padding, width, height)
        image = source.crop(region.box()).resize((width, height), Image.LANCZOS)
        mask = soft_mask.crop(region.box()).resize((width, height), Image.LANCZOS)
    else:
        image = resize(source, width, height, request.resize_mode)
        mask = soft_mask if soft_mask.size == (width, height) else soft_mask.resize((width, height), Image.LANCZOS)
    binary = (np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)  # diffusers binarizes at 0.5
    state = InitState(original, region, soft_mask, request.paste_back or request.inpaint_full_res)
    return state, to_array(image), mx.array(binary)[None, :, :, None]


def prepare_latents(request, plan, noise, encode: Encoder, unet_channels: int, latent_channels: int, dtype,
                    vary=None):  # fmt: skip
    """The starting latent x (VE) and the init state, drawing noise in diffusers' order.

    img2img:  encode(image) [VAE noise], initial noise, x = add_noise(image latents, noise, first level).
    inpaint:  encode(image) if the UNet has no inpainting channels (or a 4-channel refiner will paste the known
              region back) or strength < 1 [VAE noise], initial noise,
              encode(masked image) [VAE noise] (always: diffusers' prepare_mask_latents), x as img2img or, at
              strength 1, pure noise.
    `vary` (NCHW draw -> draw) applies variation seeds to the initial noise (mlx_sd/variation.py).
    """
    state, image, mask = prepare_inputs(request)
    B = request.batch_size
    image = mx.broadcast_to(image, (B, *image.shape[1:]))
    h, w = request.height // LATENT_SCALE, request.width // LATENT_SCALE
    inpaint = mask is not None
    state.noise_start = not (inpaint and request.strength >= 1.0)
    if not inpaint or unet_channels == latent_channels or state.noise_start:  # no inpainting channels: it pastes
        state.image_latents = encode(image, noise)
        if request.resize_mode == "latent" and not inpaint:  # A1111: bilinear, as torch's interpolate
            state.image_latents = upscale_latents(state.image_latents, h, w, "Latent")
    draw = noise.normal((B, latent_channels, h, w))
    draw = (vary(draw) if vary else draw).transpose(0, 2, 3, 1)  # torch's NCHW draw order
    state.noise = draw
    if inpaint:
        # diffusers: F.interpolate(mask, size=(h, w)) with nearest sampling reads every 8th pixel.
        state.mask = mx.broadcast_to(mask[:, ::LATENT_SCALE, ::LATENT_SCALE], (B, h, w, 1))
    if state.noise_start:
        x = plan.noised_latents(_start_latents(request, state, draw), draw * request.initial_noise_multiplier, 0)
    else:
        x = plan.initial_latents(draw)
    if inpaint:
        masked = image * (mask < 0.5)
        state.masked_latents = encode(masked, noise)
    return x.astype(dtype), state


def _start_latents(request, state: InitState, draw: mx.array) -> mx.array:
    """The latents img2img noises to its first level: the image's, with A1111's "latent noise" (the request's
    initial noise) or "latent nothing" (zeros) in the area to repaint."""
    if state.mask is None or request.inpainting_fill not in ("latent noise", "latent nothing"):
        return state.image_latents
    keep = state.image_latents * (1 - state.mask)
    return keep + draw * state.mask if request.inpainting_fill == "latent noise" else keep


def restore_output(state: InitState, image: Image.Image) -> Image.Image:
    """Put an inpainted result back: into its crop region ("only masked"), composited over the original outside
    the (blurred) mask when pasting back is asked for; img2img and plain inpainting results pass through."""
    if not state.paste or state.pixel_mask is None:
        return image
    return paste_back(state.original, image, state.pixel_mask, state.region)
