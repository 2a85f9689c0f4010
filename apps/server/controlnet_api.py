"""ControlNet through the server: the native API's units, A1111's ControlNet extension API (units in
`alwayson_scripts`, and the extension's own routes), both resolved against `--controlnet-dir` before a job is queued.

    GET  /controlnet/version        {"version": 2}
    GET  /controlnet/model_list     {"model_list": ["control_v11p_sd15_canny [d14c016b]", ...]}
    GET  /controlnet/module_list    {"module_list": ["none", "invert", "canny"], "module_detail": {...}}
    POST /controlnet/detect         the preprocessor's images for input images (base64 PNGs)
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from mlx_sd.controlnet import (
    A1111_CONTROL_MODES,
    A1111_HR_OPTIONS,
    A1111_MODULES,
    A1111_RESIZE_MODES,
    CONTROL_MODES,
    HR_OPTIONS,
    MAX_PROCESSOR_RES,
    MIN_PROCESSOR_RES,
    MODULES,
    ControlNetUnit,
)
from mlx_sd.preprocessors import CANNY_DEFAULTS, PREPROCESSORS, PROCESSOR_RES, preprocess
from mlx_sd.reference import REFERENCE_MODULES
from mlx_sd_convert import ConversionError
from mlx_sd_convert.library import TITLE_HASH as _TITLE_HASH

from . import codec
from .errors import invalid
from .state import ServerState, State

SCRIPT = "controlnet"  # A1111 matches alwayson script names case-insensitively ("ControlNet" from webuiapi)
MAX_WEIGHT = 10.0
# the extension's numeric codes and UI names, beside the library's
RESIZE = {0: "resize", 1: "crop", 2: "fill", **{v: k for k, v in A1111_RESIZE_MODES.items()}}
CONTROL = {0: "balanced", 1: "prompt", 2: "controlnet", **{v: k for k, v in A1111_CONTROL_MODES.items()}}
# HiResFixOption by index, value ("Low res only") or name as its str() writes it ("HiResFixOption.LOW_RES_ONLY")
HR = {**dict(enumerate(HR_OPTIONS)), **{v: k for k, v in A1111_HR_OPTIONS.items()},
      **{f"HiResFixOption.{k.upper()}": k for k in HR_OPTIONS}}  # fmt: skip
A1111_NAMES = {"invert (from white bg & black line)": "invert", **{m: m for m in MODULES},
               "lineart_standard (from white bg & black line)": "lineart_standard",
               **{v: k for k, v in A1111_MODULES.items()}}  # fmt: skip
UNSET = -1  # the extension's "default" for processor_res and thresholds
# the extension's IP-Adapter modules (which CLIP encoder to run): this server runs the one given by --image-encoder
IP_MODULES = ("ip-adapter_clip_sd15", "ip-adapter_clip_h", "ip-adapter_clip_sdxl", "ip-adapter_clip_g",
              "ip-adapter_clip_sdxl_plus_vith", "ip-adapter-auto")  # fmt: skip


class UnitRequest(BaseModel):
    """One ControlNet unit of the native API (mlx_sd.controlnet.ControlNetUnit's fields)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    model: str | None = Field(None, description="a ControlNet of --controlnet-dir (GET /controlnet/model_list); "
                              "none for the reference modules")  # fmt: skip
    image: str | None = Field(None, description="the control image (or the photo `module` preprocesses), base64; "
                              "unused by module 'inpaint' (the request's init image and mask)")  # fmt: skip
    weight: float = Field(1.0, ge=0, le=MAX_WEIGHT)
    guidance_start: float = Field(0.0, ge=0, le=1)
    guidance_end: float = Field(1.0, ge=0, le=1)
    control_mode: Literal[CONTROL_MODES] = "balanced"
    resize_mode: Literal["resize", "crop", "fill"] = "crop"
    module: Literal[MODULES] = "none"
    processor_res: int = Field(PROCESSOR_RES, ge=MIN_PROCESSOR_RES, le=MAX_PROCESSOR_RES)
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    hr_option: Literal[HR_OPTIONS] = Field("both", description="the hires fix passes the unit acts in")


def check_model(name: str, state: ServerState, param: str) -> str:
    """`name` if --controlnet-dir holds it; 422 naming `param` otherwise."""
    library = state.engine.controlnets
    if library is None:
        raise invalid(param, "this server has no ControlNets: start it with --controlnet-dir DIR")
    try:
        library.find(name)
    except ConversionError as e:
        raise invalid(param, str(e)) from None
    return name


