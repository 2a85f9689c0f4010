"""`mlx-sd convert SRC OUT`: the converter (mlx_sd_convert.convert) with a progress bar and one-line errors."""

from __future__ import annotations

from .errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (diffusers folder, .safetensors/.ckpt single file, hub id) to an MLX model folder",
        description="Convert a Stable Diffusion 1.x/2.x/XL or SD3/3.5 checkpoint into an mlx-sd model folder. SRC: a "
        "diffusers folder, an original single file (.safetensors, .ckpt, .pt, .pth), or a Hugging Face hub id "
        "(owner/name, or owner/name/file.safetensors). Pickles are read without running code. SD3 single files "
        "without text encoders (sd3.5_large.safetensors) take them from --text-encoder files or from text_encoders/ "
        "beside the file.",
    )
    p.add_argument("src", help="diffusers folder, checkpoint file, or hub id")
    p.add_argument("out", help="the model folder to write")
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="stored weight dtype of every component (default: UNet and text encoder float16, or bfloat16 for a "
        "bfloat16 source; the VAE float32, as the pipeline runs it)",
    )
    p.add_argument(
        "--quantize",
        type=int,
        choices=(4, 8),
        help="quantize the Linear layers of the UNet (SD3: MMDiT) and text encoders (SD3: with T5) to 4 or 8 bits",
    )
    p.add_argument("--vae", metavar="FILE_OR_FOLDER",
                   help="a separately published VAE to use instead (e.g. an fp16-safe SDXL VAE)")  # fmt: skip
    p.add_argument(
        "--text-encoder",
        dest="text_encoders",
        action="append",
        metavar="FILE",
        help="SD3 single files: a text encoder published as a file of its own (clip_l, clip_g, t5xxl_fp16"
        ".safetensors; repeat for each), completing or replacing the file's. Default: the file's own, else those "
        "found in text_encoders/ beside it",
    )
    p.add_argument(
        "--family", choices=("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3"), help="override the detected model family"
    )
    p.add_argument(
        "--kind",
        choices=("standard", "turbo", "lcm"),
        help="override the detected kind: turbo = SD-Turbo/SDXL-Turbo (1-4 steps, no guidance, 512x512)",
    )
    p.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "eps", "v", "flow"),
        help="override the detected prediction type (check the model card: SD 2.x 768 models are v_prediction; "
        "flow is SD3's, the only one it takes)",
    )
    p.add_argument("--no-ema", action="store_true", help="convert the raw UNet weights, not the EMA copy")
    p.add_argument("--variant", help="diffusers weights variant, e.g. fp16")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different model folder")
    p.set_defaults(run=run_convert)


def run_convert(args) -> None:
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
            text_encoders=args.text_encoders,
            family=args.family,
            prediction_type=args.prediction_type,
            kind=args.kind,
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
