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
