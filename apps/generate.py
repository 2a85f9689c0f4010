"""`mlx-sd generate` and `mlx-sd info`: images from the command line, and the parameters stored in a PNG."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mlx_sd import sd_upscale
from mlx_sd.images import INPAINTING_FILLS, RESIZE_MODES
from mlx_sd.infotext import parse_infotext, read_infotext, request_fields, save_png
from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Pipeline, Progress, Result
from mlx_sd.rng import NOISE_MODES
from mlx_sd.sd_upscale import DEFAULT_OVERLAP
from mlx_sd.upscale import HIRES_UPSCALERS

from . import control_flags, upscale
from .errors import UserError
from .models import DEFAULT_MODEL, resolve_model

DEFAULT_OUTPUT = "mlx-sd-{seed}.png"


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt (txt2img, img2img, inpainting)")
    p.add_argument("prompt", nargs="?", help="the prompt; A1111 emphasis syntax works: (word:1.3), [word], BREAK")
    p.add_argument("--params-from", type=Path, metavar="FILE",
                   help="make an image again: the parameters recorded in a PNG (A1111's or mlx-sd's) or a text file "
                        "holding an infotext; flags given override them")  # fmt: skip
    p.add_argument("--model", default=None, help=f"converted folder, checkpoint file, diffusers folder or hub id "
                                                 f"(default: {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--width", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("--height", type=int, help="multiple of 8 (default: the model's size)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (CFG); <= 1 disables it")
    p.add_argument("--image-guidance", type=float, default=1.5,
                   help="InstructPix2Pix models: how closely to keep to --init-image (A1111's Image CFG scale; "
                        "default: %(default)s)")  # fmt: skip
    p.add_argument("--sampler", help='e.g. "Euler a", "DPM++ 2M Karras" (see `mlx-sd samplers`)')
    p.add_argument("--schedule-type", help='A1111 schedule type: "Karras", "Exponential", ...')
    sampling = p.add_argument_group("sampler settings (A1111's; default: the sampler's own)")
    sampling.add_argument("--eta", type=float, help="noise of the stochastic samplers (ancestral 1, DDIM 0)")
    for name, meaning in (("s-churn", "Karras' churn (Euler, Heun, DPM2)"), ("s-tmin", "churn from this sigma"),
                          ("s-tmax", "churn up to this sigma"), ("s-noise", "noise multiplier")):  # fmt: skip
        sampling.add_argument(f"--{name}", type=float, help=meaning)
    sampling.add_argument("--s-min-uncond", type=float, default=0.0,
                          help="NGMS: below this sigma every second step runs without the negative prompt")  # fmt: skip
    sampling.add_argument("--eta-noise-seed-delta", type=int, default=0,
                          help="ENSD: the sampler's noise from seed + this (A1111's setting)")  # fmt: skip
    slg = p.add_argument_group("SD3 skip-layer guidance (SD3.5 medium's card: --skip-guidance-layers 7,8,9)")
    slg.add_argument("--skip-guidance-layers", type=_layers, default=(), metavar="I,J,...",
                     help="MMDiT blocks whose absence guides the image (empty: off)")  # fmt: skip
    slg.add_argument("--skip-layer-guidance-scale", type=float, default=2.8, help="default: %(default)s")
    slg.add_argument("--skip-layer-guidance-start", type=float, default=0.01,
                     help="from this fraction of the steps (default: %(default)s)")  # fmt: skip
    slg.add_argument("--skip-layer-guidance-stop", type=float, default=0.2,
                     help="up to this fraction of the steps (default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, help="random seed (default: random, printed and stored in the PNG)")
    p.add_argument("--subseed", type=int, help="variation seed (default: random when --subseed-strength is set)")
    p.add_argument("--subseed-strength", type=float, default=0.0, help="blend towards the variation seed (0-1)")
    p.add_argument("--seed-resize-from-w", type=int, default=0, help="draw the seed's noise as for this width")
    p.add_argument("--seed-resize-from-h", type=int, default=0, help="draw the seed's noise as for this height")
    p.add_argument("--num-images", type=int, default=1, help="images to make, one batch after another")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (more memory, faster per image)")
    p.add_argument("--clip-skip", type=int, default=1, help="1 = last text-encoder layer (A1111 numbering)")
    p.add_argument("--init-image", type=Path, help="start from this image (img2img)")
    p.add_argument("--strength", type=float, default=0.75,
                   help="img2img: how much to change the init image (0-1); with --enable-hr: hires pass")  # fmt: skip
    p.add_argument("--resize-mode", default="resize", choices=RESIZE_MODES,
                   help="img2img: fit an init image of another size")  # fmt: skip
    p.add_argument("--mask", type=Path, help="inpainting mask (white = repaint); needs --init-image")
    p.add_argument("--mask-blur", type=float, default=4.0, help="inpainting: blur the mask edge (pixels)")
    p.add_argument("--inpainting-fill", default="original", choices=INPAINTING_FILLS,
                   help="inpainting: what the area to repaint starts from (A1111's masked content)")  # fmt: skip
    p.add_argument("--initial-noise-multiplier", type=float, default=1.0,
                   help="img2img: scale the noise the image starts with (A1111's noise multiplier)")  # fmt: skip
    p.add_argument("--invert-mask", action="store_true", help="inpainting: repaint the black area instead")
    p.add_argument("--only-masked", action="store_true", help="inpainting: work on a crop around the mask")
    p.add_argument("--only-masked-padding", type=int, default=32, help="inpainting: padding of that crop (pixels)")
    p.add_argument("--tiling", action="store_true", help="make a seamlessly tiling image (A1111's Tiling)")
    p.add_argument("--rng", default="torch-cpu", choices=NOISE_MODES,
                   help="noise source: torch-cpu = same seed, same image as diffusers/torch on CPU")  # fmt: skip
    p.add_argument(
        "--low-memory",
        action=argparse.BooleanOptionalAction,
        help="free the text encoders after encoding and decode in tiles (default: on with <= 16 GiB)",
    )
    p.add_argument(
        "--tiled-vae",
        action=argparse.BooleanOptionalAction,
        help="decode in 512-pixel tiles (default: above 1024x1024, or 512x512 in low-memory mode)",
    )
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="apply a LoRA file (kohya/A1111 or diffusers/PEFT) with a weight (default 1); repeatable",
    )
    p.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="folder of LoRA files for <lora:name:weight> in the prompt (A1111 syntax)",
    )
    p.add_argument(
        "--embedding",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="load a textual-inversion embedding; its file name (no extension) is the prompt word",
    )
    p.add_argument(
        "--embeddings-dir",
        type=Path,
        metavar="DIR",
        help="load every embedding in this folder that fits the model (A1111's embeddings folder)",
    )
    hires = p.add_argument_group("hires fix (A1111): generate, upscale, then img2img at the larger size")
    hires.add_argument("--enable-hr", action="store_true", help="run the hires fix (txt2img only)")
    hires.add_argument("--hr-scale", type=float, default=2.0, help="upscale factor (default: %(default)s)")
    hires.add_argument("--hr-upscaler", default="Latent",
                       help=f"{', '.join(HIRES_UPSCALERS)}, an upscaler file (ESRGAN, ...) or a name in "
                            "--upscaler-dir (default: %(default)s)")  # fmt: skip
    upscale.add_upscaler_dir(hires)
    hires.add_argument("--hr-second-pass-steps", type=int, default=0, help="steps of the hires pass (0: --steps)")
    hires.add_argument("--hr-resize-x", type=int, default=0, help="target width instead of --hr-scale")
    hires.add_argument("--hr-resize-y", type=int, default=0, help="target height instead of --hr-scale")
    hires.add_argument("--hr-sampler", help="sampler of the hires pass (default: --sampler)")
    hires.add_argument("--hr-schedule-type", help="schedule type of the hires pass (default: --schedule-type)")
    hires.add_argument("--hr-prompt", default="", help="prompt of the hires pass (default: the prompt)")
    hires.add_argument("--hr-negative-prompt", default="", help="negative prompt of the hires pass")
    hires.add_argument("--firstpass-image", type=Path, metavar="IMAGE",
                       help="an image of --width x --height taken as the first pass (A1111's firstpass_image): only "
                            "the hires pass runs")  # fmt: skip
    hires.add_argument("--hr-checkpoint", metavar="MODEL",
                       help="another model for the hires pass (converted folder, checkpoint, ...; A1111's hires "
                            "checkpoint)")  # fmt: skip
    script = p.add_argument_group("SD upscale (A1111's img2img script): upscale --init-image, redraw it in tiles of "
                                  "--width x --height with img2img, join them")  # fmt: skip
    script.add_argument("--sd-upscale", action="store_true", help="run the script (needs --init-image)")
    script.add_argument("--sd-upscale-upscaler", default="Lanczos",
                        help="Lanczos, Nearest, None, an upscaler file or a name in --upscaler-dir "
                             "(default: %(default)s)")  # fmt: skip
    script.add_argument("--sd-upscale-scale", type=float, default=2.0, help="scale factor (default: %(default)s)")
    script.add_argument("--sd-upscale-overlap", type=int, default=DEFAULT_OVERLAP,
                        help="tile overlap in pixels (default: %(default)s)")  # fmt: skip
    p.add_argument("--refiner", help="SDXL: a refiner model (converted folder, checkpoint, ...) for the last steps")
    p.add_argument("--refiner-switch-at", type=float,
                   help="with --refiner: the fraction of the steps the base model runs (default 0.8)")  # fmt: skip
    control_flags.add_arguments(p)
    p.add_argument("--output", default=DEFAULT_OUTPUT,
                   help="output PNG path; {seed} and {i} are filled in (default: %(default)s)")  # fmt: skip
    p.set_defaults(run=run_generate, parser=p)

    info = sub.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image", type=Path)
    info.set_defaults(run=run_info)


def _open_image(path: Path | None, what: str) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{what} {path} is not a readable image ({e})") from None


def _layers(text: str) -> tuple[int, ...]:
    """--skip-guidance-layers: block indices, comma- or space-separated."""
    try:
        return tuple(int(i) for i in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give block indices such as 7,8,9") from None


def _request(args) -> GenerationRequest:
    num, batch = args.num_images, args.batch_size
    if num < 1 or batch < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    if args.mask is not None and args.init_image is None:
        raise UserError("--mask needs --init-image (the image to inpaint)")
    fields = dict(
        prompt=args.prompt, negative_prompt=args.negative_prompt, width=args.width, height=args.height,
        steps=args.steps, guidance=args.guidance, image_guidance=args.image_guidance, sampler=args.sampler,
        schedule_type=args.schedule_type,
        eta=args.eta, s_churn=args.s_churn, s_tmin=args.s_tmin, s_tmax=args.s_tmax, s_noise=args.s_noise,
        s_min_uncond=args.s_min_uncond, eta_noise_seed_delta=args.eta_noise_seed_delta,
        seed=args.seed, subseed=args.subseed, subseed_strength=args.subseed_strength,
        seed_resize_from_w=args.seed_resize_from_w, seed_resize_from_h=args.seed_resize_from_h, rng=args.rng,
        batch_size=batch, batch_count=-(-num // batch), clip_skip=args.clip_skip,
        init_image=_open_image(args.init_image, "--init-image"), strength=args.strength,
        resize_mode=args.resize_mode, mask=_open_image(args.mask, "--mask"), mask_blur=args.mask_blur,
        invert_mask=args.invert_mask, inpaint_full_res=args.only_masked, inpainting_fill=args.inpainting_fill,
        initial_noise_multiplier=args.initial_noise_multiplier,
        inpaint_padding=args.only_masked_padding, paste_back=True, low_memory=args.low_memory,
        tiled_vae=args.tiled_vae, tiling=args.tiling,
        refiner_switch_at=args.refiner_switch_at,
        enable_hr=args.enable_hr, hr_scale=args.hr_scale, hr_upscaler=args.hr_upscaler,
        hr_second_pass_steps=args.hr_second_pass_steps, hr_resize_x=args.hr_resize_x, hr_resize_y=args.hr_resize_y,
        hr_sampler=args.hr_sampler, hr_schedule_type=args.hr_schedule_type, hr_prompt=args.hr_prompt,
        hr_negative_prompt=args.hr_negative_prompt,
        firstpass_image=_open_image(args.firstpass_image, "--firstpass-image"),
        controlnet=control_flags.units(args, _open_image, _controlnet),
        ip_adapter_scale=args.ip_adapter_scale, skip_guidance_layers=args.skip_guidance_layers,
        skip_layer_guidance_scale=args.skip_layer_guidance_scale,
        skip_layer_guidance_start=args.skip_layer_guidance_start,
        skip_layer_guidance_stop=args.skip_layer_guidance_stop,
    )  # fmt: skip
    if args.params_from is not None:
        fields.update(_recalled(args))
    if fields["prompt"] is None:
        raise UserError("give a prompt (or --params-from an image that records one)")
    try:
        request = GenerationRequest(**fields)
        request.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    return request


def _controlnet(path: Path):
    """--controlnet MODEL given as a file or diffusers folder, read."""
    from mlx_sd_convert import ConversionError
    from mlx_sd_convert.controlnet import read_controlnet

    try:
        return read_controlnet(path)
    except ConversionError as e:
        raise UserError(str(e)) from None


def _recalled(args) -> dict:
    """The infotext's parameters that no flag on the command line overrides."""
    path = args.params_from
    try:
        text = path.read_text() if path.suffix.lower() == ".txt" else read_infotext(path)
    except FileNotFoundError:
        raise UserError(f"--params-from {path} does not exist") from None
    except (UnidentifiedImageError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"--params-from {path} is neither a PNG nor a text file ({e})") from None
    if not text:
        raise UserError(f"--params-from {path} records no generation parameters")
    fields, not_applied = request_fields(text)
    if not_applied:
        print("not taken from the infotext: " + ", ".join(f"{k}: {v}" for k, v in not_applied.items()),
              file=sys.stderr)  # fmt: skip
    parser = args.parser
    given = {k for k in fields if k in vars(args) and getattr(args, k) != parser.get_default(k)}
    return {k: v for k, v in fields.items() if k not in given}


