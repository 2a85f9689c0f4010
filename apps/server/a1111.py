"""AUTOMATIC1111's web API (`/sdapi/v1`), so that existing A1111 clients work unmodified.

Request models carry A1111's field names, types and defaults (its `StableDiffusionProcessing*` API models: steps 50,
sampler "Euler", 512x512, CFG 7, seed -1 = random). Every field is null-tolerant, as A1111's generated models are.
How each field is treated (see the README table):
- supported fields are applied;
- fields A1111 itself ignores in that context (hires settings without enable_hr, image_cfg_scale outside
  InstructPix2Pix, do_not_save_*) are accepted and change nothing;
- fields asking for a feature mlx-sd lacks are accepted at their neutral value and refused (422 naming the field)
  otherwise (`UNSUPPORTED`);
- unknown fields and unsupported `override_settings` keys are accepted and listed in `info` as "mlx_sd_ignored".
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mlx_sd import __version__
from mlx_sd.infotext import parse_infotext, request_fields
from mlx_sd.params import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, GenerationRequest
from mlx_sd.prompts import apply_style
from mlx_sd.samplers import list_samplers, resolve
from mlx_sd.schedules import SCHEDULE_TYPES
from mlx_sd.sd_upscale import DEFAULT_OVERLAP, SDUpscale
from mlx_sd.sd_upscale import TITLE as SD_UPSCALE
from mlx_sd.upscale import IMAGE_UPSCALERS, LATENT_UPSCALERS

from . import codec
from .controlnet_api import a1111_units, scripts_listing, split_scripts
from .engine import Job
from .errors import ApiError, invalid
from .state import ServerState, State, run_to_completion
from .validation import MAX_SEED, check_request, check_sd_upscale, sampler_takes

MAX_MASK_BLUR = 256  # pixels; a Gaussian blur beyond this is meaningless and slow
MAX_PADDING = 8192
MAX_CLIP_SKIP = 12
# "Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", 3: "latent"}
INPAINTING_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}  # A1111's "Masked content"
# library values -> this API's numeric codes, for the fields an infotext fills
API_CODES = {"inpainting_fill": {v: k for k, v in INPAINTING_FILL.items()}}
# Names of the library's fields in this API, for error messages.
NAMES = {"guidance": "cfg_scale", "sampler": "sampler_name", "schedule_type": "scheduler", "batch_count": "n_iter",
         "strength": "denoising_strength", "init_image": "init_images", "mask": "mask",
         "hr_sampler": "hr_sampler_name", "hr_schedule_type": "hr_scheduler"}  # fmt: skip

# field: (values that change nothing, why any other value is refused). None is always accepted.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "restore_faces": ((False,), "face restoration is not implemented"),
    "alwayson_scripts": (({},), "extensions other than ControlNet (ADetailer, ...) are not supported"),
    "latent_mask": (("",), "a separate latent mask is not supported"),
}
MAX_SD_UPSCALE = 8.0  # the largest "SD upscale" scale factor taken (A1111's slider ends at 4)
# A1111's sampler settings: its samplers read these options (the request's s_churn, ... fields are not used)
SIGMA_SETTINGS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}  # s_tmax 0 = no upper bound
SUPPORTED_OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers", "eta_noise_seed_delta", *SIGMA_SETTINGS)
# A1111's `opts` names that GET /options reports; POST /options applies the supported ones.
FIXED_OPTIONS = {"samples_format": "png", "randn_source": "CPU", "sd_vae": "Automatic"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())


def _size(default: int):
    return Field(default, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE, description="pixels, multiple of 8")


class ProcessingRequest(_Model):
    """The fields txt2img and img2img share (A1111's `StableDiffusionProcessing` plus the API extras)."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    subseed: int | None = Field(-1, ge=-1, le=MAX_SEED, description="-1: random")
    subseed_strength: float | None = Field(0, ge=0, le=1)
    seed_resize_from_h: int | None = Field(-1, ge=-1, le=MAX_SIZE, description="-1 or 0: off")
    seed_resize_from_w: int | None = Field(-1, ge=-1, le=MAX_SIZE, description="-1 or 0: off")
    seed_enable_extras: bool | None = True
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int | None = Field(1, ge=1)
    n_iter: int | None = Field(1, ge=1)
    steps: int | None = Field(50, ge=1)
    cfg_scale: float | None = Field(7.0, ge=0, le=100)
    width: int | None = _size(512)
    height: int | None = _size(512)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = Field(None, ge=0, le=10)
    s_min_uncond: float | None = Field(None, ge=0, description="NGMS: 0 or null = off")
    s_churn: float | None = Field(None, ge=0, le=100)
    s_tmax: float | None = Field(None, ge=0)
    s_tmin: float | None = Field(None, ge=0)
    s_noise: float | None = Field(None, ge=0, le=10)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = Field(None, gt=0, le=1, description="with refiner_checkpoint; default 0.8")
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    sampler_index: str | None = "Euler"
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(ProcessingRequest):
    enable_hr: bool | None = False
    denoising_strength: float | None = 0.75
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(ProcessingRequest):
    init_images: list[str] | None = Field(None, description="one base64 image (a data: URL prefix is accepted)")
    resize_mode: int | None = Field(0, ge=0, le=3)
    denoising_strength: float | None = Field(0.75, ge=0, le=1)
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="base64 image, white = repaint")
    mask_blur_x: int | None = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_blur_y: int | None = Field(4, ge=0, le=MAX_MASK_BLUR)
    mask_blur: int | None = Field(None, ge=0, le=MAX_MASK_BLUR)
    mask_round: bool | None = True
    inpainting_fill: int | None = Field(0, ge=0, le=3)
    inpaint_full_res: bool | None = True
    inpaint_full_res_padding: int | None = Field(0, ge=0, le=MAX_PADDING)
    inpainting_mask_invert: int | None = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = Field(None, ge=0, le=10, description="null: 1")
    latent_mask: str | None = None
    include_init_images: bool | None = False


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs, the infotext in their `parameters` chunk")
    parameters: dict
    info: str = Field(description="a JSON string: seeds, infotexts, model, ...")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(BaseModel):
    image: str = Field(description="base64 PNG")


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


