"""Original single-file checkpoints (CompVis/Stability `ldm` and `sgm` layouts, SD 1.x, 2.x, SDXL) -> mlx_sd components.

A single file holds the whole LatentDiffusion module's state dict:

    model.diffusion_model.*     UNet                     -> convert/ldm_unet.py
    model_ema.*                 the UNet's EMA copy, names with the dots removed (LitEma)
    first_stage_model.*         KL autoencoder           -> convert/ldm_vae.py
    cond_stage_model.transformer.*   SD1: OpenAI CLIP-L as transformers saves it (with or without `text_model.`)
    cond_stage_model.model.*         SD2: OpenCLIP ViT-H (`conditioner.embedders.0.model.*` in sgm-saved files)
    conditioner.embedders.*          SDXL base (CLIP-L + bigG) and refiner (bigG): convert/sgm.py
    betas, alphas_cumprod, ...  the training schedule (dropped: the scheduler config recomputes it)

`plan_single_file` detects what the file is (convert/ldm_detect.py), infers each component's config from tensor
shapes, and checks that every tensor in the file belongs to a component or is dropped for a stated reason. Each
`ComponentPlan.keymap()` then checks one component's mapping strictly from the header's shapes (convert/keymap.py)
and `ComponentPlan.read()` reads one parameter at a time, so a writer streams the file tensor by tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from mlx_sd.models import CLIPTextConfig

from .controlnet import USE_AS_IT_IS
from .diffusers import CLIP_RULES
from .keymap import ComponentPlan, ConversionError, Rule, rename
from .ldm_detect import (
    EMA_BOOKKEEPING,
    EMA_PREFIX,
    OVERRIDE,
    SDXL_MARKER,
    TEXT_PREFIXES,
    UNET_PREFIX,
    VAE_PREFIX,
    Detection,
    Finding,
    detect,
)
from .ldm_unet import HEAD_CHANNELS, SD1_HEADS, unet_config_from_shapes, unet_rules, uses_linear_projection
from .ldm_vae import SD_SCALING_FACTOR, vae_config_from_shapes, vae_rules
from .openclip import OPENCLIP_HEAD_DIM, openclip_config, openclip_rules
from .sgm import BIG_G_PREFIX, CLIP_L_PREFIX, SDXL_SCALING_FACTOR, big_g_config, sdxl_unet_config

# ldm's DDPM.register_schedule buffers (and lvlb_weights, persistent in older CompVis code).
_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
)
TOP_LEVEL_DROPS = [
    Rule("|".join(_SCHEDULE_BUFFERS), None, "the training noise schedule; the scheduler config recomputes it"),
    Rule(r"logvar", None, "per-timestep loss weights (learn_logvar); training only"),
    Rule(r"scale_factor", None, "the latent scaling factor (scale_by_std); read into the VAE config"),
    Rule(r"model_ema\.(?:decay|num_updates)", None, "EMA bookkeeping, not weights"),
    Rule(r"v_pred|ztsnr", None, "marker tensors for v-prediction / zero-terminal SNR; read by detection"),
    Rule(r"edm_vpred\.sigma_(?:max|min)|edm_mean|edm_std", None, "EDM markers (CosXL, Playground); read by detection"),
    Rule(r"denoiser\.sigmas", None, "the sgm denoiser's noise levels; the scheduler config recomputes them"),
]
_UNUSED_EMA = Rule(r"model_ema\..+", None, "the UNet's EMA copy, not selected (use_ema=False)")

# OpenAI CLIP text towers use 64-channel heads (ViT-L/14: 768 = 12 x 64).
CLIP_HEAD_DIM = 64
# SD2's OpenCLIP ViT-H/14 has 24 blocks and SD2 conditions on the output of the 23rd (ldm's "penultimate").
_VIT_H_WIDTH, _VIT_H_BLOCKS = 1024, 24


class KeyView(Mapping):
    """A lazy mapping: our key -> the file's tensor under another key (prefix stripped, or the EMA copy)."""

    def __init__(self, state: Mapping[str, np.ndarray], keys: dict[str, str], shapes: Mapping[str, tuple]):
        self._state, self._keys, self._shapes = state, keys, shapes

    def __getitem__(self, key: str) -> np.ndarray:
        return self._state[self._keys[key]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def file_keys(self) -> list[str]:
        return list(self._keys.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Our key -> shape, from the file's header (nothing read)."""
        return {ours: tuple(self._shapes[theirs]) for ours, theirs in self._keys.items()}


def plan_component(name: str, prefix: str, config, view: KeyView, rules: list[Rule], hint: str = "") -> ComponentPlan:
    return ComponentPlan(name, prefix, config, view, rules, hint, shapes=view.shapes())


@dataclass(frozen=True)
class SingleFilePlan:
    detection: Detection
    components: dict[str, ComponentPlan]  # only the components the file holds


def plan_single_file(
    state: Mapping[str, np.ndarray],
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    dtypes: Mapping[str, str] | None = None,
    family: str | None = None,
    prediction_type: str | None = None,
    use_ema: bool = True,
    metadata: Mapping[str, str] | None = None,
    global_step: int | None = None,
    kind: Finding | None = None,
) -> SingleFilePlan:
    """Detect, infer configs and split an original-layout SD1/SD2/SDXL state dict into its components.

    Args:
        state: the file's flat state dict, key -> tensor (lazy is fine; only the scale_factor scalar and the
            SD2 detection statistic are read here).
        shapes, dtypes: key -> shape / dtype name for every tensor, e.g. from the file header; taken from
            `state` when None (which reads every tensor of a lazy mapping).
        family: "sd1", "sd2", "sdxl" or "sdxl-refiner" to override detection.
        prediction_type: override ("epsilon"/"eps", "v_prediction"/"v").
        use_ema: build the UNet from the EMA copy when the file has one (False: the raw training weights).
        metadata: safetensors metadata; global_step: the `.ckpt` training step, if the reader found one.
        kind: what convert/kind.py found (decides SD-Turbo's prediction type), recorded in the Detection.
    Returns:
        the Detection and a ComponentPlan per component present (unet always; vae, text_encoder(s) if present).
    Raises:
        ConversionError naming tensors that belong to no component, or an unsupported / inconsistent file.
    """
    if shapes is None:
        shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    if dtypes is None:
        dtypes = {k: str(np.asarray(state[k]).dtype) for k in state}
    found = detect(
        state,
        shapes,
        dtypes,
        family=family,
        prediction_type=prediction_type,
        use_ema=use_ema,
        metadata=metadata,
        global_step=global_step,
        kind=kind,
    )
    if found.family.value == "sd3":
        raise ConversionError(
            f"an SD3 / SD3.5 file ({found.family.evidence}): convert/sd3_file.py plans it, not the UNet layout"
        )
    texts = _text_encoders(state, shapes, found)  # first: their layout names a wrong family most plainly
    unet = _unet(state, shapes, found, texts)
    components = {"unet": unet}
    # The UNet claims its own tensors and, when they are used, their EMA copies.
    claimed = {UNET_PREFIX + k for k in unet.source} | set(unet.source.file_keys())
    vae_keys = strip_prefix(shapes, VAE_PREFIX)
    if vae_keys:
        scale = float(np.asarray(state["scale_factor"]).reshape(())) if "scale_factor" in shapes else None
        if scale is None and found.family.value.startswith("sdxl"):
            scale = SDXL_SCALING_FACTOR
        components["vae"] = _vae(state, shapes, vae_keys, scale)
        if not (components["vae"].config.use_quant_conv and components["vae"].config.use_post_quant_conv):
            raise ConversionError(
                f"vae ({VAE_PREFIX}*): no quant_conv / post_quant_conv, which every SD 1.x/2.x/XL autoencoder has "
                "(only SD3's lacks them); the file may be damaged"
            )
        claimed |= set(vae_keys.values())
    for name, text in texts.items():
        components[name] = text
        claimed |= {text.prefix + k for k in text.source}
    _check_everything_claimed(shapes, claimed, found)
    return SingleFilePlan(found, components)


def strip_prefix(shapes: Mapping, prefix: str) -> dict[str, str]:
    return {k[len(prefix) :]: k for k in shapes if k.startswith(prefix)}


# --- UNet -------------------------------------------------------------------------------------------------


def _unet(state, shapes, found: Detection, texts: dict[str, ComponentPlan]) -> ComponentPlan:
    keys = strip_prefix(shapes, UNET_PREFIX)
    if not keys:
        ema_only = any(k.startswith(EMA_PREFIX) for k in shapes)
        raise ConversionError(
            "no model.diffusion_model.* tensors: "
            + (
                "the file has only the EMA copy (model_ema.*), whose dotless names cannot be mapped back"
                if ema_only
                else f"this is not an original-layout SD checkpoint ({likely_cause(list(shapes))})"
            )
        )
    relative = {k: shapes[v] for k, v in keys.items()}
    family = found.family.value
    heads = dict(num_heads=SD1_HEADS) if family == "sd1" else dict(head_channels=HEAD_CHANNELS)
    config = unet_config_from_shapes(relative, **heads)
    if family.startswith("sdxl"):
        if "text_encoder_2" not in texts:
            raise ConversionError(
                f"unet: an {family} UNet needs the pooled width of its bigG text tower, which the file does not hold"
            )
        config = sdxl_unet_config(config, family, texts["text_encoder_2"].config.projection_dim)
    if found.ema.value:
        keys = _ema_keys(shapes, keys)
    # Shapes cannot show the head count, so a wrong family would convert silently into wrong attention: refuse
    # the combination no published model has.
    linear = uses_linear_projection(relative)
    if linear is not None and linear != (family != "sd1"):
        layout = "linear projections (SD2 layout)" if linear else "1x1-conv projections (SD1 layout)"
        raise ConversionError(
            f"unet: the UNet has {layout} but the family is {family} ({found.family}); "
            + ("drop the family override" if found.family.confidence == OVERRIDE else "pass the right --family")
        )
    hint = ""
    if "label_emb.0.0.weight" in relative and not family.startswith("sdxl"):
        hint = "label_emb.* is a class/image embedding (SD2 unCLIP?), which mlx-sd does not support."
    return plan_component("unet", UNET_PREFIX, config, KeyView(state, keys, shapes), unet_rules(config), hint)


def _ema_keys(shapes: Mapping, keys: dict[str, str]) -> dict[str, str]:
    """Point every UNet parameter at its EMA copy (LitEma stores `diffusion_model.a.b` as `diffusion_modelab`)."""
    ema = {k for k in shapes if k.startswith(EMA_PREFIX)} - EMA_BOOKKEEPING
    mapped = {ours: EMA_PREFIX + ("diffusion_model." + ours).replace(".", "") for ours in keys}
    missing = sorted(k for k, e in mapped.items() if e not in ema)
    extra = sorted(ema - set(mapped.values()))
    if missing or extra:
        raise ConversionError(
            f"unet: the EMA copy does not match the UNet ({len(missing)} parameters without an EMA tensor, e.g. "
            f"{missing[:3]}; {len(extra)} EMA tensors without a parameter, e.g. {extra[:3]}); "
            "pass use_ema=False (--no-ema) to convert the raw weights"
        )
    return mapped


# --- VAE --------------------------------------------------------------------------------------------------


def plan_vae_file(
    state: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> ComponentPlan:
    """A separately published original-layout VAE (e.g. vae-ft-mse-840000), keys bare or under
    `first_stage_model.`; for `--vae`. Every tensor must map (training `loss.*` tensors are dropped)."""
    if shapes is None:
        shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    prefixed = all(k.startswith(VAE_PREFIX) for k in shapes)
    keys = strip_prefix(shapes, VAE_PREFIX) if prefixed else {k: k for k in shapes}
    plan = _vae(state, shapes, keys, None)
    return plan if prefixed else plan_component("vae", "", plan.config, plan.source, plan.rules)


def _vae(state, shapes, keys: dict[str, str], scale: float | None) -> ComponentPlan:
    relative = {k: shapes[v] for k, v in keys.items()}
    config = vae_config_from_shapes(relative, SD_SCALING_FACTOR if scale is None else scale)
    return plan_component("vae", VAE_PREFIX, config, KeyView(state, keys, shapes), vae_rules(config))


# --- text encoders ----------------------------------------------------------------------------------------

_SD1_TEXT_DROPS = [
    Rule(r"logit_scale", None, "CLIP's contrastive temperature; text conditioning does not use it"),
    Rule(r"text_projection\.weight", None, "CLIP's projection head; SD1 conditions on the token states"),
]
_SD2_TEXT_DROPS = [
    Rule(r"text_projection", None, "the pooled projection; SD2 conditions on token states (diffusers drops it too)"),
]


def _text_encoders(state, shapes, found: Detection) -> dict[str, ComponentPlan]:
    """The file's text towers by component folder: text_encoder (SD1/SD2, SDXL's CLIP-L), text_encoder_2 (bigG)."""
    layout, family = found.text_encoder.value, found.family.value
    if layout is None:
        return {}
    expected = {"sd1": ("clip",), "sd2": ("openclip", "openclip-sgm"), "sdxl": ("sdxl",),
                "sdxl-refiner": ("openclip-sgm",)}[family]  # fmt: skip
    if layout not in expected:
        raise ConversionError(
            f"text encoder: family {family} expects {' or '.join(TEXT_PREFIXES[x] + '*' for x in expected)}, "
            f"but the file has {found.text_encoder.evidence}; "
            + ("drop the family override" if found.family.confidence == OVERRIDE else "pass the right --family")
        )
    if family.startswith("sdxl"):
        return _sdxl_text_encoders(state, shapes, family)
    prefix = TEXT_PREFIXES[layout]
    keys = strip_prefix(shapes, prefix)
    relative = {k: shapes[v] for k, v in keys.items()}
    if layout == "clip":
        config, rules = clip_config_from_shapes(relative), _SD1_TEXT_DROPS + CLIP_RULES
    else:
        blocks = 1 + max(int(k.split(".")[2]) for k in relative if k.startswith("transformer.resblocks."))
        width = relative["token_embedding.weight"][1]
        # Drop the last block, as ldm (layer="penultimate") and diffusers do, unless a ViT-H tower was already
        # saved without it.
        keep = blocks if (width, blocks) == (_VIT_H_WIDTH, _VIT_H_BLOCKS - 1) else blocks - 1
        tower = {k: v for k, v in relative.items() if k != "text_projection"}
        config = openclip_config(tower, keep_layers=keep, heads=width // OPENCLIP_HEAD_DIM)
        rules = _SD2_TEXT_DROPS + openclip_rules(drop_layers=range(keep, blocks))
    return {"text_encoder": plan_component("text_encoder", prefix, config, KeyView(state, keys, shapes), rules)}


def _sdxl_text_encoders(state, shapes, family: str) -> dict[str, ComponentPlan]:
    """SDXL base: CLIP-L (text_encoder) and bigG (text_encoder_2); the refiner: bigG alone (convert/sgm.py)."""
    plans = {}
    if family == "sdxl":
        keys = strip_prefix(shapes, CLIP_L_PREFIX)
        if not keys:
            raise ConversionError(f"text encoder: no {CLIP_L_PREFIX}* tensors; the SDXL base file is incomplete")
        config = clip_config_from_shapes({k: shapes[v] for k, v in keys.items()})
        plans["text_encoder"] = plan_component("text_encoder", CLIP_L_PREFIX, config, KeyView(state, keys, shapes),
                                      _SD1_TEXT_DROPS + CLIP_RULES)  # fmt: skip
    prefix = BIG_G_PREFIX[family]
    keys = strip_prefix(shapes, prefix)
    config = big_g_config(family, {k: shapes[v] for k, v in keys.items()})
    plans["text_encoder_2"] = plan_component(
        "text_encoder_2", prefix, config, KeyView(state, keys, shapes), openclip_rules()
    )
    return plans


def clip_config_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> CLIPTextConfig:
    """OpenAI CLIP text tower (SD1) from its shapes; keys may or may not start with `text_model.`."""
    shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    try:
        vocab, width = shapes["embeddings.token_embedding.weight"]
        positions = shapes["embeddings.position_embedding.weight"][0]
        inner = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except KeyError as e:
        raise ConversionError(f"text encoder: CLIP tensor {e} not found; the text encoder is incomplete") from None
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layers\.(\d+)\.", k)))
    return CLIPTextConfig(
        vocab_size=vocab,
        max_position_embeddings=positions,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=width // CLIP_HEAD_DIM,
        hidden_act="quick_gelu",  # OpenAI's CLIP
        pooling="argmax",  # the original tokenizer's eos (49407) is the highest id
    )


# --- every tensor accounted for ---------------------------------------------------------------------------


def _check_everything_claimed(shapes: Mapping, claimed: set[str], found: Detection) -> None:
    drops = TOP_LEVEL_DROPS + ([] if found.ema.value else [_UNUSED_EMA])
    stray = sorted(k for k in shapes if k not in claimed and rename(k, drops) is None)
    if stray:
        shown = ", ".join(stray[:8]) + (f" and {len(stray) - 8} more" if len(stray) > 8 else "")
        raise ConversionError(f"{len(stray)} tensors belong to no SD component ({shown}); {likely_cause(stray)}")


_CAUSES = [
    (r"(?:control_model\.)?(?:input_hint_block|controlnet_cond_embedding)\.|(?:adapter\.)?body\.\d+\.", USE_AS_IT_IS),
    (r"control_model\.", "a ControlNet is stored in this file; convert the base model without it"),
    (SDXL_MARKER.replace(".", r"\."), "SDXL conditioner tensors: this is an SDXL file"),
    (
        r"text_encoders\.(?:clip_l|clip_g|t5xxl)\.|model\.diffusion_model\.joint_blocks\.",
        "SD3 tensors (text_encoders.*, joint_blocks.*): this is an SD3 / SD3.5 file",
    ),  # fmt: skip
    (r"(?:unet|vae|text_encoder)\.|down_blocks\.|mid_block\.", "diffusers-named tensors: convert the diffusers folder"),
    (r"lora_|.*\.lora_", "LoRA tensors: this is a LoRA, not a full checkpoint"),
    (r"cond_stage_model\.model\.visual\.", "an OpenCLIP image tower, which SD does not use"),
    (r"embedding_manager\.", "textual-inversion training state; export the embedding instead"),
]


def likely_cause(keys: list[str]) -> str:
    for pattern, cause in _CAUSES:
        if any(re.match(pattern, k) for k in keys):
            return cause
    return "the file may be damaged, or a model family mlx-sd does not convert"