def run_generate(args) -> None:
    from tqdm import tqdm

    request = _request(args)
    if args.refiner_switch_at is not None and args.refiner is None:
        raise UserError("--refiner-switch-at needs --refiner (the SDXL refiner model)")
    refiner = resolve_model(args.refiner) if args.refiner else None
    if args.hr_checkpoint and not args.enable_hr:
        raise UserError("--hr-checkpoint needs --enable-hr (the model runs the hires fix's second pass)")
    hires_model = resolve_model(args.hr_checkpoint) if args.hr_checkpoint else None
    adapter, image_prompt = control_flags.ip_adapter(args, _open_image)
    request = replace(request, ip_adapter_image=image_prompt)
    try:
        pipeline = Pipeline(resolve_model(args.model), refiner=refiner, ip_adapter=adapter, hires_model=hires_model)
    except ValueError as e:  # a refiner or hires model that cannot take over, an adapter for another family
        raise UserError(str(e)) from None
    _add_networks(pipeline, args)
    request = _hires_upscaler(pipeline, request, args)
    events, unit = pipeline.stream(request), "batch"
    if args.sd_upscale:
        upscaler = upscale.resolve_upscaler(args.sd_upscale_upscaler, args.upscaler_dir, pipeline.model.dtype)
        settings = sd_upscale.SDUpscale(upscaler, args.sd_upscale_scale, args.sd_upscale_overlap)
        events, unit = sd_upscale.stream(pipeline, request, settings), "tile"
    bar = None
    try:
        for event in events:
            if isinstance(event, Progress):
                if bar is None or event.step == 1:
                    if bar is not None:
                        bar.close()
                    label = f"{unit} {event.batch + 1}/{event.batches}" if event.batches > 1 else "sampling"
                    bar = tqdm(total=event.total, desc=label, unit="step", file=sys.stderr)
                bar.update(1)
            elif isinstance(event, Result):
                result = event
    except ValueError as e:  # a parameter the model rejects (unknown sampler, bad size, ...)
        raise UserError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    images = result.images[: args.num_images]
    for i, (image, text, seed) in enumerate(zip(images, result.infotexts, result.seeds)):
        path = Path(args.output.format(seed=seed, i=i))
        if path.parent != Path(""):
            path.parent.mkdir(parents=True, exist_ok=True)
        save_png(image, path, text)
        print(f"{path}  (seed {seed})")


