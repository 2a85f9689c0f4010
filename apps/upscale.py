"""`mlx-sd upscale`: A1111's Extras upscaling from the command line (an image enlarged by an upscaler, no diffusion)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mlx_sd.extras import POSTPROCESSING_KEY, extras_infotext, extras_upscale
from mlx_sd.infotext import read_infotext, save_png
from mlx_sd.model_upscaler import TILE, TILE_OVERLAP
from mlx_sd.upscale import IMAGE_UPSCALERS

from .errors import UserError

DEFAULT_OUTPUT = "{stem}-upscaled.png"


def add_parser(sub) -> None:
    p = sub.add_parser("upscale", help="enlarge images with an upscaler: ESRGAN models, Lanczos (A1111's Extras)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--upscaler", required=True,
                   help="an upscaler file (.pth/.safetensors: ESRGAN, SwinIR, DAT, ScuNET, HAT, SPAN, ...), a name "
                        f"in --upscaler-dir (e.g. \"R-ESRGAN 4x+\") or {', '.join(IMAGE_UPSCALERS)}")  # fmt: skip
    add_upscaler_dir(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float, default=4.0, help="scale by (default: %(default)s)")
    size.add_argument("--size", metavar="WxH", help="scale to this size instead (e.g. 2048x1536)")
    p.add_argument("--no-crop", action="store_true", help="with --size: keep the upscaled size, no centred crop")
    p.add_argument("--max-side-length", type=int, default=0, help="with --scale: cap the longer side (0: no cap)")
    p.add_argument("--upscaler-2", help="a second upscaler to blend in")
    p.add_argument("--upscaler-2-visibility", type=float, default=0.5, help="its share of the blend (0-1)")
    p.add_argument(
        "--tile",
        type=int,
        help=f"model tile size in pixels (0: whole image at once; default: A1111's, {TILE}, ScuNET 256)",
    )
    p.add_argument("--tile-overlap", type=int, default=TILE_OVERLAP, help="model tile overlap in pixels")
    p.add_argument(
        "--output",
        default=DEFAULT_OUTPUT,
        help="output PNG path; {stem} (the input's name) and {i} are filled in (default: %(default)s)",
    )
    p.set_defaults(run=run_upscale)


def add_upscaler_dir(parser) -> None:
    parser.add_argument("--upscaler-dir", type=Path, metavar="DIR",
                        help="folder of upscaler models (A1111's models/ESRGAN, models/RealESRGAN), by file name or "
                             "A1111's name for the Real-ESRGAN releases")  # fmt: skip


def resolve_upscaler(name: str, folder: Path | None, dtype=None):
    """A built-in upscaler's name, or the model upscaler a file path or a name in `folder` gives, loaded."""
    from mlx_sd_convert import ConversionError
    from mlx_sd_convert.upscaler import read_upscaler

    if name in IMAGE_UPSCALERS:
        return name
    try:
        if Path(name).expanduser().is_file():
            return read_upscaler(name, dtype)
        if folder is None:
            raise UserError(f"upscaler {name!r} is not a file; name a model file, give --upscaler-dir, or use one of "
                            f"{', '.join(IMAGE_UPSCALERS)}")  # fmt: skip
        return library(folder, dtype)(name)
    except ConversionError as e:
        raise UserError(str(e)) from None


def library(folder: Path, dtype=None):
    """The --upscaler-dir folder as a resolver (checked to exist)."""
    from mlx_sd_convert.library import UpscalerLibrary

    if not folder.is_dir():
        raise UserError(f"--upscaler-dir {folder} is not a folder")
    return UpscalerLibrary(folder, dtype)


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: write WIDTHxHEIGHT, e.g. 2048x1536") from None
    return width, height


def run_upscale(args) -> None:
    size = _size(args.size) if args.size else None
    upscalers = [resolve_upscaler(args.upscaler, args.upscaler_dir)]
    if args.upscaler_2:
        upscalers.append(resolve_upscaler(args.upscaler_2, args.upscaler_dir))
    for upscaler in upscalers:
        if not isinstance(upscaler, str):
            upscaler.tile = upscaler.tile if args.tile is None else args.tile
            upscaler.tile_overlap = args.tile_overlap
    for i, path in enumerate(args.images):
        try:
            with Image.open(path) as opened:
                image = opened.copy()
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{path} is not a readable image ({e})") from None
        out = Path(args.output.format(stem=path.stem, i=i))
        if out.resolve() == path.resolve():
            raise UserError(f"--output {out} would overwrite the input image; choose another name")
        try:
            result, info = extras_upscale(
                image, upscalers[0], scale=args.scale, size=size, crop=not args.no_crop,
                max_side_length=args.max_side_length, upscaler_2=upscalers[1] if len(upscalers) > 1 else None,
                upscaler_2_visibility=args.upscaler_2_visibility,
            )  # fmt: skip
        except ValueError as e:
            raise UserError(str(e)) from None
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        # A1111 keeps the image's generation parameters and adds what the upscaling did
        save_png(result, out, read_infotext(image), {POSTPROCESSING_KEY: extras_infotext(info)} if info else None)
        print(f"{out}  ({result.width}x{result.height})")
