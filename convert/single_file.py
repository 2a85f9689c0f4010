"""Original single-file checkpoints (`.safetensors`, `.ckpt`, `.pt`, `.pth`) -> a `ModelPlan`.

The file is opened lazily and safely (convert/readers.py), detected and split into components by convert/ldm.py
(SD 1.x/2.x/XL) or convert/sd3_file.py (SD3 / SD3.5) from its header alone. Single files carry no tokenizer or
scheduler: the tokenizer is the bundled CLIP vocabulary with the original code's normalisation ("openai") and the
family's pad id, and the scheduler is the family's published config for the detected prediction type
(convert/families.py). SD3 files differ: see convert/sd3_file.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from mlx_sd.tokenizer import CLIPTokenizer

from .families import COSXL_SCHEDULER, PLAYGROUND_LATENTS, PLAYGROUND_SCHEDULER, TEXT_TOWERS, scheduler_config
from .keymap import ConversionError
from .kind import detect_kind
from .ldm import plan_single_file, plan_vae_file
from .ldm_detect import MMDIT_MARKER, OVERRIDE, UNET_PREFIX, Finding
from .plan import ModelPlan, SourceFiles, VAESource, stored_dtype
from .readers import Checkpoint, open_checkpoint
from .sd3 import is_sd3
from .sd3_file import plan_sd3_file

# The original SD code tokenizes with OpenAI's cleaning (ftfy, HTML unescape); see mlx_sd/tokenizer.py.
SINGLE_FILE_NORMALIZATION = "openai"


def _header(checkpoint: Checkpoint) -> tuple[dict, dict]:
    infos = {key: checkpoint.info(key) for key in checkpoint}
    return {k: i.shape for k, i in infos.items()}, {k: i.dtype for k, i in infos.items()}


def plan_file(
    path: Path,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    use_ema: bool = True,
    kind: str | None = None,
    text_encoders: Sequence[Path] | None = None,
) -> ModelPlan:
    """Open an original-layout checkpoint and plan its conversion (nothing but the header is read).

    Args:
        path: the checkpoint file.
        family, prediction_type, kind: overrides of what detection finds (kind: convert/kind.py).
        use_ema: take the UNet's EMA weights when the file has them.
        text_encoders: SD3 only: text encoder files taking the place of the file's (convert/sd3_file.py).
    Returns:
        the plan; `components` may lack "vae" when the file has none (the caller then needs a separate VAE).
    Raises:
        ConversionError (UnsafeCheckpointError for refused pickles) for anything that cannot be converted.
    """
    checkpoint = open_checkpoint(path)
    shapes, dtypes = _header(checkpoint)
    if is_sd3(shapes):
        return plan_sd3_file(
            path,
            checkpoint,
            shapes,
            dtypes,
            family=family,
            prediction_type=prediction_type,
            kind=kind,
            text_encoders=text_encoders,
        )
    if text_encoders is not None:
        raise ConversionError(
            f"{path}: text encoder files (--text-encoder) complete SD3 single files; this is no SD3 file "
            f"(no {UNET_PREFIX}{MMDIT_MARKER}), and its text encoders come from the file itself"
        )
    if family == "sd3":
        raise ConversionError(
            f"{path}: family sd3, but the file has no SD3 MMDiT ({UNET_PREFIX}{MMDIT_MARKER}); drop --family sd3"
        )
    found_kind = detect_kind(path.stem, override=kind, metadata=checkpoint.metadata, shapes=shapes)
    plan = plan_single_file(
        checkpoint,
        shapes=shapes,
        dtypes=dtypes,
        family=family,
        prediction_type=prediction_type,
        use_ema=use_ema,
        metadata=checkpoint.metadata,
        global_step=checkpoint.global_step,
        kind=found_kind,
    )
    found = plan.detection
    if not {"text_encoder", "text_encoder_2"} & set(plan.components):
        raise ConversionError(
            f"{path}: the file has no text encoder (cond_stage_model.* / conditioner.embedders.*), only "
            f"{', '.join(plan.components)}; convert the full checkpoint, not a UNet-only export"
        )
    tokenizers = {
        tokenizer: CLIPTokenizer.bundled(pad_token_id=pad, normalization=SINGLE_FILE_NORMALIZATION)
        for _, tokenizer, pad in TEXT_TOWERS[found.family.value]
    }
    components = dict(plan.components)
    scheduler = _scheduler(checkpoint, shapes, found, found_kind.value, components)
    details = {"format": checkpoint.format}
    if checkpoint.nesting:
        details["nesting"] = "/".join(checkpoint.nesting)
    if checkpoint.global_step is not None:
        details["global_step"] = checkpoint.global_step
    return ModelPlan(
        name=path.stem,
        kind="single-file",
        detection=found,
        components=components,
        tokenizers=tokenizers,
        scheduler=scheduler,
        files=SourceFiles(path.parent, (path.name,)),
        details=details,
    )


def _scheduler(checkpoint: Checkpoint, shapes, found, kind: str, components: dict) -> dict:
    """The scheduler to publish, from the family and the file's markers (convert/ldm_detect.py): Playground v2.5's
    EDM scheduler (its latents' statistics, `edm_mean` / `edm_std`, go to the VAE in `components`), CosXL's with the
    file's sigma range, or the family's (with zero-terminal SNR for `ztsnr` v-prediction files)."""
    prediction = found.prediction_type.value
    if "edm_mean" in shapes and "edm_std" in shapes:
        vae = components.get("vae")
        if vae is not None:
            stats = {k: _vector(checkpoint, f"edm_{k.rsplit('_', 1)[1]}") for k in ("latents_mean", "latents_std")}
            scale = PLAYGROUND_LATENTS["scaling_factor"]
            components["vae"] = replace(vae, config=replace(vae.config, scaling_factor=scale, **stats))
        return {**PLAYGROUND_SCHEDULER, "prediction_type": prediction}
    if "edm_vpred.sigma_max" in shapes:
        sigmas = {k: float(np.asarray(checkpoint[f"edm_vpred.{k}"]).reshape(-1)[0])
                  for k in ("sigma_max", "sigma_min") if f"edm_vpred.{k}" in shapes}  # fmt: skip
        return {**COSXL_SCHEDULER, **sigmas, "prediction_type": prediction}
    config = scheduler_config(found.family.value, prediction, kind)
    if "ztsnr" in shapes and prediction == "v_prediction":  # as ComfyUI: zero terminal SNR for v_pred + ztsnr files
        config["rescale_betas_zero_snr"] = True
    return config


def _vector(checkpoint: Checkpoint, key: str) -> tuple[float, ...]:
    values = np.asarray(checkpoint[key], np.float64).reshape(-1)
    if values.size != 4 or not np.all(np.isfinite(values)) or (key == "edm_std" and np.any(values == 0)):
        raise ConversionError(f"{checkpoint.path}: {key} holds {values.size} values; Playground's latent statistics "
                              "are 4 finite numbers (std nonzero)")  # fmt: skip
    return tuple(float(v) for v in values)


def plan_vae_single_file(path: Path) -> VAESource:
    """A separately published original-layout VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors)."""
    checkpoint = open_checkpoint(path)
    shapes, _ = _header(checkpoint)
    plan = plan_vae_file(checkpoint, shapes)
    finding = Finding(path.name, OVERRIDE, f"original-layout VAE file {path.name}")
    return VAESource(
        path.stem, plan, SourceFiles(path.parent, (path.name,)), finding, stored_dtype(checkpoint), scale_known=False
    )
