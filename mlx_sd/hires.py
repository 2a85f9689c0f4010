"""AUTOMATIC1111's hires fix: generate at width x height, upscale, then run img2img at the larger size.

As A1111's `StableDiffusionProcessingTxt2Img` (`calculate_target_resolution`, `sample_hr_pass`):
- The target is width x height times `hr_scale`, or `hr_resize_x` x `hr_resize_y` (one of them 0: the other
  follows the aspect ratio; both: upscale to cover that size, then crop the latents' centre).
- "Latent" upscalers interpolate the first pass's latents (A1111 calls torch's interpolate on them); "None",
  "Lanczos", "Nearest" and model upscalers (ESRGAN, ...) decode the first pass to 8-bit images, upscale those and
  encode them again (`mlx_sd.upscale`, `mlx_sd.model_upscaler`). Sizes are rounded down to multiples of 8 here
  (A1111's latents are too; its image upscalers resize to the exact size and the VAE then drops the remainder).
- The second pass is img2img with A1111's fixed step count: a schedule of int(steps / min(strength, 0.999)) steps
  of which the last `steps` run (`hr_second_pass_steps`, 0 = the first pass's steps), starting from the upscaled
  latents noised to the first level that runs. That noise is the first draw of fresh generators seeded with the
  images' seeds, at the new size (A1111 makes a new `ImageRNG` for the hires shape); the sampler's noise follows
  from the same generators (and its Brownian trees span the second schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import numpy as np
from PIL import Image

from .images import to_array
from .params import MAX_SIZE, MIN_SIZE, GenerationRequest
from .samplers import SamplingPlan, plan_sampling
from .schedules import NoiseSchedule
from .upscale import is_latent_upscaler, upscale_image, upscale_latents

LATENT_SCALE = 8
MAX_STRENGTH = 0.999  # A1111's setup_img2img_steps: min(denoising_strength, 0.999)


@dataclass(frozen=True)
class HiresTarget:
    """Where the first pass's latents go: upscaled to `latent_size` (h, w), then `crop` (y, x) latent pixels cut
    off, half before and half after (A1111's truncate_y, truncate_x)."""

    latent_size: tuple[int, int]
    crop: tuple[int, int] = (0, 0)

    @property
    def size(self) -> tuple[int, int]:
        """The final (height, width) in pixels."""
        return tuple(LATENT_SCALE * (n - c) for n, c in zip(self.latent_size, self.crop))


def hires_target(request: GenerationRequest) -> HiresTarget:
    """A1111's `calculate_target_resolution` for a resolved request."""
    w, h, rx, ry = request.width, request.height, request.hr_resize_x, request.hr_resize_y
    crop = (0, 0)
    if rx == 0 and ry == 0:
        to_x, to_y = int(w * request.hr_scale), int(h * request.hr_scale)
    elif ry == 0:
        to_x, to_y = rx, rx * h // w
    elif rx == 0:
        to_x, to_y = ry * w // h, ry
    else:
        to_x, to_y = (rx, rx * h // w) if w / h < rx / ry else (ry * w // h, ry)
        crop = ((to_y - ry) // LATENT_SCALE, (to_x - rx) // LATENT_SCALE)
    target = HiresTarget((to_y // LATENT_SCALE, to_x // LATENT_SCALE), crop)
    if min(target.size) < MIN_SIZE or max(target.size) > MAX_SIZE:
        raise ValueError(f"the hires size {target.size[1]}x{target.size[0]} is outside {MIN_SIZE}-{MAX_SIZE} pixels; "
                         "change hr_scale or hr_resize_x / hr_resize_y")  # fmt: skip
    return target


def hires_request(request: GenerationRequest, target: HiresTarget) -> GenerationRequest:
    """The second pass as a request of its own: the hires size, its sampler, steps and prompts."""
    height, width = target.size
    r = request
    return replace(
        r, width=width, height=height, steps=r.hr_second_pass_steps or r.steps, sampler=r.hr_sampler or r.sampler,
        schedule_type=r.hr_schedule_type or r.schedule_type, prompt=r.hr_prompt or r.prompt,
        negative_prompt=r.hr_negative_prompt or r.negative_prompt, enable_hr=False,
    )  # fmt: skip


def hires_plan(second: GenerationRequest, schedule: NoiseSchedule) -> SamplingPlan:
    """The second pass's sampling plan: the last `second.steps` steps of int(steps / strength) (A1111)."""
    total = int(second.steps / min(second.strength, MAX_STRENGTH))
    return plan_sampling(
        second.sampler, schedule, total, schedule_type=second.schedule_type, follow=second.follow,
        run_steps=second.steps, **second.sampler_options(),
    )  # fmt: skip


def check_hires_model(hires, base=None, second: GenerationRequest | None = None) -> None:
    """Raise ValueError unless `hires` (a `StableDiffusion`) can run the second pass of `base`'s hires fix for the
    request `second`: a 4-channel UNet; for a latent upscaler the same latent space (the image upscalers decode with
    `base`'s VAE and encode with `hires`'); no image prompt (the IP-Adapter is fitted to `base`'s UNet)."""
    name = hires.info.name
    if hires.unet.config.in_channels != hires.vae.config.latent_channels:
        raise ValueError(f"hires checkpoint {name}: its UNet takes {hires.unet.config.in_channels} channels (an "
                         "inpainting model); the hires pass needs a txt2img model")  # fmt: skip
    if base is None or second is None:
        return
    b, h = base.vae.config, hires.vae.config
    if is_latent_upscaler(second.hr_upscaler) and (b.latent_channels, b.scaling_factor) != (
        h.latent_channels, h.scaling_factor,
    ):  # fmt: skip
        raise ValueError(f"hires checkpoint {name}: its latent space differs from {base.info.name}'s, so the latents "
                         f"cannot go to it directly ({second.hr_upscaler!r}); use an image upscaler (Lanczos, "
                         "R-ESRGAN 4x+, ...), which decodes and encodes again")  # fmt: skip
    if second.ip_adapter_image is not None:
        raise ValueError(f"an image prompt with a hires checkpoint ({name}) is not supported: the IP-Adapter fits "
                         f"{base.info.name}'s UNet only")  # fmt: skip


def firstpass_pixels(image: Image.Image, batch: int) -> mx.array:
    """A1111's stand-in for the first pass's decoded images when a `firstpass_image` is given: its 8-bit values as
    x / 255 * 2 - 1 in float32 (A1111's arithmetic, so its truncation to 8 bits before the upscaler matches),
    (batch, H, W, 3)."""
    x = np.asarray(image.convert("RGB"), np.float32) / np.float32(255.0) * np.float32(2.0) - np.float32(1.0)
    return mx.broadcast_to(mx.array(x)[None], (batch, *x.shape))


def hires_infotext(request: GenerationRequest, checkpoint: str | None = None) -> dict:
    """A1111's infotext fields for the hires fix (the "Size" stays the first pass's); `checkpoint`: the hires pass's
    model title when it was another."""
    resized = request.hr_resize_x or request.hr_resize_y
    return {
        "Hires upscale": None if resized else request.hr_scale,
        "Hires resize": f"{request.hr_resize_x}x{request.hr_resize_y}" if resized else None,
        "Hires steps": request.hr_second_pass_steps or None,
        "Hires upscaler": request.hr_upscaler,
        "Hires checkpoint": checkpoint,
        "Hires sampler": request.hr_sampler if request.hr_sampler not in (None, request.sampler) else None,
        "Hires schedule type": request.hr_schedule_type or None,
        "Hires prompt": request.hr_prompt if request.hr_prompt not in ("", request.prompt) else None,
        "Hires negative prompt": request.hr_negative_prompt
        if request.hr_negative_prompt not in ("", request.negative_prompt) else None,
    }  # fmt: skip


def upscale_first_pass(
    latents: mx.array, request: GenerationRequest, target: HiresTarget, decode, encode, upscaler=None
) -> mx.array:
    """The first pass's (B, h, w, C) latents brought to the hires size.

    Args:
        decode: (latents) -> (B, H, W, 3) images in [-1, 1]; encode: (images in [-1, 1]) -> latents. Used by the
            image upscalers only.
        upscaler: the loaded model upscaler `request.hr_upscaler` names, or None for the built-in upscalers.
    """
    h, w = target.latent_size
    if is_latent_upscaler(request.hr_upscaler):
        up = upscale_latents(latents, h, w, request.hr_upscaler)
    else:
        # A1111 hands the upscaler 8-bit images made by truncation (astype(uint8)), not rounding
        pixels = mx.clip((decode(latents).astype(mx.float32) + 1) * 0.5, 0.0, 1.0) * 255.0
        images = [upscale_image(Image.fromarray(np.array(p).astype(np.uint8)), w * LATENT_SCALE, h * LATENT_SCALE,
                                upscaler or request.hr_upscaler) for p in pixels]  # fmt: skip
        up = encode(to_array(images))
    cy, cx = target.crop
    return up[:, cy // 2 : h - (cy + 1) // 2, cx // 2 : w - (cx + 1) // 2]
