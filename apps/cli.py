"""The `mlx-sd` command: one entry point, one subcommand per job.

User errors (a missing file, a bad size, an unknown sampler) print one line naming the problem and the fix,
and exit with status 2; tracebacks are for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys

import mlx_sd  # first: loads OpenBLAS before mlx.core


class UserError(Exception):
    """An error the user can fix; printed as one line without a traceback."""


def _version(args) -> None:
    print(json.dumps({"mlx_sd": mlx_sd.__version__, **mlx_sd.backend.describe()}, indent=2))


def _convert(args) -> None:
    from tqdm import tqdm

    from mlx_sd_convert import ConversionError, convert

    bars: dict[str, tqdm] = {}
    labels = {"hash": "hashing source", "write": "writing"}
    outcome = {}

    def progress(step) -> None:
        if step.stage not in labels:
            outcome[step.stage] = step.item  # "done": created, replaced or unchanged
            return
        bar = bars.get(step.stage)
        if bar is None:
            for previous in bars.values():
                previous.close()
            bar = bars[step.stage] = tqdm(
                total=step.total, desc=labels[step.stage], unit="B", unit_scale=True, unit_divisor=1024, leave=False
            )
        bar.update(step.done - bar.n)

    try:
        info = convert(
            args.src,
            args.out,
            dtype=args.dtype,
            quantize=args.quantize,
            vae=args.vae,
            family=args.family,
            prediction_type=args.prediction_type,
            use_ema=not args.no_ema,
            variant=args.variant,
            overwrite=args.overwrite,
            progress=progress,
        )
    except ConversionError as error:
        raise UserError(str(error)) from None
    finally:
        for bar in bars.values():
            bar.close()
    quantized = f", {info.quantization['bits']}-bit quantized" if info.quantization else ""
    done = {"created": "converted", "replaced": "converted (replaced)", "unchanged": "already converted, unchanged"}
    print(f"{done.get(outcome.get('done'), 'converted')}: {args.out} ({info.family}, {info.dtype}{quantized})")
    for name, finding in info.detection.items():
        print(f"  {name}: {finding['value']} ({finding['confidence']}: {finding['evidence']})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx-sd", description="Stable Diffusion in MLX")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="show the mlx-sd version and the backend it runs on")
    version.set_defaults(run=_version)

    convert = sub.add_parser(
        "convert",
        help="convert a checkpoint (diffusers folder, .safetensors/.ckpt single file, hub id) to an MLX model folder",
        description="Convert a Stable Diffusion 1.x/2.x checkpoint into an mlx-sd model folder. SRC: a diffusers "
        "folder, an original single file (.safetensors, .ckpt, .pt, .pth), or a Hugging Face hub id "
        "(owner/name, or owner/name/file.safetensors). Pickles are read without running code.",
    )
    convert.add_argument("src", help="diffusers folder, checkpoint file, or hub id")
    convert.add_argument("out", help="the model folder to write")
    convert.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="stored weight dtype (default: float16; bfloat16 when the source UNet is bfloat16)",
    )
    convert.add_argument(
        "--quantize", type=int, choices=(4, 8), help="quantize the UNet and text encoder Linear layers to 4 or 8 bits"
    )
    convert.add_argument("--vae", metavar="FILE_OR_FOLDER", help="a separately published VAE to use instead")
    convert.add_argument("--family", choices=("sd1", "sd2"), help="override the detected model family")
    convert.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "eps", "v"),
        help="override the detected prediction type (check the model card: SD 2.x 768 models are v_prediction)",
    )
    convert.add_argument("--no-ema", action="store_true", help="convert the raw UNet weights, not the EMA copy")
    convert.add_argument("--variant", help="diffusers weights variant, e.g. fp16")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing, different model folder")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        print(f"mlx-sd {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
