"""Generation parameters in AUTOMATIC1111's "infotext" format, stored in the PNG `parameters` text chunk.

    a lighthouse at dusk, oil painting
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: ...

Images written this way round-trip with A1111, its `png-info` API and community sites that read the chunk.
Values containing a comma, colon or newline are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, PngImagePlugin

from .samplers import FOLLOW, SamplingPlan, resolve
from .schedules import schedule_type

if TYPE_CHECKING:  # params imports controlnet, which titles its models with a1111_title
    from .params import GenerationRequest

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt:"
# A1111's `re_param_code`: "Key: value" pairs, value either JSON-quoted or up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# The last line holds parameters only if it parses into at least this many pairs (A1111's rule).
_MIN_PARAMS = 3


def _quote(value) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def a1111_title(name: str, short_hash: str) -> str:
    """How A1111 lists a checkpoint, ControlNet or adapter: "name [short hash]", or the name alone without a hash."""
    return f"{name} [{short_hash}]" if short_hash else name


def format_params(params: Mapping[str, object]) -> str:
    """A1111's "Key: value, ..." line; `params` in display order, None values left out, values quoted where needed."""
    return ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The infotext string; `params` in display order, None values left out (e.g. {"Steps": 20, ...})."""
    pairs = format_params(params)
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{pairs}".strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split an infotext into (prompt, negative prompt, {key: value string}); inverse of `format_infotext`."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < _MIN_PARAMS:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative if in_negative else prompt).append(line)
    params = {k.strip(): _unquote(v.strip()) for k, v in _PARAM.findall(last)}
    return "\n".join(prompt), "\n".join(negative), params


def save_png(
    image: Image.Image, path: str | Path, infotext: str | None, texts: Mapping[str, str] | None = None
) -> None:
    """Write `image` as PNG with the infotext in its `parameters` chunk and any other `texts` chunks (A1111's
    "postprocessing"), atomically: no half-written files."""
    path = Path(path)
    meta = PngImagePlugin.PngInfo()
    if infotext:
        meta.add_text(PNG_KEY, infotext)
    for key, text in (texts or {}).items():
        meta.add_text(key, text)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=meta)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_infotext(source: str | Path | Image.Image) -> str | None:
    """The `parameters` text of a PNG (path or opened image), or None when it has none."""
    if isinstance(source, Image.Image):
        return source.info.get(PNG_KEY)
    with Image.open(source) as image:
        return image.info.get(PNG_KEY)


def _known(lookup):
    """A parser that keeps a name `lookup` accepts (and raises ValueError for the rest: reported, not applied)."""

    def parse(text: str) -> str:
        lookup(text)
        return text

    return parse


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


# infotext key -> (GenerationRequest field(s), parse); "Size"-like values fill two fields
_FIELDS = {
    "Steps": ("steps", int), "Sampler": ("sampler", _known(resolve)),
    "Schedule type": ("schedule_type", _known(schedule_type)),
    "CFG scale": ("guidance", float), "Image CFG scale": ("image_guidance", float), "Seed": ("seed", int),
    "Size": (("width", "height"), _size),
    "Denoising strength": ("strength", float), "Clip skip": ("clip_skip", int), "Eta": ("eta", float),
    "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Seed resize from": (("seed_resize_from_w", "seed_resize_from_h"), _size),
    "Hires upscale": ("hr_scale", float), "Hires resize": (("hr_resize_x", "hr_resize_y"), _size),
    "Hires steps": ("hr_second_pass_steps", int), "Hires upscaler": ("hr_upscaler", str),
    "Hires sampler": ("hr_sampler", _known(resolve)),
    "Hires schedule type": ("hr_schedule_type", _known(schedule_type)),
    "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
    "Tiling": ("tiling", lambda v: v.lower() == "true"), "NGMS": ("s_min_uncond", float),
    "Sigma churn": ("s_churn", float), "Sigma tmin": ("s_tmin", float), "Sigma tmax": ("s_tmax", float),
    "Sigma noise": ("s_noise", float), "Refiner switch at": ("refiner_switch_at", float),
    "Masked content": ("inpainting_fill", str), "ENSD": ("eta_noise_seed_delta", int),
    "Eta DDIM": ("eta", float), "Follow": ("follow", _known(FOLLOW.index)),
    "Noise multiplier": ("initial_noise_multiplier", float),
    # SD3's skip-layer guidance (mlx-sd's keys: A1111 has none)
    "SLG layers": ("skip_guidance_layers", lambda v: tuple(int(i) for i in v.replace(",", " ").split())),
    "SLG scale": ("skip_layer_guidance_scale", float), "SLG start": ("skip_layer_guidance_start", float),
    "SLG stop": ("skip_layer_guidance_stop", float),
    "RNG": ("rng", {"CPU": "torch-cpu", "MLX": "mlx", "torch-cpu-arm": "torch-cpu-arm"}.__getitem__),
}  # fmt: skip
_HIRES_KEYS = ("Hires upscale", "Hires resize", "Hires upscaler")


def request_fields(text: str) -> tuple[dict, dict[str, str]]:
    """The generation parameters an infotext (A1111's or ours) records, as `GenerationRequest` fields, for making
    the image again (A1111's "Send to txt2img").

    Returns:
        (fields, not_applied): keyword arguments for `GenerationRequest` (prompt, negative_prompt, steps, sampler,
        seed, size, hires fix, variation seed, ...), and the recorded parameters they do not cover, with their values
        (the model and its hash, LoRA hashes, A1111's GPU random source, its version, samplers and schedule types
        mlx-sd does not have, ...).
    """
    prompt, negative, params = parse_infotext(text)
    fields: dict = {"prompt": prompt, "negative_prompt": negative}
    not_applied = {}
    for key, value in params.items():
        names, parse = _FIELDS.get(key, (None, None))
        try:
            parsed = parse(value) if parse else None
        except (ValueError, KeyError):
            parsed = None
        if parsed is None:
            not_applied[key] = value
        elif isinstance(names, tuple):
            fields.update(zip(names, parsed))
        else:
            fields[names] = parsed
    if "Denoising strength" in params and any(k in params for k in _HIRES_KEYS):
        fields["enable_hr"] = True  # A1111's rule for pasting a txt2img infotext
    return fields, not_applied


# --- the infotext of a generation ---------------------------------------------------------------------------------


def generation_infotext(
    request: GenerationRequest, seed: int, plan: SamplingPlan, info, refiner: str | None = None,
    ip_adapter: str | None = None, loras=(), embeddings=(), hires_checkpoint: str | None = None, edit: bool = False,
) -> str:  # fmt: skip
    """A1111's infotext of one image: `request` (resolved), its `seed`, the sampling `plan`, the model's `ModelInfo`,
    the refiner's name when one ran, the IP-Adapter's title when an image prompt was given, the hires pass's model
    ("name [hash]") when it was another, whether the model is an InstructPix2Pix one (its "Image CFG scale"). LoRAs
    set from Python/CLI are written as `<lora:name:weight>` tags after the prompt (how A1111 records every LoRA), with
    "Lora hashes"; embeddings named in the prompts give "TI hashes"."""
    from . import __version__
    from .hires import hires_infotext
    from .lora import lora_hashes
    from .textual_inversion import ti_hashes

    params = {
        "Steps": request.steps,
        "Sampler": plan.sampler.name,
        "Schedule type": _schedule_label(request, plan),
        "CFG scale": request.guidance,
        "Image CFG scale": request.image_guidance if edit else None,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": info.short_hash or None,
        "Model": info.name,
        # what makes the image again beside A1111's fields: which reference the sampler follows, its eta
        "Follow": "diffusers" if plan.follows.startswith("diffusers") and plan.sampler.kdiffusion else None,
        ("Eta DDIM" if plan.sampler.name == "DDIM" else "Eta"): _eta(request, plan),
        "Variation seed": request.subseed + seed - request.seed if request.subseed_strength else None,
        "Variation seed strength": request.subseed_strength or None,
        "Seed resize from": f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
        else None,
        "Denoising strength": request.strength if request.init_image is not None or request.enable_hr else None,
        "Masked content": request.inpainting_fill
        if request.mask is not None and request.inpainting_fill != "original"
        else None,
        "Noise multiplier": request.initial_noise_multiplier
        if request.init_image is not None and request.initial_noise_multiplier != 1.0
        else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Tiling": True if request.tiling else None,
        "NGMS": request.s_min_uncond or None,
        **_slg_infotext(request),
        # A1111 records ENSD for its ancestral samplers (the ones drawing fresh noise every step)
        "ENSD": request.eta_noise_seed_delta or None
        if plan.sampler.stochastic and plan.sampler.kdiffusion and not plan.sampler.brownian and request.eta != 0
        else None,
        # A1111 records the churn settings and noise multiplier that differ from the sampler's defaults
        "Sigma churn": request.s_churn or None,
        "Sigma tmin": request.s_tmin or None,
        "Sigma tmax": request.s_tmax if request.s_tmax not in (None, math.inf) else None,
        "Sigma noise": request.s_noise if request.s_noise not in (None, 1.0) else None,
        **(hires_infotext(request, hires_checkpoint) if request.enable_hr else {}),
        **{f"ControlNet {i}": unit.infotext() for i, unit in enumerate(request.controlnet)},
        # the image prompt's adapter and weight (the image itself is not recorded, as A1111 records none)
        "IP-Adapter": ip_adapter,
        "IP-Adapter weight": request.ip_adapter_scale if ip_adapter else None,
        "Refiner": refiner,
        "Refiner switch at": request.refiner_switch_at if refiner else None,
        "RNG": {"torch-cpu": "CPU", "mlx": "MLX"}.get(request.rng, request.rng),
        "Lora hashes": lora_hashes(loras),
        "TI hashes": ti_hashes(embeddings),
        "Version": f"mlx-sd {__version__}",
    }
    tags = " ".join(a.tag() for a in loras if not a.mentioned)
    prompt = f"{request.prompt} {tags}" if tags and request.prompt else request.prompt or tags
    return format_infotext(prompt, request.negative_prompt, params)


def _schedule_label(request: GenerationRequest, plan: SamplingPlan) -> str | None:
    """A1111's "Schedule type": the plan's for A1111-style plans; for diffusers-style ones the schedule type asked
    for, if any (their spacing comes from the model's scheduler config, and is no A1111 schedule type)."""
    if not plan.follows.startswith("diffusers"):
        return plan.schedule_label or None
    stype = resolve(request.sampler, request.schedule_type)[1]
    return stype.label if stype is not None else None


def _eta(request: GenerationRequest, plan: SamplingPlan) -> float | None:
    """The eta to record: A1111 writes it when it differs from the sampler's default (1 ancestral, 0 DDIM)."""
    parameter = inspect.signature(plan.function).parameters.get("eta")
    if request.eta is None or parameter is None or request.eta == parameter.default:
        return None
    return request.eta


def _slg_infotext(request) -> dict:
    """SD3's skip-layer guidance, when on: the layers space-separated (an infotext value holds no commas unquoted)."""
    if not request.skip_guidance_layers:
        return {}
    r = request
    return {"SLG layers": " ".join(map(str, r.skip_guidance_layers)), "SLG scale": r.skip_layer_guidance_scale,
            "SLG start": r.skip_layer_guidance_start, "SLG stop": r.skip_layer_guidance_stop}  # fmt: skip