# --- A1111 request -> GenerationRequest ---------------------------------------------------------------------------


def _refuse_unsupported(req: ProcessingRequest) -> None:
    for field, (neutral, why) in UNSUPPORTED.items():
        if field not in type(req).model_fields:
            continue
        value = getattr(req, field)
        if value is not None and value not in neutral:
            raise invalid(field, f"{value!r} is not supported ({why}); send {neutral[0]!r} or leave it out")


def _binary_mask(image: Image.Image) -> Image.Image:
    """A1111's mask reading: a transparent RGBA mask is its alpha channel thresholded, anything else is luminance."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return image.convert("L")


def to_generation(req: ProcessingRequest, state: ServerState, img2img: bool):
    """The library request, the model, the refiner and the hires checkpoint (or None), the list of ignored fields and
    the "SD upscale" script's settings (or None) for an A1111 request. Raises ApiError."""
    if req.infotext:
        req = _with_infotext(req)
    controlnet, others = split_scripts(req.alwayson_scripts)
    req = req.model_copy(update={"alwayson_scripts": others})
    _refuse_unsupported(req)
    ignored = sorted(req.model_extra or {})
    overrides = req.override_settings or {}
    ignored += [f"override_settings.{k}" for k in overrides if k not in SUPPORTED_OVERRIDES]
    checkpoint = overrides.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise invalid("override_settings.sd_model_checkpoint", "must be a model title or name")
    model = state.model(checkpoint, "override_settings.sd_model_checkpoint")
    clip_skip = _clip_skip(overrides.get("CLIP_stop_at_last_layers", state.options["CLIP_stop_at_last_layers"]),
                           "override_settings.CLIP_stop_at_last_layers")  # fmt: skip
    if req.save_images and state.config.output_dir is None:
        raise invalid("save_images", "this server saves no files; start it with --output-dir DIR to allow it")
    sampler = req.sampler_name or req.sampler_index or "Euler"
    prompt, negative = _styled(req.prompt or "", req.negative_prompt or "", req.styles or [], state.config.styles)
    fields = dict(
        prompt=prompt, negative_prompt=negative,
        width=req.width or 512, height=req.height or 512, steps=req.steps or 50,
        guidance=7.0 if req.cfg_scale is None else req.cfg_scale, sampler=sampler,
        schedule_type=req.scheduler or None,
        eta=req.eta if req.eta is not None and sampler_takes(sampler, "eta") else None,  # A1111 ignores it otherwise
        **_sigma_settings(sampler, overrides, state.options),
        eta_noise_seed_delta=_ensd(overrides.get("eta_noise_seed_delta", state.options["eta_noise_seed_delta"]),
                                   "override_settings.eta_noise_seed_delta"),
        seed=None if req.seed in (None, -1) else req.seed, rng="torch-cpu",
        batch_size=req.batch_size or 1, batch_count=req.n_iter or 1, clip_skip=clip_skip, tiling=bool(req.tiling),
        s_min_uncond=req.s_min_uncond or 0.0,
    )  # fmt: skip
    if req.seed_enable_extras is not False:  # A1111's "Extra" seed options; off, it ignores them
        fields.update(
            subseed=None if req.subseed in (None, -1) else req.subseed, subseed_strength=req.subseed_strength or 0.0,
            seed_resize_from_h=max(req.seed_resize_from_h or 0, 0),
            seed_resize_from_w=max(req.seed_resize_from_w or 0, 0),
        )  # fmt: skip
    if img2img:
        fields.update(_img2img_fields(req, state.config.limits.max_input_pixels))
    elif req.enable_hr:
        fields.update(_hires_fields(req))
        if req.firstpass_image:  # the first pass's result, given: A1111 1.8's hires fix on an existing image
            image = codec.decode_image(req.firstpass_image, "firstpass_image", state.config.limits.max_input_pixels)
            fields["firstpass_image"] = image.convert("RGB")
    max_pixels = state.config.limits.max_input_pixels
    fields["controlnet"], image_prompt = a1111_units(controlnet, state, max_pixels, fields.get("init_image"))
    fields.update(image_prompt)
    refiner = None
    if req.refiner_checkpoint not in (None, "", "None"):  # A1111's "None" in its refiner menu
        refiner = state.model(req.refiner_checkpoint, "refiner_checkpoint")
        # A1111's UI sends its "Switch at" (default 0.8); without one the library's default, 0.8, applies.
        fields["refiner_switch_at"] = req.refiner_switch_at
    hires = None
    if not img2img and req.enable_hr and req.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        hires = state.model(req.hr_checkpoint_name, "hr_checkpoint_name")
        hires = None if hires == model else hires  # the same checkpoint: A1111 keeps it and writes no field
    request = check_request(GenerationRequest(**fields), model, state.config.limits, NAMES, state.engine.upscalers)
    script = _script(req, request, state, img2img)
    return request, model, (refiner, hires), ignored, script


