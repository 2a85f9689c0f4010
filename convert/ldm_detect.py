"""What an original-layout single-file checkpoint is, with the evidence and how sure we are.

Single files carry no config, so the converter infers the architecture from tensor shapes and the rest from what
the file shows: key prefixes, projection shapes, marker keys some tools write, metadata and, for SD2's
prediction type, a weight statistic. Every finding can be overridden, and each says why it was decided.

Prediction type, in order of trust:
1. `prediction_type=` (the user's `--prediction-type`).
2. Marker tensors, as ComfyUI reads them (its `SDXL.model_type`): `edm_mean` / `edm_std` (Playground v2.5, an EDM
   epsilon model), `edm_vpred.sigma_max` / `sigma_min` (an EDM v-prediction model such as CosXL; ComfyUI writes them),
   `v_pred` (ComfyUI writes one when it saves a v-prediction model; `ztsnr` beside it means a zero-terminal-SNR
   schedule); or safetensors metadata `modelspec.prediction_type` (Stability's ModelSpec). convert/single_file.py
   turns the EDM markers and `ztsnr` into the published scheduler.
3. The family: SD1.x and SDXL (base and refiner) models are epsilon models; SD2 inpainting models and SD-Turbo
   (kind "turbo", convert/kind.py; Stability's sd_2_1.yaml: EpsScaling) are epsilon models.
4. SD2 with 4 input channels: 512-base (epsilon) and 768-v (v) have the same tensors. diffusers treats the
   original `global_step` 875000 (512-base-ema.ckpt) as epsilon and everything else as v; ComfyUI
   (`supported_models.SD20.model_type`) calls it v when the population std of
   `output_blocks.11.1.transformer_blocks.0.norm1.bias` exceeds 0.09. We use the global step when the reader
   found one, else ComfyUI's statistic, and report LOW confidence: check the model card, or pass the type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

EPSILON, V_PREDICTION = "epsilon", "v_prediction"  # diffusers' scheduler names, as in convert/families.py
FLOW = "flow"  # rectified flow (SD3): the only prediction type of the sd3 family, and only of it
PREDICTION_TYPES = (EPSILON, V_PREDICTION, FLOW)
_PREDICTION_ALIASES = {"eps": EPSILON, "epsilon": EPSILON, "v": V_PREDICTION, "v_prediction": V_PREDICTION, FLOW: FLOW}
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3")

# Confidence levels, strongest first.
OVERRIDE, CERTAIN, HIGH, MEDIUM, LOW = "override", "certain", "high", "medium", "low"

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
EMA_BOOKKEEPING = {EMA_PREFIX + "decay", EMA_PREFIX + "num_updates"}  # LitEma buffers that are not weights
VAE_PREFIX = "first_stage_model."
# Text encoder layouts: OpenAI CLIP as transformers saves it (SD1), OpenCLIP (SD2), OpenCLIP saved by Stability's
# newer `sgm` code (SD2-architecture files such as SD-Turbo), and SDXL's two-encoder conditioner.
TEXT_PREFIXES = {
    "clip": "cond_stage_model.transformer.",
    "openclip": "cond_stage_model.model.",
    "openclip-sgm": "conditioner.embedders.0.model.",
}
SDXL_MARKER = "conditioner.embedders.1."

# ComfyUI's SD2 v-prediction statistic (supported_models.SD20.model_type).
V_STAT_KEY = UNET_PREFIX + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
V_STAT_THRESHOLD = 0.09
SD2_BASE_GLOBAL_STEP = 875000  # the original 512-base-ema.ckpt; diffusers' only epsilon signal for SD2
# Context widths of the published text encoders: CLIP-L (SD1), OpenCLIP-H (SD2).
CONTEXT_FAMILY = {768: "sd1", 1024: "sd2"}
# The MMDiT's first joint block (relative to UNET_PREFIX): SD3 / SD3.5 files (convert/sd3.py MARKER).
MMDIT_MARKER = "joint_blocks.0.x_block.attn.qkv.weight"


@dataclass(frozen=True)
class Finding:
    """One detected property: its value, how sure we are (override/certain/high/medium/low) and why."""

    value: object
    confidence: str
    evidence: str

    def __str__(self) -> str:
        return f"{self.value} ({self.confidence}: {self.evidence})"


@dataclass(frozen=True)
class Detection:
    """What a checkpoint was found to be. `family`: sd1/sd2/sdxl/sdxl-refiner; `text_encoder`: the layout
    (clip, openclip, openclip-sgm, sdxl, or None); `in_channels`: 4, 9 for inpainting, 8 for InstructPix2Pix;
    `ema`: whether the UNet weights come from the file's EMA copy; `dtype`: the UNet's stored float type;
    `prediction_type`: epsilon or v_prediction. `kind`: standard, turbo or lcm (convert/kind.py). SDXL only (None
    otherwise): `force_zeros_for_empty_prompt` (zero negative conditioning for an empty negative prompt) and
    `requires_aesthetics_score` (the refiner's micro-conditioning), as the diffusers pipelines read them. SD3 only:
    `text_encoder_3`, whether the model has its T5 encoder (without it diffusers conditions on zeros in its place)."""

    family: Finding
    text_encoder: Finding
    in_channels: Finding
    ema: Finding
    dtype: Finding
    prediction_type: Finding
    kind: Finding | None = None
    force_zeros_for_empty_prompt: Finding | None = None
    requires_aesthetics_score: Finding | None = None
    text_encoder_3: Finding | None = None

    @property
    def inpainting(self) -> bool:
        return self.in_channels.value == 9

    def summary(self) -> str:
        """One line per finding, for the CLI and the manifest."""
        names = [f.name for f in fields(self) if getattr(self, f.name) is not None]
        return "\n".join(f"{name}: {getattr(self, name)}" for name in names)


def normalize_prediction_type(value: str) -> str:
    try:
        return _PREDICTION_ALIASES[value.lower()]
    except KeyError:
        raise ValueError(
            f"prediction type {value!r}: use one of {list(PREDICTION_TYPES)} (or eps, v; flow is SD3's)"
        ) from None


def detect(
    state: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    use_ema: bool = True,
    metadata: Mapping[str, str] | None = None,
    global_step: int | None = None,
    kind: Finding | None = None,
) -> Detection:
    """Detect what an original-layout checkpoint holds.

    Args:
        state: key -> tensor (read only for the one statistic SD2 needs; a lazy mapping is fine).
        shapes, dtypes: key -> shape / numpy dtype name for every tensor (from the file header).
        family: "sd1", "sd2" or "sdxl" to override detection.
        prediction_type: "epsilon"/"eps" or "v_prediction"/"v" to override detection.
        use_ema: take the UNet from the EMA copy when the file has one.
        metadata: safetensors `__metadata__`, if any.
        global_step: the original training step stored beside the state dict in `.ckpt` files, if any.
        kind: what convert/kind.py found (a Turbo SD 2.x file predicts epsilon), recorded in the Detection.
    Returns:
        a Detection; each Finding says how it was decided.
    """
    unet_shapes = {k[len(UNET_PREFIX) :]: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    text = _text_layout(shapes)
    fam = _family(unet_shapes, text, family)
    channels = _in_channels(unet_shapes)
    prediction = _prediction_type(
        state, shapes, fam.value, channels.value, prediction_type, metadata, global_step, kind
    )
    sdxl = sdxl_pipeline_flags(fam.value, "the SDXL base layout (two text towers)", "the refiner layout (bigG only)")
    return Detection(
        family=fam,
        text_encoder=text,
        in_channels=channels,
        ema=_ema(shapes, use_ema),
        dtype=_dtype(shapes, dtypes),
        prediction_type=prediction,
        kind=kind,
        **sdxl,
    )


def sdxl_pipeline_flags(family: str, base_evidence: str, refiner_evidence: str) -> dict[str, Finding]:
    """The diffusers pipeline flags of an SDXL model without a model_index.json, as the published folders set
    them: base (StableDiffusionXLPipeline) zeroes the negative conditioning of an empty negative prompt; the
    refiner's model_index.json sets force_zeros_for_empty_prompt=false, requires_aesthetics_score=true."""
    if family == "sdxl":
        why = f"{base_evidence}: as stabilityai/stable-diffusion-xl-base-1.0's model_index.json"
        return {"force_zeros_for_empty_prompt": Finding(True, HIGH, why),
                "requires_aesthetics_score": Finding(False, HIGH, why)}  # fmt: skip
    if family == "sdxl-refiner":
        why = f"{refiner_evidence}: as stabilityai/stable-diffusion-xl-refiner-1.0's model_index.json"
        return {"force_zeros_for_empty_prompt": Finding(False, HIGH, why),
                "requires_aesthetics_score": Finding(True, HIGH, why)}  # fmt: skip
    return {}


def _text_layout(shapes: Mapping) -> Finding:
    if any(k.startswith(SDXL_MARKER) for k in shapes):
        return Finding("sdxl", CERTAIN, f"{SDXL_MARKER}* tensors: SDXL's two-encoder conditioner")
    for layout, prefix in TEXT_PREFIXES.items():
        count = sum(1 for k in shapes if k.startswith(prefix))
        if count:
            return Finding(layout, CERTAIN, f"{count} tensors under {prefix}*")
    return Finding(None, CERTAIN, "no text encoder tensors in the file")


def _family(unet: Mapping, text: Finding, override: str | None) -> Finding:
    if MMDIT_MARKER in unet:  # never a UNet: convert/sd3_file.py plans these files
        return overridden(override, Finding("sd3", CERTAIN, f"{UNET_PREFIX}joint_blocks.* (an MMDiT): SD3 / SD3.5"))
    votes: list[tuple[str, str]] = []  # (family, evidence)
    if text.value == "sdxl" or ("label_emb.0.0.weight" in unet and text.value == "openclip-sgm"):
        if text.value == "sdxl":
            return overridden(override, Finding("sdxl", HIGH, text.evidence))
        refiner = "label_emb.* and OpenCLIP under conditioner.embedders.0 alone: the SDXL refiner"
        return overridden(override, Finding("sdxl-refiner", HIGH, refiner))
    if text.value == "clip":
        votes.append(("sd1", "OpenAI CLIP text encoder (cond_stage_model.transformer)"))
    elif text.value in ("openclip", "openclip-sgm"):
        votes.append(("sd2", f"OpenCLIP text encoder ({TEXT_PREFIXES[text.value]})"))
    proj = next((v for k, v in unet.items() if k.endswith(".1.proj_in.weight")), None)
    if proj is not None:
        votes.append(("sd2", "linear proj_in") if len(proj) == 2 else ("sd1", "1x1-conv proj_in"))
    context = next((v[1] for k, v in unet.items() if k.endswith("attn2.to_k.weight")), None)
    if context in CONTEXT_FAMILY:
        votes.append((CONTEXT_FAMILY[context], f"cross-attention width {context}"))
    if not votes:
        finding = Finding("sd1", LOW, "no evidence either way (no text encoder, no attention tensors)")
    else:
        names = {f for f, _ in votes}
        evidence = ", ".join(e for _, e in votes)
        if len(names) == 1:
            finding = Finding(votes[0][0], HIGH if len(votes) > 1 else MEDIUM, evidence)
        else:  # conflicting: trust the first vote (text encoder layout, then projection)
            finding = Finding(votes[0][0], LOW, f"conflicting evidence: {evidence}")
    return overridden(override, finding)


def overridden(override: str | None, found: Finding) -> Finding:
    """The caller's family, noting what detection found; `found` itself when there is no override."""
    if override is None:
        return found
    if override not in FAMILIES:
        raise ValueError(f"family {override!r}: use one of {list(FAMILIES)}")
    note = "" if override == found.value else f"; detection said {found}"
    return Finding(override, OVERRIDE, f"set by the caller{note}")


def _in_channels(unet: Mapping) -> Finding:
    shape = unet.get("input_blocks.0.0.weight")
    if shape is None:
        return Finding(None, CERTAIN, f"no {UNET_PREFIX}input_blocks.0.0.weight (conv_in)")
    kinds = {4: "a text-to-image UNet", 9: "an inpainting UNet (latents, mask, masked-image latents)",
             8: "an InstructPix2Pix UNet (latents, the image to edit)"}  # fmt: skip
    what = kinds.get(shape[1], "an unusual UNet")
    return Finding(shape[1], CERTAIN, f"conv_in takes {shape[1]} channels: {what}")


def _ema(shapes: Mapping, use_ema: bool) -> Finding:
    count = sum(1 for k in shapes if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING)
    if not count:
        return Finding(False, CERTAIN, "no model_ema.* tensors: the file holds one set of UNet weights")
    if use_ema:
        return Finding(True, CERTAIN, f"{count} model_ema.* tensors; using them (use_ema=False for the raw weights)")
    return Finding(False, OVERRIDE, f"{count} model_ema.* tensors ignored (use_ema=False)")


def _dtype(shapes: Mapping, dtypes: Mapping[str, str]) -> Finding:
    counts = Counter(dtypes[k] for k in shapes if k.startswith(UNET_PREFIX))
    if not counts:
        return Finding(None, CERTAIN, "no UNet tensors")
    value, _ = counts.most_common(1)[0]
    return Finding(value, CERTAIN, "UNet tensors: " + ", ".join(f"{n} {d}" for d, n in counts.most_common()))


def _prediction_type(state, shapes, family, in_channels, override, metadata, global_step, kind) -> Finding:
    if override is not None:
        return Finding(normalize_prediction_type(override), OVERRIDE, "set by the caller")
    if family == "sd3":
        return Finding(FLOW, CERTAIN, "SD3 / SD3.5 are rectified-flow models")
    if "edm_mean" in shapes and "edm_std" in shapes:
        return Finding(EPSILON, HIGH, "marker tensors edm_mean / edm_std: Playground v2.5, an EDM model (ComfyUI)")
    if "edm_vpred.sigma_max" in shapes:
        return Finding(V_PREDICTION, HIGH, "marker tensors edm_vpred.sigma_max / sigma_min: an EDM v-prediction "
                                           "model such as CosXL (written by ComfyUI)")  # fmt: skip
    if "v_pred" in shapes:
        zsnr = " and zero-terminal-SNR (ztsnr)" if "ztsnr" in shapes else ""
        return Finding(V_PREDICTION, HIGH, f"marker tensor 'v_pred'{zsnr} (written by ComfyUI)")
    spec = (metadata or {}).get("modelspec.prediction_type")
    if spec in _PREDICTION_ALIASES:
        return Finding(_PREDICTION_ALIASES[spec], HIGH, f"metadata modelspec.prediction_type={spec!r}")
    if family in ("sd1", "sdxl", "sdxl-refiner"):
        return Finding(EPSILON, HIGH, f"{family} models predict epsilon unless marked (no v_pred marker)")
    if in_channels == 9:
        return Finding(EPSILON, HIGH, "SD2 inpainting models predict epsilon")
    if kind is not None and kind.value == "turbo":
        return Finding(EPSILON, MEDIUM, "SD-Turbo predicts epsilon (Stability's sd_2_1.yaml: EpsScaling); kind turbo: "
                                        f"{kind.evidence}")  # fmt: skip
    if global_step is not None:
        if global_step == SD2_BASE_GLOBAL_STEP:
            return Finding(EPSILON, MEDIUM, f"global_step {global_step}: the original SD2 512-base checkpoint")
        return Finding(
            V_PREDICTION, LOW, f"SD2 with global_step {global_step} (diffusers assumes v unless it is 875000)"
        )
    if V_STAT_KEY in shapes:
        std = float(np.asarray(state[V_STAT_KEY], dtype=np.float64).std())
        value = V_PREDICTION if std > V_STAT_THRESHOLD else EPSILON
        return Finding(
            value,
            LOW,
            f"ComfyUI's SD2 heuristic: std of output_blocks.11.1...norm1.bias = {std:.4f} "
            f"{'>' if value == V_PREDICTION else '<='} {V_STAT_THRESHOLD}; check the model card "
            "(768-v models: v_prediction, 512-base: epsilon)",
        )
    return Finding(V_PREDICTION, LOW, "SD2 default (diffusers assumes v for SD2); no evidence in the file")
