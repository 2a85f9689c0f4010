"""`convert()`: a published Stable Diffusion checkpoint -> an mlx-sd model folder (layout: mlx_sd/model.py).

1. Open the source, reading headers and configs only: an original single file (convert/single_file.py; SD3's:
   convert/sd3_file.py), a diffusers folder (convert/diffusers_folder.py; SD3's: convert/sd3_folder.py), or a hub
   id fetched into the hub cache (convert/hub.py).
2. Swap in a separately published VAE if asked.
3. Check every component's key map strictly, from shapes, before anything is written (convert/keymap.py).
4. Hash the source files for the manifest.
5. Write each component tensor by tensor into a temporary folder beside OUT, then rename it into place
   (convert/writer.py, convert/output.py): OUT is complete or untouched, and converting again is a no-op.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import mlx_sd
from mlx_sd.model import MANIFEST, ModelInfo
from mlx_sd.quantization import BITS, QuantizationConfig

from .controlnet import USE_AS_IT_IS, is_control_config
from .diffusers_folder import CONFIG, MODEL_INDEX, plan_diffusers_folder, plan_vae_folder
from .families import T5_TOWER, TEXT_TOWERS
from .hub import fetch, parse_hub_id
from .keymap import ConversionError
from .kind import KINDS
from .ldm_detect import FAMILIES, FLOW, normalize_prediction_type
from .output import check_destination, sha256_file, staged_output
from .plan import ModelPlan, SourceFiles, VAESource
from .sd3_folder import is_sd3_folder, plan_sd3_folder
from .sd3_text import hub_text_encoders
from .single_file import plan_file, plan_vae_single_file
from .writer import FLOAT_DTYPES, plan_write, write_component

CONVERTER_VERSION = f"mlx-sd {mlx_sd.__version__}"
# Families this converter writes: each has its text towers in convert/families.py TEXT_TOWERS.
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3")


@dataclass(frozen=True)
class ConvertProgress:
    """One step of a conversion, for progress bars.

    stage: "hash" (reading the source files for the manifest's sha256), "write" (one tensor written), or "done"
        (then `item` says what happened to OUT: "created", "replaced" or "unchanged").
    done, total: bytes of the stage so far, and in all.
    item: the file being hashed or the tensor just written ("unet: conv_in.weight").
    """

    stage: str
    done: int
    total: int
    item: str


def convert(
    src: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    quantize: int | None = None,
    vae: str | Path | None = None,
    text_encoders: Sequence[str | Path] | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    kind: str | None = None,
    use_ema: bool = True,
    variant: str | None = None,
    overwrite: bool = False,
    progress: Callable[[ConvertProgress], None] | None = None,
) -> ModelInfo:
    """Convert a checkpoint into an mlx-sd model folder.

    Args:
        src: a diffusers folder (model_index.json), an original single file (.safetensors, .ckpt, .pt, .pth), or
            a hub id ("owner/name", or "owner/name/file.safetensors" for one file of a repo). SD 1.x, 2.x, XL and
            SD3 / SD3.5 (an SD3 single file must hold the CLIP text encoders; T5 is optional, its tokenizer then
            comes from the hub: google/t5-v1_1-xxl).
        out: the model folder to write (created; an existing one is compared, see `overwrite`).
        dtype: "float16", "bfloat16" or "float32" for every stored weight. Default: the UNet (SD3: transformer)
            and text encoders in float16 (bfloat16 when the source's UNet is bfloat16, which float16 could
            overflow); the VAE in
            float32 (the pipeline runs it in float32: SD VAEs overflow in float16), or float16 when the source
            VAE is float16 already.
        quantize: 4 or 8: MLX affine quantization of the Linear layers of the UNet (SD3: the MMDiT) and the text
            encoders (SD3: CLIP-L, bigG and T5); the selection and its exclusions: mlx_sd/quantization.py.
        vae: a separately published VAE replacing the source's: a diffusers VAE folder, a model folder (its
            vae/), an original-layout VAE file (which keeps the model's latent scale), or a hub id. E.g. an
            fp16-safe SDXL VAE (madebyollin/sdxl-vae-fp16-fix).
        text_encoders: SD3 single files: text encoders published as files of their own (CLIP-L, bigG, T5-XXL:
            clip_l.safetensors, clip_g.safetensors, t5xxl_fp16.safetensors; local files or hub ids), told apart by
            their tensors, completing or replacing the file's. Default: the file's own, and for a file without
            CLIP towers (sd3.5_large.safetensors) those files found in text_encoders/ beside it, or in
            ../text_encoders/ or ../clip/ (a UI's model folders); for such a file given as a hub id, its repo's
            text_encoders/ (clip_l, clip_g, t5xxl_fp16), fetched.
        family: "sd1", "sd2", "sdxl", "sdxl-refiner" or "sd3" to override detection (sd3 only for SD3 sources).
        prediction_type: "epsilon"/"eps" or "v_prediction"/"v" to override detection; "flow" is SD3's, and the
            only type SD3 models take.
        kind: "standard", "turbo" or "lcm" to override detection (convert/kind.py: the rule, recorded in the
            manifest); Turbo models default to 1 step without guidance at 512x512.
        use_ema: single files with EMA weights: convert the EMA copy (True) or the raw training weights.
        variant: diffusers weights variant, e.g. "fp16" (default: plain files, else the only variant present).
        overwrite: replace an existing mlx-sd model folder that differs (never a folder mlx-sd did not write).
        progress: called with a `ConvertProgress` as files are hashed and tensors written.
    Returns:
        the manifest written to OUT/mlx_sd.json.
    Raises:
        ConversionError (one line naming the problem and the fix) for anything the user can act on: missing or
        unreadable sources, unsafe pickles, unsupported or inconsistent models, a full disk, an existing OUT.
        OUT is never left half-written, also on KeyboardInterrupt.
    """
    out = Path(out).expanduser()
    _check_options(dtype, quantize, family, prediction_type, kind)
    check_destination(out, overwrite)
    report = progress or (lambda step: None)
    model = open_model(
        str(src),
        family=family,
        prediction_type=prediction_type,
        kind=kind,
        use_ema=use_ema,
        variant=variant,
        text_encoders=None if text_encoders is None else [_local_file(str(f), "text encoder") for f in text_encoders],
    )
    if vae is not None:
        model = model.with_vae(open_vae(str(vae), variant))
    _check_complete(model)
    dtypes = _dtypes(model, dtype)
    quantization = QuantizationConfig(bits=quantize) if quantize else None
    jobs = [plan_write(name, plan, dtypes[name], quantization) for name, plan in model.components.items()]

    info = _manifest(model, dtypes[model.denoiser], quantization, _hash_sources(model, report))
    check_destination(out, overwrite, json.loads(info.to_json()))
    total = sum(job.nbytes for job in jobs)
    done = 0

    def advance(nbytes: int, item: str) -> None:
        nonlocal done
        done += nbytes
        report(ConvertProgress("write", done, total, item))

    with staged_output(out, total, overwrite) as stage:
        for job in jobs:
            write_component(stage.path / job.folder, job, advance)
        for name, tokenizer in model.tokenizers.items():
            tokenizer.save(stage.path / name)
        (stage.path / "scheduler").mkdir()
        scheduler = json.dumps(model.scheduler, indent=2, sort_keys=True) + "\n"
        (stage.path / "scheduler" / "scheduler_config.json").write_text(scheduler)
        (stage.path / MANIFEST).write_text(info.to_json())
    report(ConvertProgress("done", total, total, stage.result))
    return info


def _dtypes(model: ModelPlan, dtype: str | None) -> dict[str, str]:
    """The stored dtype per component folder (see `convert`'s `dtype`)."""
    if dtype is not None:
        return {name: dtype for name in model.components}
    source = model.detection.dtype.value  # the UNet's (SD3: the transformer's)
    vae_source = model.vae.dtype if model.vae is not None else source
    networks = "bfloat16" if source == "bfloat16" else "float16"
    return {name: networks for name in model.components} | {"vae": "float16" if vae_source == "float16" else "float32"}


def _check_options(dtype, quantize, family, prediction_type, kind) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConversionError(f"dtype {dtype!r}: use one of {list(FLOAT_DTYPES)}")
    if quantize is not None and quantize not in BITS:
        raise ConversionError(f"quantize {quantize!r}: use one of {list(BITS)} (bits per weight)")
    if family is not None and family not in FAMILIES:
        raise ConversionError(f"family {family!r}: use one of {list(FAMILIES)}")
    if kind is not None and kind not in KINDS:
        raise ConversionError(f"kind {kind!r}: use one of {list(KINDS)}")
    if prediction_type is not None:
        try:
            normalize_prediction_type(prediction_type)
        except ValueError as error:
            raise ConversionError(str(error)) from None


# --- sources ----------------------------------------------------------------------------------------------


def open_model(
    src: str, *, family=None, prediction_type=None, kind=None, use_ema=True, variant=None, text_encoders=None
) -> ModelPlan:
    """Plan the conversion of a local file or folder, or of a hub id (fetched first)."""
    path = Path(src).expanduser()
    if path.exists():
        return _open_local(path, family, prediction_type, kind, use_ema, variant, text_encoders)
    if parse_hub_id(src) is None:
        raise ConversionError(f"{src}: no such file or folder")
    local, facts = fetch(src, variant=variant)
    if "file" in facts and text_encoders is None:
        text_encoders = hub_text_encoders(local, facts["repo_id"])
    # A hub folder is named by its repo id (the snapshot folder is a commit hash), which is also kind evidence.
    name = None if "file" in facts else facts["repo_id"]
    model = _open_local(local, family, prediction_type, kind, use_ema, variant, text_encoders, name)
    return replace(model, details={**model.details, "hub": facts})


def _local_file(src: str, what: str) -> Path:
    """A local file, or a hub id of one file (fetched into the hub cache)."""
    path = Path(src).expanduser()
    if path.is_file():
        return path
    hub = parse_hub_id(src)
    if path.exists() or hub is None or hub[1] is None:
        raise ConversionError(f"{what} {src}: " + ("not a file" if path.exists() else "no such file"))
    return fetch(src)[0]


def _open_local(path: Path, family, prediction_type, kind, use_ema, variant, text_encoders, name=None) -> ModelPlan:
    if path.is_file():
        if variant is not None:
            raise ConversionError(f"{path} is a single file; variant= (--variant) applies to diffusers folders")
        return plan_file(
            path,
            family=family,
            prediction_type=prediction_type,
            use_ema=use_ema,
            kind=kind,
            text_encoders=text_encoders,
        )
    if text_encoders is not None:
        raise ConversionError(
            f"{path} is a folder; text encoder files (--text-encoder) complete SD3 single files (a diffusers "
            "folder has its own)"
        )
    if (path / MODEL_INDEX).is_file() and is_sd3_folder(path):
        return plan_sd3_folder(
            path, family=family, prediction_type=prediction_type, variant=variant, kind=kind, name=name
        )
    if (path / MODEL_INDEX).is_file():
        return plan_diffusers_folder(
            path, family=family, prediction_type=prediction_type, variant=variant, kind=kind, name=name
        )
    if (path / MANIFEST).is_file():
        raise ConversionError(f"{path} is already an mlx-sd model folder; use it as it is")
    if (path / CONFIG).is_file() and is_control_config(path / CONFIG):
        raise ConversionError(f"{path} is {USE_AS_IT_IS}")
    if (path / CONFIG).is_file():
        raise ConversionError(
            f"{path} holds one diffusers component (config.json), not a model folder (model_index.json); "
            "a VAE folder goes to vae= (--vae)"
        )
    raise ConversionError(f"{path}: a folder without model_index.json; expected a diffusers folder or a checkpoint")


def open_vae(src: str, variant: str | None = None) -> VAESource:
    """A separately published VAE: an original-layout file, a diffusers VAE or model folder, or a hub id."""
    path = Path(src).expanduser()
    facts = None
    if not path.exists():
        if parse_hub_id(src) is None:
            raise ConversionError(f"vae {src}: no such file or folder")
        path, facts = fetch(src, variant=variant)
    vae = plan_vae_single_file(path) if path.is_file() else plan_vae_folder(path, variant)
    return replace(vae, name=src) if facts and "file" not in facts else vae


def _check_complete(model: ModelPlan) -> None:
    found = model.detection.family
    if found.value not in SUPPORTED_FAMILIES:
        raise ConversionError(
            f"this is an {found.value.upper()} model ({found.evidence}); "
            f"mlx-sd converts {', '.join(SUPPORTED_FAMILIES)}"
        )
    if "vae" not in model.components:
        raise ConversionError(
            "the checkpoint has no VAE (first_stage_model.*); pass vae= (--vae) with a separately published VAE"
        )
    if model.prediction_type == FLOW and found.value != "sd3":
        raise ConversionError(
            f"prediction type flow (rectified flow) is SD3's; this is an {found.value} model ({found.evidence}): "
            "drop the prediction type override"
        )
    for encoder, tokenizer, _ in TEXT_TOWERS[found.value]:
        if encoder not in model.components or tokenizer not in model.tokenizers:
            raise ConversionError(f"{found.value} models need {encoder} and {tokenizer}; the source has no {encoder}")
    encoder, tokenizer = T5_TOWER
    if encoder in model.components and tokenizer not in model.tokenizers:
        raise ConversionError(f"the source has {encoder} (T5) but no {tokenizer}; the model cannot be written")
    channels = model.components[model.denoiser].config.out_channels
    if model.components["vae"].config.latent_channels != channels:
        raise ConversionError(
            f"vae: {model.components['vae'].config.latent_channels} latent channels, but the {model.denoiser} works "
            f"on {channels}; the source is inconsistent"
        )


# --- the manifest -----------------------------------------------------------------------------------------


def _hash_files(files: SourceFiles, advance: Callable[[int], None]) -> tuple[str, dict[str, str]]:
    """sha256 of a single file; for folders, sha256 of `sha256sum`'s lines ("<hash>  <path>\\n") sorted by path."""
    hashes = {name: sha256_file(files.root / name, advance) for name in sorted(files.names)}
    if len(hashes) == 1:
        return next(iter(hashes.values())), hashes
    listing = "".join(f"{digest}  {name}\n" for name, digest in hashes.items())
    return hashlib.sha256(listing.encode()).hexdigest(), hashes


def _hash_sources(model: ModelPlan, report) -> dict:
    groups = [model.files] + ([model.vae.files] if model.vae else [])
    total = sum((g.root / n).stat().st_size for g in groups for n in g.names)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        report(ConvertProgress("hash", done, total, model.name))

    sha256, files = _hash_files(model.files, advance)
    hashes = {"sha256": sha256, "files": files}
    if model.vae is not None:
        vae_sha256, vae_files = _hash_files(model.vae.files, advance)
        hashes["vae"] = {"name": model.vae.name, "sha256": vae_sha256, "files": vae_files}
    return hashes


def _manifest(model: ModelPlan, dtype: str, quantization, hashes: dict) -> ModelInfo:
    found = model.detection
    detection = {f.name: asdict(getattr(found, f.name)) for f in fields(found) if getattr(found, f.name) is not None}
    if model.vae is not None:
        detection["vae"] = asdict(model.vae.finding)
    source = {"kind": model.kind, **model.details, "files": hashes["files"]}
    if "vae" in hashes:
        source["vae"] = hashes["vae"]
    return ModelInfo(
        family=model.family,
        prediction_type=model.prediction_type,
        name=model.name,
        dtype=dtype,
        sha256=hashes["sha256"],
        source=source,
        detection=detection,
        converter_version=CONVERTER_VERSION,
        quantization=None if quantization is None else quantization.to_dict(),
        force_zeros_for_empty_prompt=_flag(found.force_zeros_for_empty_prompt),
        requires_aesthetics_score=_flag(found.requires_aesthetics_score),
        kind="" if found.kind is None or found.kind.value == "standard" else found.kind.value,
    )


def _flag(finding) -> bool:
    return bool(finding is not None and finding.value)