def _script(req: ProcessingRequest, request: GenerationRequest, state: ServerState, img2img: bool):
    """`script_name` "SD upscale" (img2img) with its `script_args` [info, overlap, upscaler (index into GET
    /upscalers or name), scale factor] -> `SDUpscale` naming its upscaler; other scripts are refused."""
    if req.script_name in (None, ""):
        return None
    if req.script_name.lower() != SD_UPSCALE.lower() or not img2img:
        where = "img2img" if img2img else "txt2img"
        raise invalid("script_name", f"{req.script_name!r} is not a script mlx-sd runs for {where}; it runs "
                      f"{SD_UPSCALE!r} (img2img)")  # fmt: skip
    args = list(req.script_args or []) + [None] * 4
    overlap = DEFAULT_OVERLAP if args[1] is None else args[1]
    scale = 2.0 if args[3] is None else args[3]
    if isinstance(overlap, bool) or not isinstance(overlap, int):
        raise invalid("script_args[1]", f"the tile overlap must be a whole number of pixels, got {overlap!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= MAX_SD_UPSCALE:
        raise invalid("script_args[3]", f"the scale factor must be a number in (0, {MAX_SD_UPSCALE}], got {scale!r}")
    names = [u["name"] for u in upscalers(state)]
    chosen = 0 if args[2] is None else args[2]
    if isinstance(chosen, int) and not isinstance(chosen, bool) and 0 <= chosen < len(names):
        name = names[chosen]
    elif isinstance(chosen, str) and chosen.lower() in (n.lower() for n in names):
        name = next(n for n in names if n.lower() == chosen.lower())
    else:
        raise invalid("script_args[2]", f"{chosen!r} is not an upscaler here: an index into or a name of "
                      f"{', '.join(names)}")  # fmt: skip
    settings = SDUpscale(name, float(scale), overlap)
    check_sd_upscale(request, settings, state.engine.upscalers, "script_args")
    return settings


def _styled(prompt: str, negative: str, names: list[str], styles: dict) -> tuple[str, str]:
    """The prompts with A1111's prompt styles applied in order (styles.csv given by `mlx-sd serve --styles`)."""
    for name in names:
        if name not in styles:
            known = ", ".join(styles) or "none (start the server with --styles styles.csv)"
            raise invalid("styles", f"unknown style {name!r}; this server's styles: {known}")
        prompt, negative = apply_style(styles[name][0], prompt), apply_style(styles[name][1], negative)
    return prompt, negative


def _sigma_settings(sampler: str, overrides: dict, options: dict) -> dict:
    """A1111's churn settings and noise multiplier for samplers that take them (from override_settings, else the
    server's options), left out at their defaults."""
    out = {}
    for name, default in SIGMA_SETTINGS.items():
        value = _sigma_value(overrides.get(name, options[name]), f"override_settings.{name}")
        if value != default and sampler_takes(sampler, name):
            out[name] = math.inf if name == "s_tmax" and value == 0 else value
    return out


def _ensd(value, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise invalid(param, f"must be a whole number from 0 to {MAX_SEED}, got {value!r}")
    return value


def _sigma_value(value, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise invalid(param, f"must be a number >= 0, got {value!r}")
    return float(value)


def _clip_skip(value, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLIP_SKIP:
        raise invalid(param, f"must be a whole number from 1 to {MAX_CLIP_SKIP}, got {value!r}")
    return value


# recorded parameters A1111 applies as settings (override_settings) when it reads an infotext
INFOTEXT_SETTINGS = {
    "clip_skip": "CLIP_stop_at_last_layers",
    "eta_noise_seed_delta": "eta_noise_seed_delta",
    **{k: k for k in SIGMA_SETTINGS},
}


def _with_infotext(req: ProcessingRequest) -> ProcessingRequest:
    """A1111's `infotext` field: the parameters it records fill the fields the request leaves unset (A1111's
    `apply_infotext`); recorded settings (clip skip, sigma settings) join override_settings unless set there."""
    fields, _ = request_fields(req.infotext)
    updates, overrides = {}, dict(req.override_settings or {})
    for name, value in fields.items():
        if name in INFOTEXT_SETTINGS:
            overrides.setdefault(INFOTEXT_SETTINGS[name], value)
            continue
        api = NAMES.get(name, name)
        if api in type(req).model_fields and api not in req.model_fields_set:
            updates[api] = API_CODES.get(api, {}).get(value, value)
    return req.model_copy(update={**updates, "override_settings": overrides, "infotext": None})


def _hires_fields(req: Txt2ImgRequest) -> dict:
    """A1111's hires-fix fields; its UI sends "Use same sampler" / "Use same scheduler" for the first pass's."""
    same = ("", "Use same sampler", "Use same scheduler")
    return dict(
        enable_hr=True, strength=0.75 if req.denoising_strength is None else req.denoising_strength,
        hr_scale=2.0 if req.hr_scale is None else req.hr_scale, hr_upscaler=req.hr_upscaler or "Latent",
        hr_second_pass_steps=req.hr_second_pass_steps or 0, hr_resize_x=req.hr_resize_x or 0,
        hr_resize_y=req.hr_resize_y or 0,
        hr_sampler=None if req.hr_sampler_name in (None, *same) else req.hr_sampler_name,
        hr_schedule_type=None if req.hr_scheduler in (None, *same) else req.hr_scheduler,
        hr_prompt=req.hr_prompt or "", hr_negative_prompt=req.hr_negative_prompt or "",
    )  # fmt: skip


def _img2img_fields(req: Img2ImgRequest, max_pixels: int) -> dict:
    if not req.init_images:
        raise invalid("init_images", "required: one base64 image")
    if len(req.init_images) > 1:
        raise invalid("init_images", f"{len(req.init_images)} images given; mlx-sd takes one init image per request")
    image = codec.decode_image(req.init_images[0], "init_images[0]", max_pixels)
    fields = dict(init_image=image.convert("RGB"), strength=0.75 if req.denoising_strength is None
                  else req.denoising_strength, resize_mode=RESIZE_MODES[req.resize_mode or 0],
                  initial_noise_multiplier=1.0 if req.initial_noise_multiplier is None
                  else req.initial_noise_multiplier)  # fmt: skip
    if req.image_cfg_scale is not None:  # InstructPix2Pix models' "Image CFG scale"; others ignore it, as A1111's do
        fields["image_guidance"] = req.image_cfg_scale
    if not req.mask:
        return fields
    mask = _binary_mask(codec.decode_image(req.mask, "mask", max_pixels))
    if req.mask_blur is not None:
        blur = req.mask_blur
    elif (req.mask_blur_x or 0) != (req.mask_blur_y or 0):
        raise invalid("mask_blur_x", "different x and y blurs are not supported; send mask_blur")
    else:
        blur = req.mask_blur_x or 0
    invert = bool(req.inpainting_mask_invert)
    fields.update(
        mask=mask, mask_blur=float(blur), invert_mask=invert, inpaint_full_res=bool(req.inpaint_full_res),
        inpainting_fill=INPAINTING_FILL[req.inpainting_fill or 0],
        inpaint_padding=req.inpaint_full_res_padding or 0, paste_back=True,
    )  # fmt: skip
    return fields


# --- results -> A1111 responses ------------------------------------------------------------------------------------


def _info(job: Job, seeds: list[int], infotexts: list[str], ignored: list[str]) -> str:
    request, model = job.request, job.model
    params = parse_infotext(infotexts[0])[2] if infotexts else {}
    width, height = request.width or model.defaults.width, request.height or model.defaults.height
    n = len(seeds)
    info = {
        "prompt": request.prompt, "all_prompts": [request.prompt] * n,
        "negative_prompt": request.negative_prompt, "all_negative_prompts": [request.negative_prompt] * n,
        "seed": request.seed, "all_seeds": seeds, "subseed": -1 if request.subseed is None else request.subseed,
        "all_subseeds": [-1] * n if request.subseed is None else [request.subseed + i for i in range(n)],
        "subseed_strength": request.subseed_strength,
        "width": width, "height": height, "sampler_name": params.get("Sampler", resolve(request.sampler)[0].name),
        "cfg_scale": request.guidance, "steps": request.steps, "batch_size": request.batch_size,
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model.name, "sd_model_hash": model.info.short_hash or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": request.seed_resize_from_w or -1,
        "seed_resize_from_h": request.seed_resize_from_h or -1,
        "denoising_strength": request.strength if request.init_image is not None or request.enable_hr else 0,
        "extra_generation_params": {k: v for k, v in params.items()
                                    if k == "Schedule type" or k.startswith(("Hires", "ControlNet", "IP-Adapter"))},
        "index_of_first_image": 0, "infotexts": infotexts, "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": request.clip_skip, "is_using_inpainting_conditioning": model.inpainting,
        "version": f"mlx-sd {__version__}", "job_id": job.id, "interrupted": job.status == "cancelled",
        "mlx_sd_ignored": ignored,
    }  # fmt: skip
    return json.dumps(info, ensure_ascii=False)


def _response(req: ProcessingRequest, job: Job, ignored: list[str]) -> dict:
    """A1111's {images, parameters, info}; an interrupted job answers with the images it finished."""
    if job.error is not None:
        raise job.error
    images = job.images
    if job.result is not None:
        seeds, infotexts = job.result.seeds, job.result.infotexts
    else:  # interrupted: the seeds are known (the server fixed the seed), the infotexts were not written
        seeds, infotexts = [job.request.seed + i for i in range(len(images))], []
    texts = infotexts + [None] * (len(images) - len(infotexts))
    encoded = [codec.b64encode(codec.encode(im, text)) for im, text in zip(images, texts)] if req.send_images else []
    parameters = req.model_dump(exclude=set(req.model_extra or {}))
    if isinstance(req, Img2ImgRequest) and not req.include_init_images:
        parameters["init_images"], parameters["mask"] = None, None
    return {"images": encoded, "parameters": parameters, "info": _info(job, seeds, infotexts, ignored)}


def a1111_parameters(text: str) -> dict:
    """Infotext -> the dict A1111's png-info returns: values as strings, sizes split into "-1"/"-2" keys."""
    prompt, negative, params = parse_infotext(text)
    result = {}
    for key, value in params.items():
        w, x, h = value.partition("x")
        if x and w.isdigit() and h.isdigit():
            result[f"{key}-1"], result[f"{key}-2"] = w, h
        else:
            result[key] = value
    result["Prompt"], result["Negative prompt"] = prompt, negative
    result.setdefault("Clip skip", "1")
    return result


def _memory() -> dict:
    ram: dict = {}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[1]) * page
        ram = {"free": total - used, "used": used, "total": total}
    except (OSError, ValueError, AttributeError) as e:
        ram = {"error": str(e) or type(e).__name__}
    try:
        import mlx.core as mx

        mlx = {"active": mx.get_active_memory(), "peak": mx.get_peak_memory(), "cache": mx.get_cache_memory()}
    except Exception as e:  # an older MLX without these counters
        mlx = {"error": str(e)}
    return {"ram": ram, "cuda": {"error": "unavailable"}, "mlx": mlx}


# --- routes --------------------------------------------------------------------------------------------------------

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


async def _generate(request: Request, req: ProcessingRequest, state: ServerState, img2img: bool) -> dict:
    gen, model, (refiner, hires), ignored, script = await run_in_threadpool(to_generation, req, state, img2img)
    source = "sdapi-img2img" if img2img else "sdapi-txt2img"
    job = Job(model, gen, refiner=refiner, hires=hires, source=source, save=bool(req.save_images), sd_upscale=script)
    if (req.override_settings or {}).get("sd_model_checkpoint") and req.override_settings_restore_afterwards is False:
        state.engine.default_model = model
    await run_to_completion(request, state, job)
    return await run_in_threadpool(_response, req, job, ignored)


@router.post("/txt2img", response_model=GenerationResponse)
async def txt2img(request: Request, req: Txt2ImgRequest, state: State):
    return await _generate(request, req, state, img2img=False)


@router.post("/img2img", response_model=GenerationResponse)
async def img2img(request: Request, req: Img2ImgRequest, state: State):
    return await _generate(request, req, state, img2img=True)


@router.get("/progress", response_model=ProgressResponse)
def progress(state: State, skip_current_image: bool = False):
    job = state.engine.running()
    queued = state.engine.queued()
    idle = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
            "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0, "queued": queued}  # fmt: skip
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": idle, "current_image": None, "textinfo": None}
    step = job.step
    batches = job.request.batch_count if job.request is not None else 1
    fraction = max(step.fraction if step else 0.0, 0.01)  # A1111 reports 0.01 once a job has started
    elapsed = time.time() - (job.started or time.time())
    busy = {**idle, "interrupted": job.control.cancelled, "job": job.id, "job_count": batches,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
            "job_no": step.batch if step else 0, "sampling_step": step.step if step else 0,
            "sampling_steps": step.total if step else 0}  # fmt: skip
    image = None
    if job.preview is not None and not skip_current_image:
        image = codec.b64encode(codec.encode(job.preview))
    textinfo = job.textinfo or (f"Step {step.step}/{step.total}" if step else None)
    return {"progress": min(fraction, 1.0), "eta_relative": elapsed / fraction - elapsed, "state": busy,
            "current_image": image, "textinfo": textinfo}  # fmt: skip


@router.post("/interrupt")
def interrupt(state: State):
    state.engine.interrupt()
    return {}


@router.post("/skip")
def skip(state: State):
    state.engine.skip()
    return {}


@router.get("/sd-models")
def sd_models(state: State):
    return [{"title": e.title, "model_name": e.name, "hash": e.info.short_hash or None, "sha256": e.info.sha256 or None,
             "filename": str(e.folder), "config": None} for e in state.registry.list()]  # fmt: skip


@router.post("/refresh-checkpoints")
def refresh_checkpoints(state: State):
    state.registry.refresh()
    return None


@router.get("/samplers")
def samplers():
    return [
        {"name": s.name, "aliases": list(s.aliases),
         "options": {"scheduler": s.default_schedule, "discard_next_to_last_sigma": s.discard_penultimate,
                     "uses_ensd": s.stochastic}}
        for s in list_samplers()
    ]  # fmt: skip


# A1111 reports these per schedule type; they describe its implementation, not ours, and are kept for clients.
_RHO = {"karras": 7.0, "polyexponential": 1.0}
_INNER_MODEL = {"sgm_uniform", "simple", "normal", "ddim"}


@router.get("/schedulers")
def schedulers():
    automatic = {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False}  # fmt: skip
    return [automatic] + [
        {"name": s.name, "label": s.label, "aliases": list(s.aliases) or None, "default_rho": _RHO.get(s.name, -1.0),
         "need_inner_model": s.name in _INNER_MODEL}
        for s in SCHEDULE_TYPES.values()
    ]  # fmt: skip


@router.get("/options")
def get_options(state: State):
    model = state.engine.default_model
    return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.info.sha256 or None, **FIXED_OPTIONS,
            **state.options}  # fmt: skip


@router.post("/options")
async def set_options(request: Request, options: dict[str, Any], state: State):
    ignored = [k for k in options if k not in SUPPORTED_OVERRIDES]
    clip_skip = None
    if "CLIP_stop_at_last_layers" in options:
        clip_skip = _clip_skip(options["CLIP_stop_at_last_layers"], "CLIP_stop_at_last_layers")
    sigma = {k: _sigma_value(options[k], k) for k in SIGMA_SETTINGS if k in options}  # checked before any change
    if "eta_noise_seed_delta" in options:
        sigma["eta_noise_seed_delta"] = _ensd(options["eta_noise_seed_delta"], "eta_noise_seed_delta")
    if "sd_model_checkpoint" in options:
        name = options["sd_model_checkpoint"]
        if not isinstance(name, str):
            raise invalid("sd_model_checkpoint", "must be a model title or name")
        entry = state.model(name, "sd_model_checkpoint")
        previous = state.engine.default_model
        if entry != previous:
            state.engine.default_model = entry  # requests queued from now on use it
            job = await run_to_completion(request, state, Job(entry, kind="load", source="options"))
            if job.status != "done":
                if state.engine.default_model == entry:
                    state.engine.default_model = previous
                raise job.error or ApiError(409, "the model switch was cancelled", code="cancelled")
    if clip_skip is not None:
        state.options["CLIP_stop_at_last_layers"] = clip_skip
    state.options.update(sigma)
    return {"mlx_sd_ignored": ignored}


@router.post("/png-info", response_model=PNGInfoResponse)
def png_info(req: PNGInfoRequest, state: State):
    image = codec.decode_image(req.image, "image", state.config.limits.max_input_pixels)
    items = codec.text_chunks(image)
    text = items.pop("parameters", "")
    return {"info": text, "items": items, "parameters": a1111_parameters(text) if text else {}}


@router.get("/memory")
def memory():
    return _memory()


# Lists A1111 clients read at start-up; mlx-sd has none of these things.
@router.get("/scripts")
def scripts(state: State):
    listing = scripts_listing(state)
    return {"txt2img": listing, "img2img": [SD_UPSCALE.lower(), *listing]}


@router.get("/sd-vae")
def sd_vae():
    return []


@router.get("/upscalers")
def upscalers(state: State):
    """The image upscalers (hires fix, Extras): A1111's model-free ones, then the models of --upscaler-dir."""
    builtin = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
               for name in IMAGE_UPSCALERS]  # fmt: skip
    library = state.engine.upscalers
    return builtin + ([] if library is None else library.api_listing())


@router.get("/latent-upscale-modes")
def latent_upscale_modes():
    return [{"name": name} for name in LATENT_UPSCALERS]


@router.get("/prompt-styles")
def prompt_styles(state: State):
    return [{"name": name, "prompt": prompt, "negative_prompt": negative}
            for name, (prompt, negative) in state.config.styles.items()]  # fmt: skip


@router.get("/embeddings")
def embeddings(state: State):
    """The embeddings of the loaded model (A1111's shape); empty without --embeddings-dir."""
    return state.engine.embedding_listing


@router.get("/loras")
def loras(state: State):
    """The LoRA files of --lora-dir with A1111's fields (name, alias, path, metadata); rescanned on every call."""
    library = state.engine.loras
    return [] if library is None else [entry.to_api() for entry in library.listing()]


@router.post("/refresh-loras")
def refresh_loras():
    return None  # the listing is read from the folder on every call
