"""Which kind of model a source is: a standard one, or distilled to run in a few steps (Turbo, LCM).

Nothing in a checkpoint's tensors tells SD-Turbo from SD 2.1, or SDXL-Turbo from SDXL base: distillation changes
the weights, not their shapes. The kind only changes defaults (mlx_sd/params.py: Turbo runs 1 step of Euler a at
512x512 without guidance), but wrong defaults give a blurred or burnt image, so the rule is explicit and every
decision is recorded in the manifest (`detection.kind`) and printed by `mlx-sd convert`:

1. `kind=` (`--kind standard|turbo|lcm`) decides.
2. lcm, certain: the UNet embeds the guidance scale (`time_cond_proj_dim`, LCM-distilled UNets).
   lcm, high: the folder's scheduler is an LCMScheduler.
3. turbo, high: safetensors metadata (Stability's ModelSpec `modelspec.*`) names Turbo.
   turbo, medium: the file, folder or hub repository name contains "turbo" (sd_turbo.safetensors,
   sd_xl_turbo_1.0_fp16.safetensors, stabilityai/sdxl-turbo).
   turbo, medium: an SD 2.x file saved by Stability's `sgm` code (OpenCLIP under `conditioner.embedders.0.model.`
   beside the sgm denoiser's `denoiser.sigmas` table), as SD-Turbo's is; the published SD 2.x files use the older
   `cond_stage_model.*` layout (SwarmUI detects SD-Turbo the same way).
4. Otherwise standard, with low confidence and the way to say otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .ldm_detect import CERTAIN, HIGH, LOW, MEDIUM, OVERRIDE, Finding

KINDS = ("standard", "turbo", "lcm")  # ModelInfo.kind stores "standard" as ""
_TURBO = re.compile(r"turbo", re.IGNORECASE)
SGM_DENOISER_TABLE = "denoiser.sigmas"
SGM_OPENCLIP = "conditioner.embedders.0.model."


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: use one of {list(KINDS)}")
    return kind


def detect_kind(
    name: str,
    *,
    override: str | None = None,
    metadata: Mapping[str, str] | None = None,
    shapes: Mapping[str, tuple] | None = None,
    scheduler: Mapping | None = None,
    time_cond_proj_dim: int | None = None,
) -> Finding:
    """The kind of a model, by the rule in the module docstring.

    Args:
        name: the file stem, folder name or hub repo id.
        override: "standard", "turbo" or "lcm" (the caller's `--kind`).
        metadata: safetensors metadata of a single file.
        shapes: a single file's key -> shape (for the sgm-saved SD 2.x pattern).
        scheduler: a diffusers folder's scheduler config.
        time_cond_proj_dim: the UNet's guidance-embedding width, if it has one.
    Returns:
        a Finding whose value is one of KINDS.
    """
    if override is not None:
        return Finding(check_kind(override), OVERRIDE, "set by the caller")
    if time_cond_proj_dim:
        return Finding("lcm", CERTAIN, f"the UNet embeds the guidance scale (time_cond_proj_dim={time_cond_proj_dim})")
    if scheduler and scheduler.get("_class_name") == "LCMScheduler":
        return Finding("lcm", HIGH, "the folder's scheduler is an LCMScheduler")
    spec = {k: v for k, v in (metadata or {}).items() if k.startswith("modelspec.") and _TURBO.search(str(v))}
    if spec:
        key = sorted(spec)[0]
        return Finding("turbo", HIGH, f"metadata {key}={spec[key]!r}")
    if _TURBO.search(name):
        return Finding("turbo", MEDIUM, f"the name {name!r} says Turbo")
    if shapes is not None and SGM_DENOISER_TABLE in shapes and any(k.startswith(SGM_OPENCLIP) for k in shapes):
        if not any(k.startswith("model.diffusion_model.label_emb.") for k in shapes):
            why = f"an SD 2.x file saved by Stability's sgm code ({SGM_OPENCLIP}* and {SGM_DENOISER_TABLE})"
            return Finding("turbo", MEDIUM, f"{why}, as SD-Turbo is; pass kind='standard' if it is not")
    return Finding(
        "standard",
        LOW,
        "no sign of a distilled model (name, metadata, scheduler, UNet); pass kind='turbo' (--kind turbo) for an "
        "SD-Turbo / SDXL-Turbo checkpoint named otherwise",
    )
