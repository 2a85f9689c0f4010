"""diffusers SD3 / SD3.5 folders (`StableDiffusion3Pipeline`) -> a `ModelPlan`.

    transformer/       SD3Transformer2DModel (the MMDiT)          -> transformer/     kind mmdit
    vae/               AutoencoderKL, 16 latent channels          -> vae/
    text_encoder/      CLIPTextModelWithProjection (CLIP-L)       -> text_encoder/    kind clip_text
    text_encoder_2/    CLIPTextModelWithProjection (bigG)         -> text_encoder_2/  kind clip_text
    text_encoder_3/    T5EncoderModel (T5 v1.1 XXL), optional     -> text_encoder_3/  kind t5_text
    tokenizer/, tokenizer_2/ (CLIP), tokenizer_3/ (T5), scheduler/ (FlowMatchEulerDiscreteScheduler)

Weights are opened as for any diffusers folder (convert/diffusers_folder.py: safetensors or .bin, `variant` files,
shards). model_index.json may list text_encoder_3 and tokenizer_3 as null (diffusers' pipeline then conditions on
zeros in T5's place): the model folder is written without them.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_sd.schedules import FLOW_SCHEDULER, NoiseSchedule
from mlx_sd.t5_tokenizer import T5Tokenizer
from mlx_sd.tokenizer import CLIPTokenizer

from .diffusers import RULES, clip_config, mmdit_config, t5_config, t5_rules, vae_config
from .diffusers_folder import MODEL_INDEX, SCHEDULER_CONFIG, dtype_finding, open_component, read_json, read_tokenizer
from .families import T5_TOWER, TEXT_TOWERS, scheduler_config
from .keymap import ComponentPlan, ConversionError, tensor_shapes
from .kind import detect_kind
from .ldm_detect import CERTAIN, FLOW, HIGH, Detection, Finding
from .plan import ModelPlan, SourceFiles
from .sd3 import check_overrides, release_evidence

PIPELINE = "StableDiffusion3Pipeline"
_CLIP_WITH_PROJECTION = "CLIPTextModelWithProjection"


def is_sd3_folder(root: Path) -> bool:
    """Whether a diffusers folder's model_index.json describes an SD3 pipeline (a transformer, no UNet)."""
    try:
        index = json.loads((root / MODEL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # plan_diffusers_folder names the problem
    if not isinstance(index, dict):
        return False
    transformer = index.get("transformer")
    return str(index.get("_class_name", "")).startswith(PIPELINE) or (
        isinstance(transformer, list) and transformer[1:] == ["SD3Transformer2DModel"]
    )


def plan_sd3_folder(
    root: Path,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    variant: str | None = None,
    kind: str | None = None,
    name: str | None = None,
) -> ModelPlan:
    """Read an SD3 diffusers folder's configs and open its weights lazily.

    Args:
        root: the folder holding model_index.json.
        family, prediction_type, kind: overrides; for SD3 only "sd3", "flow" and "standard"/"turbo" make sense
            (anything else is refused).
        variant: weights variant, e.g. "fp16".
        name: the model's name (default: the folder's), e.g. a hub repo id; also kind evidence.
    Returns:
        the model's plan (text_encoder_3 and tokenizer_3 only when model_index.json lists them).
    Raises:
        ConversionError for a missing component, unreadable config or weights, or an unsupported architecture.
    """
    index = read_json(root / MODEL_INDEX)
    model_name = name or root.resolve().name
    pipeline = index.get("_class_name", PIPELINE)
    check_overrides(family, prediction_type, kind, f"{root} ({pipeline})")
    present = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
    towers = [part for tower in TEXT_TOWERS["sd3"] for part in tower[:2]]
    needed = [c for c in ("transformer", "vae", *towers) if c not in present]
    if needed:
        raise ConversionError(
            f"{root / MODEL_INDEX} lists no {', '.join(needed)}: not a complete SD3 folder ({pipeline})"
        )
    encoder_3, tokenizer_3 = T5_TOWER
    with_t5 = encoder_3 in present
    if with_t5 and tokenizer_3 not in present:
        raise ConversionError(f"{root / MODEL_INDEX} lists {encoder_3} but no {tokenizer_3}: the folder is incomplete")

    files = [MODEL_INDEX]
    components, choices, configs = {}, {}, {}
    for folder in ("transformer", "vae", "text_encoder", "text_encoder_2") + ((encoder_3,) if with_t5 else ()):
        configs[folder], weights, choices[folder], read = open_component(root, folder, variant)
        translated, rules = _translate(folder, configs[folder], weights)
        components[folder] = ComponentPlan(folder, "", translated, weights, rules, shapes=tensor_shapes(weights))
        files += read

    tokenizers = {}
    for folder in ("tokenizer", "tokenizer_2") + ((tokenizer_3,) if with_t5 else ()):
        reader = T5Tokenizer.from_folder if folder == tokenizer_3 else CLIPTokenizer.from_folder
        tokenizers[folder], read = read_tokenizer(root, folder, reader)
        files += read

    scheduler, prediction = _scheduler(root / "scheduler" / SCHEDULER_CONFIG)
    if (root / "scheduler" / SCHEDULER_CONFIG).is_file():
        files.append(f"scheduler/{SCHEDULER_CONFIG}")
    transformer = components["transformer"].config
    detection = Detection(
        family=Finding("sd3", CERTAIN, f"{MODEL_INDEX}: {pipeline}; {release_evidence(transformer)}"),
        text_encoder=Finding("transformers", CERTAIN, "; ".join(_describe(f, configs[f]) for f in towers[::2])),
        in_channels=Finding(transformer.in_channels, CERTAIN, "transformer/config.json in_channels"),
        ema=Finding(False, CERTAIN, "a diffusers folder holds one set of weights"),
        dtype=dtype_finding(components["transformer"].source, choices["transformer"], "transformer"),
        prediction_type=prediction,
        kind=detect_kind(model_name, override=kind, scheduler=scheduler),
        text_encoder_3=Finding(True, CERTAIN, _describe(encoder_3, configs[encoder_3]))
        if with_t5
        else Finding(False, CERTAIN, f"{MODEL_INDEX} lists no {encoder_3}: SD3 conditions on zeros in T5's place"),
    )
    used = sorted({c.variant for c in choices.values() if c.variant})
    return ModelPlan(
        name=model_name,
        kind="diffusers",
        detection=detection,
        components=components,
        tokenizers=tokenizers,
        scheduler=scheduler,
        files=SourceFiles(root, tuple(files)),
        details={"format": "diffusers", "variant": ",".join(used) or None},
    )


def _translate(folder: str, config: dict, weights) -> tuple[object, list]:
    """A component's config.json -> (our config, key map)."""
    if folder == "transformer":
        return mmdit_config(config), RULES["mmdit"]
    if folder == "vae":
        return vae_config(config), RULES["vae"]
    if folder == T5_TOWER[0]:
        return t5_config(config), t5_rules(weights)
    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    if architecture != _CLIP_WITH_PROJECTION:
        raise ConversionError(
            f"{folder}/config.json: a {architecture}; SD3's pooled conditioning needs a {_CLIP_WITH_PROJECTION}"
        )
    return clip_config(config, with_projection=True), RULES["clip_text"]


def _describe(folder: str, config: dict) -> str:
    architecture = (config.get("architectures") or ["?"])[0]
    layers = config.get("num_hidden_layers", config.get("num_layers"))
    width = config.get("hidden_size", config.get("d_model"))
    return f"{folder}/config.json: {architecture}, {layers} layers, width {width}"


def _scheduler(path: Path) -> tuple[dict, Finding]:
    """The folder's FlowMatchEulerDiscreteScheduler config as published (checked), or SD3's when there is none."""
    if not path.is_file():
        why = f"no {path.parent.name}/{SCHEDULER_CONFIG}; SD3's published scheduler ({FLOW_SCHEDULER}, shift 3.0)"
        return scheduler_config("sd3", FLOW), Finding(FLOW, HIGH, why)
    config = read_json(path)
    if config.get("_class_name") != FLOW_SCHEDULER:
        raise ConversionError(
            f"{path}: a {config.get('_class_name')}; SD3 models are published with a {FLOW_SCHEDULER} (rectified flow)"
        )
    try:
        NoiseSchedule.from_config(config)
    except ValueError as error:
        raise ConversionError(f"{path}: {error}") from None
    return config, Finding(FLOW, CERTAIN, f"{SCHEDULER_CONFIG}: {FLOW_SCHEDULER} (rectified flow)")