def native_units(units: list[UnitRequest], state: ServerState, max_pixels: int) -> tuple[ControlNetUnit, ...]:
    out = []
    for i, unit in enumerate(units):
        fields = unit.model_dump()
        if unit.module in REFERENCE_MODULES:  # the UNet itself runs them
            fields["model"] = None if unit.model in (None, "", "None") else unit.model  # (validate refuses one)
        elif unit.model is None:
            raise invalid(f"controlnet[{i}].model", f"module {unit.module!r} needs a ControlNet")
        else:
            fields["model"] = check_model(unit.model, state, f"controlnet[{i}].model")
        if unit.image is not None:
            fields["image"] = codec.decode_image(unit.image, f"controlnet[{i}].image", max_pixels).convert("RGB")
        out.append(_unit(fields, f"controlnet[{i}]"))
    return tuple(out)


def split_scripts(scripts: dict | None) -> tuple[list, dict]:
    """(the ControlNet extension's unit arguments, the other alwayson scripts)."""
    scripts = dict(scripts or {})
    key = next((k for k in scripts if k.lower() == SCRIPT), None)
    if key is None:
        return [], scripts
    entry = scripts.pop(key)
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise invalid(f"alwayson_scripts.{key}", 'expected {"args": [unit, ...]}')
    return args, scripts


def a1111_units(args: list, state: ServerState, max_pixels: int, init_image=None) -> tuple[tuple, dict]:
    """The enabled units of the extension's `args`, as its API reads them (names or numeric codes, -1 for
    defaults; in img2img a unit without an image controls with the init image).

    Returns:
        (the ControlNet units, the request fields of an IP-Adapter unit ({} without one): the extension runs
        IP-Adapters as units with an "ip-adapter_*" module)
    """
    out, prompt = [], {}
    for i, arg in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{i}]"
        if not isinstance(arg, dict):
            raise invalid(where, "expected a ControlNet unit object")
        reference = arg.get("module") in REFERENCE_MODULES  # no model: the UNet itself runs them
        if not arg.get("enabled", True) or (arg.get("model") in (None, "", "None") and not reference):
            continue
        if str(arg.get("module", "")).startswith("ip-adapter"):
            if prompt:
                raise invalid(where, "one IP-Adapter unit per request")
            prompt = _image_prompt(arg, state, max_pixels, init_image, where)
            continue
        out.append(_a1111_unit(arg, state, max_pixels, init_image, where))
    return tuple(out), prompt


def _image_prompt(arg: dict, state: ServerState, max_pixels: int, init_image, where: str) -> dict:
    """An IP-Adapter unit as the request's image prompt: the server's IP-Adapter, at the unit's weight."""
    if arg["module"] not in IP_MODULES:
        raise invalid(f"{where}.module", f"{arg['module']!r} is not one of {', '.join(IP_MODULES)}")
    title = state.engine.ip_adapter_title
    if title is None:
        raise invalid(f"{where}.model", "this server has no IP-Adapter: start it with --ip-adapter FILE "
                      "--image-encoder DIR")  # fmt: skip
    if _TITLE_HASH.sub("", str(arg["model"])) != _TITLE_HASH.sub("", title):  # by name, as the extension finds models
        raise invalid(f"{where}.model", f"{arg['model']!r}: this server's IP-Adapter is {title!r}")
    neutral = {"guidance_start": (0, 0.0), "guidance_end": (1, 1.0), "control_mode": ("Balanced", 0)}
    for key, values in neutral.items():
        if arg.get(key, values[0]) not in values:
            raise invalid(f"{where}.{key}", "an IP-Adapter acts on every step and both guidance halves here; "
                          f"send {values[0]!r} or leave it out")  # fmt: skip
    return {"ip_adapter_image": _unit_image(arg, max_pixels, init_image, where),
            "ip_adapter_scale": _number(arg.get("weight", 1.0), f"{where}.weight")}  # fmt: skip


def _unit_image(arg: dict, max_pixels: int, init_image, where: str):
    """A unit's image: base64 (or {"image": ...}; legacy input_image), else in img2img the init image."""
    image = arg.get("image", arg.get("input_image"))
    if isinstance(image, dict):
        if image.get("mask"):
            raise invalid(f"{where}.image.mask", "ControlNet masks (inpaint preprocessors) are not supported")
        image = image.get("image")
    if arg.get("mask"):
        raise invalid(f"{where}.mask", "ControlNet masks (inpaint preprocessors) are not supported")
    if image:
        return codec.decode_image(image, f"{where}.image", max_pixels).convert("RGB")
    if init_image is not None:
        return init_image  # the extension's img2img rule
    raise invalid(f"{where}.image", "required: the control image (base64)")


