"""Checks shared by every API before a request takes a place in the queue, in the caller's field names.

The library validates a `GenerationRequest` (sizes, ranges, sampler names); the server adds its configured limits
and resolves what the worker would only find out later (an unknown sampler, img2img strength too small for the
step count), so a bad request is answered at once with 422 and never waits in the queue.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Mapping
from dataclasses import replace

from mlx_sd.hires import hires_request, hires_target
from mlx_sd.params import GenerationRequest
from mlx_sd.samplers import resolve
from mlx_sd.schedules import img2img_steps, schedule_type
from mlx_sd.sd3 import check_sd3_params
from mlx_sd.sd_upscale import SDUpscale
from mlx_sd.sd_upscale import check as check_script
from mlx_sd.upscale import HIRES_UPSCALERS, IMAGE_UPSCALERS
from mlx_sd_convert import ConversionError

from .config import Limits
from .errors import ApiError, invalid
from .registry import ModelEntry

SEED_BITS = 32  # random seeds as A1111 draws them (< 2**32)
MAX_UPSCALED_SIDE = 8192  # the largest side an upscale makes (Extras, SD upscale); A1111's "Scale to" slider ends here
MAX_SEED = 2**63 - 1  # what every API accepts: image i of a request uses seed + i, which stays below 2**64


def sampler_takes(name: str, option: str) -> bool:
    """Whether the sampler `name` has the keyword option `option` (e.g. eta); False for unknown names."""
    try:
        sampler = resolve(name)[0]
    except ValueError:
        return False
    return option in inspect.signature(sampler.function).parameters


def check_request(request: GenerationRequest, model: ModelEntry, limits: Limits,
                  names: Mapping[str, str] = {}, upscalers=None) -> GenerationRequest:  # fmt: skip
    """Validate `request` for `model` within `limits`; returns it with a seed drawn if it had none.

    Args:
        names: the calling API's field name for each library field ({"guidance": "cfg_scale", ...}), used in
            error messages.
        upscalers: the server's `UpscalerLibrary` (--upscaler-dir), where a hires fix's model upscaler must be.

    Raises:
        ApiError: 422 naming the field.
    """

    def name(field: str) -> str:
        return names.get(field, field)

    if request.seed is None:
        request = replace(request, seed=secrets.randbits(SEED_BITS))
    if request.subseed_strength and request.subseed is None:
        request = replace(request, subseed=secrets.randbits(SEED_BITS))
    for field in ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt"):
        if len(getattr(request, field)) > limits.max_prompt_chars:
            raise invalid(name(field), f"longer than this server's limit of {limits.max_prompt_chars} characters")
    if model.inpainting and request.mask is None:
        raise invalid(name("mask"), f"model {model.name!r} is an inpainting model: send an init image and a mask")
    if model.edit and request.init_image is None:
        raise invalid(name("init_image"), f"model {model.name!r} is an InstructPix2Pix model: it edits an init image "
                      "(img2img)")  # fmt: skip
    try:
        resolved = request.resolved(model.defaults, request.seed)
    except ValueError as e:
        raise ApiError(422, str(e), code="invalid_value") from None
    bounds = [
        ("width", resolved.width, limits.max_width),
        ("height", resolved.height, limits.max_height),
        ("steps", resolved.steps, limits.max_steps),
        ("batch_size", resolved.batch_size, limits.max_batch_size),
    ]
    for field, value, most in bounds:
        if value > most:
            raise invalid(name(field), f"{value} is above this server's limit of {most}")
    if resolved.num_images > limits.max_images:
        raise invalid(
            name("batch_count"), f"{resolved.num_images} images in one request; this server's limit is "
            f"{limits.max_images} ({name('batch_size')} x {name('batch_count')})",
        )  # fmt: skip
    if resolved.schedule_type is not None:
        try:
            schedule_type(resolved.schedule_type)
        except ValueError as e:
            raise invalid(name("schedule_type"), str(e)) from None
    try:
        resolve(resolved.sampler, resolved.schedule_type)
    except ValueError as e:
        raise invalid(name("sampler"), str(e)) from None
    if model.info.family == "sd3":
        try:
            check_sd3_params(resolved, model.config)
        except ValueError as e:
            raise ApiError(422, str(e), code="invalid_value") from None
    elif resolved.skip_guidance_layers:
        raise invalid("skip_guidance_layers", f"skip-layer guidance is SD3's; model {model.name!r} is "
                      f"{model.info.family}")  # fmt: skip
    if request.eta is not None and not sampler_takes(resolved.sampler, "eta"):
        raise invalid(name("eta"), f"sampler {resolved.sampler!r} has no eta; leave it out")
    if resolved.init_image is not None:
        try:
            img2img_steps(resolved.steps, resolved.strength)
        except ValueError as e:
            raise invalid(name("strength"), str(e)) from None
    if resolved.enable_hr:
        _check_hires(resolved, limits, name, upscalers)
    return request


def check_upscaler(upscaler: str, upscalers, param: str, builtin: tuple[str, ...] = HIRES_UPSCALERS) -> bool:
    """Whether `upscaler` is a model, which must then be in --upscaler-dir (`upscalers`); the `builtin` names are
    always there. Raises a 422 naming `param`."""
    if upscaler in builtin:
        return False
    if upscalers is None:
        raise invalid(param, f"{upscaler!r} is not one of {', '.join(builtin)}; this server has no model "
                      "upscalers: start it with --upscaler-dir DIR")  # fmt: skip
    try:
        upscalers.find(upscaler)
    except ConversionError as e:
        raise invalid(param, str(e)) from None
    return True


def check_sd_upscale(request: GenerationRequest, settings: SDUpscale, upscalers, param: str) -> None:
    """The "SD upscale" script's settings for `request` (its tile size given), its upscaler named; 422 naming `param`
    (the whole settings) or `param.upscaler`."""
    model = check_upscaler(settings.name, upscalers, f"{param}.upscaler", IMAGE_UPSCALERS)
    try:  # a named model stands in as "None": it is loaded on the worker
        check_script(request, replace(settings, upscaler="None") if model else settings)
    except ValueError as e:
        raise invalid(param, str(e)) from None
    size = (request.init_image.width * settings.scale, request.init_image.height * settings.scale)
    if max(size) > MAX_UPSCALED_SIDE:
        raise invalid(param, f"the upscaled image would be {int(size[0])}x{int(size[1])}; this server upscales to "
                      f"at most {MAX_UPSCALED_SIDE} pixels a side")  # fmt: skip


def _check_hires(resolved: GenerationRequest, limits: Limits, name, upscalers) -> None:
    """The hires pass's upscaler, size, steps and sampler, before any work."""
    check_upscaler(resolved.hr_upscaler, upscalers, name("hr_upscaler"))
    try:
        second = hires_request(resolved, hires_target(resolved))
    except ValueError as e:
        raise invalid(name("hr_scale"), str(e)) from None
    if second.width > limits.max_width or second.height > limits.max_height:
        raise invalid(name("hr_scale"), f"the hires size {second.width}x{second.height} is above this server's "
                      f"limit of {limits.max_width}x{limits.max_height}")  # fmt: skip
    if second.steps > limits.max_steps:
        raise invalid(name("hr_second_pass_steps"), f"{second.steps} is above this server's limit of "
                      f"{limits.max_steps}")  # fmt: skip
    try:
        resolve(second.sampler, second.schedule_type)
    except ValueError as e:
        raise invalid(name("hr_sampler"), str(e)) from None
