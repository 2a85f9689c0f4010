"""Generation parameters in AUTOMATIC1111's "infotext" format, stored in the PNG `parameters` text chunk.

    a lighthouse at dusk, oil painting
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, Model hash: ...

Images written this way round-trip with A1111, its `png-info` API and community sites that read the chunk.
Values containing a comma, colon or newline are JSON-quoted, as A1111 does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

from .samplers import FOLLOW, resolve
from .schedules import schedule_type

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


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The infotext string; `params` in display order, None values left out (e.g. {"Steps": 20, ...})."""
    pairs = ", ".join(f"{k}: {_quote(v)}" for k, v in params.items() if v is not None)
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


def save_png(image: Image.Image, path: str | Path, infotext: str | None) -> None:
    """Write `image` as PNG with the infotext in its `parameters` chunk (atomically: no half-written files)."""
    path = Path(path)
    meta = PngImagePlugin.PngInfo()
    if infotext:
        meta.add_text(PNG_KEY, infotext)
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
    "CFG scale": ("guidance", float), "Seed": ("seed", int), "Size": (("width", "height"), _size),
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