def _a1111_unit(arg: dict, state: ServerState, max_pixels: int, init_image, where: str) -> ControlNetUnit:
    image = _unit_image(arg, max_pixels, init_image, where)
    res, low, high = (arg.get(k, UNSET) for k in ("processor_res", "threshold_a", "threshold_b"))
    reference = arg.get("module") in REFERENCE_MODULES
    fields = {
        "model": None if reference else check_model(str(arg["model"]), state, f"{where}.model"),
        "image": image,
        "module": _choice(A1111_NAMES, arg.get("module", "none"), f"{where}.module"),
        "weight": _number(arg.get("weight", 1.0), f"{where}.weight"),
        "resize_mode": _choice(RESIZE, arg.get("resize_mode", "Crop and Resize"), f"{where}.resize_mode"),
        "control_mode": _choice(CONTROL, arg.get("control_mode", "Balanced"), f"{where}.control_mode"),
        "guidance_start": _number(arg.get("guidance_start", 0.0), f"{where}.guidance_start"),
        "guidance_end": _number(arg.get("guidance_end", 1.0), f"{where}.guidance_end"),
        "processor_res": PROCESSOR_RES if res in (None, UNSET) else int(_number(res, f"{where}.processor_res")),
        "threshold_a": None if low in (None, UNSET) else _number(low, f"{where}.threshold_a"),
        "threshold_b": None if high in (None, UNSET) else _number(high, f"{where}.threshold_b"),
        "pixel_perfect": bool(arg.get("pixel_perfect", False)),
        "hr_option": _choice(HR, arg.get("hr_option", "Both"), f"{where}.hr_option"),
    }
    return _unit(fields, where)


def _unit(fields: dict, where: str) -> ControlNetUnit:
    unit = ControlNetUnit(**fields)
    try:
        unit.validate()
    except ValueError as e:
        raise invalid(where, str(e)) from None
    return unit


def _choice(table: dict, value, param: str):
    if not isinstance(value, str | int) or isinstance(value, bool) or value not in table:
        names = ", ".join(repr(k) for k in table)
        raise invalid(param, f"{value!r} is not one of {names}")
    return table[value]


def _number(value, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(param, f"must be a number, got {value!r}")
    return float(value)


# --- the extension's routes ------------------------------------------------------------------------------------

router = APIRouter(prefix="/controlnet", tags=["ControlNet (A1111 extension)"])


@router.get("/version")
def version():
    return {"version": 2}


@router.get("/model_list")
def model_list(state: State, update: bool = True):
    library, ip = state.engine.controlnets, state.engine.ip_adapter_title
    return {"model_list": (list(library.listing()) if library is not None else []) + ([ip] if ip else [])}


@router.get("/module_list")
def module_list(alias_names: bool = False):
    canny = [
        {"name": "Preprocessor Resolution", "value": PROCESSOR_RES, "min": 64, "max": 2048},
        {"name": "Canny Low Threshold", "value": CANNY_DEFAULTS[0], "min": 1, "max": 255},
        {"name": "Canny High Threshold", "value": CANNY_DEFAULTS[1], "min": 1, "max": 255},
    ]
    sliders = {"canny": canny}
    detail = {m: {"model_free": True, "sliders": sliders.get(m, [])} for m in PREPROCESSORS}
    return {"module_list": [*PREPROCESSORS, *IP_MODULES], "module_detail": detail}


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(default_factory=list)
    controlnet_processor_res: int = PROCESSOR_RES
    controlnet_threshold_a: float = UNSET
    controlnet_threshold_b: float = UNSET


@router.post("/detect")
async def detect(req: DetectRequest, state: State):
    module = _choice({k: v for k, v in A1111_NAMES.items() if v in PREPROCESSORS}, req.controlnet_module,
                     "controlnet_module")  # fmt: skip
    res = PROCESSOR_RES if req.controlnet_processor_res == UNSET else req.controlnet_processor_res
    if not MIN_PROCESSOR_RES <= res <= MAX_PROCESSOR_RES:
        raise invalid("controlnet_processor_res", f"must be between {MIN_PROCESSOR_RES} and {MAX_PROCESSOR_RES}")
    low, high = (None if t == UNSET else t for t in (req.controlnet_threshold_a, req.controlnet_threshold_b))
    max_pixels = state.config.limits.max_input_pixels

    def run() -> list[str]:
        out = []
        for i, data in enumerate(req.controlnet_input_images):
            image = codec.decode_image(data, f"controlnet_input_images[{i}]", max_pixels)
            try:
                detected = preprocess(image, module, res, low, high)
            except ValueError as e:  # canny without OpenCV installed
                raise invalid("controlnet_module", str(e)) from None
            out.append(codec.b64encode(codec.encode(detected)))
        return out

    return {"images": await run_in_threadpool(run), "info": "Success"}


def scripts_listing(state: ServerState) -> list[str]:
    """The alwayson scripts GET /sdapi/v1/scripts reports: "controlnet" when ControlNets are configured."""
    return [SCRIPT] if state.engine.controlnets is not None else []