def _add_networks(pipeline: Pipeline, args) -> None:
    """--lora, --lora-dir, --embedding, --embeddings-dir, --controlnet-dir: LoRAs, embeddings and ControlNets from
    files and folders."""
    from mlx_sd_convert import ConversionError
    from mlx_sd_convert.embeddings import read_embedding
    from mlx_sd_convert.library import ControlNetLibrary, EmbeddingLibrary, LoraLibrary
    from mlx_sd_convert.lora import parse_lora_spec, read_lora

    if args.controlnet_dir is not None:
        pipeline.controlnet_resolver = ControlNetLibrary(args.controlnet_dir, pipeline.model.dtype)
    try:
        if args.lora_dir is not None:
            if not args.lora_dir.is_dir():
                raise UserError(f"--lora-dir {args.lora_dir} is not a folder")
            pipeline.lora_resolver = LoraLibrary(args.lora_dir)
        loras = []
        for spec in args.lora:
            path, weight = parse_lora_spec(spec)
            if not Path(path).is_file():
                raise UserError(f"--lora {path} does not exist (write FILE or FILE:WEIGHT)")
            loras.append((read_lora(path, pipeline.lora_targets()), weight))
        pipeline.set_loras(loras)
        embeddings = [read_embedding(path) for path in args.embedding]
        if args.embeddings_dir is not None:
            loaded, skipped = EmbeddingLibrary(args.embeddings_dir).for_model(pipeline.model)
            embeddings += [e for e in loaded if e.name not in {x.name for x in embeddings}]
            if skipped:
                print(f"embeddings skipped (made for another model): {', '.join(skipped)}", file=sys.stderr)
        if embeddings:
            pipeline.load_embeddings(embeddings)
    except (ConversionError, ValueError) as e:
        raise UserError(str(e)) from None


def _hires_upscaler(pipeline: Pipeline, request: GenerationRequest, args) -> GenerationRequest:
    """--hr-upscaler naming a model (a file, or a name in --upscaler-dir): loaded before generating, and recorded in
    the infotext under its name."""
    if not request.enable_hr or request.hr_upscaler in HIRES_UPSCALERS:
        return request
    upscaler = upscale.resolve_upscaler(request.hr_upscaler, args.upscaler_dir, pipeline.model.dtype)
    pipeline.upscaler_resolver = {upscaler.name: upscaler}.__getitem__
    return replace(request, hr_upscaler=upscaler.name)


def run_info(args) -> None:
    try:
        text = read_infotext(args.image)
    except FileNotFoundError:
        raise UserError(f"{args.image} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{args.image} is not a readable image ({e})") from None
    if not text:
        raise UserError(f"{args.image} carries no generation parameters (no 'parameters' PNG text chunk)")
    prompt, negative, params = parse_infotext(text)
    print(f"Prompt: {prompt}")
    if negative:
        print(f"Negative prompt: {negative}")
    for key, value in params.items():
        print(f"{key}: {value}")
