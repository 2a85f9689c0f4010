"""`mlx-sd generate`'s image-conditioning flags: ControlNet units from `--controlnet MODEL IMAGE` (settings given once
or once per unit) and an IP-Adapter's image prompt."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlx_sd.controlnet import CONTROL_MODES, HR_OPTIONS, MODULES, ControlNetUnit
from mlx_sd.images import RESIZE_MODES
from mlx_sd.preprocessors import PROCESSOR_RES
from mlx_sd.reference import REFERENCE_MODULES

from .errors import UserError

# flag -> (unit field, type, default, help); each is given once (for every unit) or once per --controlnet
SETTINGS = {
    "--control-weight": ("weight", float, 1.0, "residual scale (default 1)"),
    "--control-start": ("guidance_start", float, 0.0, "fraction of the steps before the unit acts (default 0)"),
    "--control-end": ("guidance_end", float, 1.0, "fraction of the steps after which it stops (default 1)"),
    "--control-mode": ("control_mode", str, "balanced", f"one of {', '.join(CONTROL_MODES)} (A1111's control "
                       "modes: My prompt / ControlNet is more important; diffusers' guess mode)"),
    "--control-module": ("module", str, "none", f"preprocessor: {', '.join(MODULES)} (default none: the image is "
                         "a control map already; inpaint / inpaint_only: the init image and mask, for inpainting "
                         "ControlNets; inpaint_only also keeps the known region; reference_*: --controlnet none IMAGE, "
                         "the UNet steered towards IMAGE)"),
    "--control-resize-mode": ("resize_mode", str, "crop", f"fit the image: {', '.join(RESIZE_MODES[:3])} "
                              "(default crop, A1111's Crop and Resize)"),
    "--control-processor-res": ("processor_res", int, PROCESSOR_RES, "preprocessor resolution (short side)"),
    "--control-threshold-a": ("threshold_a", float, None, "preprocessor threshold A (canny: low, default 100)"),
    "--control-threshold-b": ("threshold_b", float, None, "preprocessor threshold B (canny: high, default 200)"),
    "--control-hr-option": ("hr_option", str, "both", f"the hires fix passes it acts in: {', '.join(HR_OPTIONS)} "
                            "(default both)"),
}  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("ControlNet (repeat --controlnet for several units; settings once, or once per unit)")
    group.add_argument("--controlnet", nargs=2, action="append", default=[], metavar=("MODEL", "IMAGE"),
                       help="a ControlNet (file, diffusers folder, or a name in --controlnet-dir) and its control "
                            "image")  # fmt: skip
    group.add_argument("--controlnet-dir", type=Path, metavar="DIR", help="folder of ControlNets named by --controlnet")
    for flag, (_, kind, _, meaning) in SETTINGS.items():
        metavar = {float: "X", int: "N"}.get(kind, "NAME")
        group.add_argument(flag, type=kind, action="append", default=[], metavar=metavar, help=meaning)
    group.add_argument("--control-pixel-perfect", action="store_true",
                       help="preprocessor resolution from the output size (A1111's Pixel Perfect)")  # fmt: skip
    ip = p.add_argument_group("IP-Adapter (an image as a prompt)")
    ip.add_argument("--ip-adapter", type=Path, metavar="FILE", help="an IP-Adapter file (ip-adapter_sd15.safetensors)")
    ip.add_argument("--image-encoder", type=Path, metavar="DIR",
                    help="its CLIP image encoder, a transformers folder (models/image_encoder)")  # fmt: skip
    ip.add_argument("--ip-adapter-image", type=Path, metavar="IMAGE", help="the image prompt")
    ip.add_argument("--ip-adapter-scale", type=float, default=1.0, help="weight of the image prompt (default 1)")


def ip_adapter(args, open_image):
    """(the IP-Adapter the flags name, loaded, or None; the image prompt or None)."""
    given = [flag for flag, value in (("--ip-adapter", args.ip_adapter), ("--image-encoder", args.image_encoder),
                                      ("--ip-adapter-image", args.ip_adapter_image)) if value is not None]  # fmt: skip
    if not given:
        return None, None
    if len(given) < 3:
        raise UserError("an image prompt needs --ip-adapter FILE, --image-encoder DIR and --ip-adapter-image IMAGE")
    from mlx_sd_convert import ConversionError
    from mlx_sd_convert.ip_adapter import read_ip_adapter

    image = open_image(args.ip_adapter_image, "--ip-adapter-image")
    try:
        return read_ip_adapter(args.ip_adapter, args.image_encoder), image
    except ConversionError as e:
        raise UserError(str(e)) from None


def units(args, open_image, load) -> tuple[ControlNetUnit, ...]:
    """The units the flags describe. `open_image(path, what)` opens an image; `load(path)` reads a ControlNet."""
    n = len(args.controlnet)
    settings = {}
    for flag, (name, _, default, _) in SETTINGS.items():
        given = getattr(args, flag[2:].replace("-", "_"))
        if given and not n:
            raise UserError(f"{flag} needs --controlnet MODEL IMAGE")
        if len(given) not in (0, 1, n):
            raise UserError(f"{flag} is given {len(given)} times for {n} ControlNets: give it once, or once per unit")
        settings[name] = given * n if len(given) == 1 else given or [default] * n
    if args.control_pixel_perfect and not n:
        raise UserError("--control-pixel-perfect needs --controlnet MODEL IMAGE")
    if args.controlnet_dir is not None and not args.controlnet_dir.is_dir():
        raise UserError(f"--controlnet-dir {args.controlnet_dir} is not a folder")
    out = []
    for i, (model, image) in enumerate(args.controlnet):
        path = Path(model).expanduser()
        reference = settings["module"][i] in REFERENCE_MODULES and model.lower() == "none"  # the UNet runs them
        if not reference and not path.exists() and args.controlnet_dir is None:
            raise UserError(f"--controlnet {model}: no such file or folder (or give --controlnet-dir to find names)")
        unit = ControlNetUnit(
            None if reference else load(path) if path.exists() else model,
            open_image(Path(image), "--controlnet image"),
            pixel_perfect=args.control_pixel_perfect, **{name: values[i] for name, values in settings.items()},
        )  # fmt: skip
        try:
            unit.validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        out.append(unit)
    return tuple(out)
