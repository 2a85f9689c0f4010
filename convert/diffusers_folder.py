"""diffusers model folders (`model_index.json`, one folder per component) -> a `ModelPlan`.

Each component's config.json is translated by convert/diffusers.py; its weights are opened lazily with the safe
readers, whatever the format: `.safetensors` or PyTorch `.bin` (read without torch, pickles restricted), fp16
`variant` files (`diffusion_pytorch_model.fp16.safetensors`), and sharded weights with an index json
(`*.safetensors.index.json` + `*-00001-of-00002.safetensors`). safetensors is preferred when both exist.

Which weights file is chosen, given a folder's file names (`choose_weights`), is also what the hub download
fetches, so a hub snapshot holds exactly what the conversion reads.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_sd.components import kind_of
from mlx_sd.tokenizer import CLIPTokenizer

from .diffusers import RULES, clip_config, unet_config, vae_config
from .families import scheduler_config
from .keymap import ComponentPlan, ConversionError, tensor_shapes
from .kind import detect_kind
from .ldm_detect import (
    CERTAIN,
    CONTEXT_FAMILY,
    HIGH,
    LOW,
    MEDIUM,
    OVERRIDE,
    Detection,
    Finding,
    normalize_prediction_type,
    overridden,
)
from .plan import ModelPlan, SourceFiles, VAESource, stored_dtype
from .readers import Checkpoint, TensorInfo, open_checkpoint

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# Weight file stems: diffusers models, then transformers models (safetensors name, .bin name).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
WEIGHT_FORMATS = (".safetensors", ".bin")  # in order of preference: safetensors never runs a pickle
# The components converted, per folder name -> what their config translates to; tokenizers and the scheduler are
# read as configs; anything else in model_index.json (safety_checker, feature_extractor, ...) is not needed.
CONVERTED = ("unet", "vae", "text_encoder", "text_encoder_2")
READ_AS_CONFIG = ("tokenizer", "tokenizer_2", "tokenizer_3", "scheduler")  # tokenizer_3: SD3's T5 (sd3_folder.py)


# --- which weights file -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightChoice:
    """The weights of one component: a single file, or an index json and its shards (`files` has all of them)."""

    files: tuple[str, ...]
    index: str | None
    variant: str | None


def _with_variant(name: str, variant: str | None) -> str:
    """diffusers/transformers' `_add_variant`: the variant goes before the last suffix."""
    if not variant:
        return name
    head, _, last = name.rpartition(".")
    return f"{head}.{variant}.{last}"


def _choose(names: Collection[str], variant: str | None) -> WeightChoice | None:
    for ext in WEIGHT_FORMATS:
        for stem in WEIGHT_STEMS:
            single = _with_variant(f"{stem}{ext}", variant)
            if single in names:
                return WeightChoice((single,), None, variant)
            index = _with_variant(f"{stem}{ext}.index.json", variant)
            if index in names:
                base = re.escape(_with_variant(f"{stem}{ext}", variant).removesuffix(ext))
                shards = sorted(n for n in names if re.fullmatch(rf"{base}-\d+-of-\d+{re.escape(ext)}", n))
                return WeightChoice((index, *shards), index, variant)
    return None


def available_variants(names: Collection[str]) -> list[str]:
    stems = "|".join(WEIGHT_STEMS)
    found = set()
    for name in names:
        match = re.fullmatch(
            rf"(?:{stems})\.(\w+)\.(?:safetensors|bin)"
            rf"|(?:{stems})\.(?:safetensors|bin)\.index\.(\w+)\.json",
            name,
        )
        if match:
            found.add(match[1] or match[2])
    return sorted(found)


def choose_weights(names: Collection[str], variant: str | None, where: str) -> WeightChoice:
    """Pick a component's weights among the file names of its folder.

    Args:
        names: the folder's file names.
        variant: e.g. "fp16"; None prefers the plain files and takes the only variant when there are none.
        where: the folder, for messages.
    Returns:
        the chosen files; a requested variant that this component lacks falls back to the plain files (as the
        published folders do for components without an fp16 copy).
    Raises:
        ConversionError when there is nothing to choose, or several variants and none requested.
    """
    choice = _choose(names, variant)
    if choice is None and variant is not None:
        choice = _choose(names, None)
    if choice is None and variant is None:
        variants = available_variants(names)
        if len(variants) == 1:
            choice = _choose(names, variants[0])
        elif variants:
            raise ConversionError(f"{where}: weights exist only as variants {variants}; pass variant= (--variant)")
    if choice is None:
        wanted = ", ".join(f"{s}{e}" for e in WEIGHT_FORMATS for s in WEIGHT_STEMS)
        listed = ", ".join(sorted(names)[:12]) or "nothing"
        raise ConversionError(f"{where}: no weights found (looked for {wanted}; the folder holds {listed})")
    return choice


# --- opening them -----------------------------------------------------------------------------------------


class ShardedCheckpoint(Mapping):
    """Several checkpoint files read as one, as their index json maps keys to shards (strictly)."""

    def __init__(self, index: Path, shards: dict[str, Checkpoint]):
        self.path = index
        self._where: dict[str, Checkpoint] = {}
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ConversionError(f"{index}: not a readable weights index ({error})") from None
        listed = {name: sorted(k for k, v in weight_map.items() if v == name) for name in set(weight_map.values())}
        for name, keys in listed.items():
            if name not in shards:
                raise ConversionError(f"{index}: names a shard {name} that is not in the folder")
            absent = sorted(set(keys) - set(shards[name]))
            extra = sorted(set(shards[name]) - set(keys))
            if absent or extra:
                raise ConversionError(
                    f"{index}: shard {name} does not match the index ({len(absent)} listed tensors absent, "
                    f"e.g. {absent[:3]}; {len(extra)} unlisted tensors, e.g. {extra[:3]}); the download is incomplete"
                )
            self._where.update({key: shards[name] for key in keys})
        self.metadata: dict[str, str] = {}

    def info(self, key: str) -> TensorInfo:
        return self._where[key].info(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def open_weights(folder: Path, variant: str | None) -> tuple[Checkpoint | ShardedCheckpoint, WeightChoice]:
    """A component folder's weights, opened lazily (only headers and pickles are read)."""
    names = [p.name for p in folder.iterdir() if p.is_file()] if folder.is_dir() else []
    choice = choose_weights(names, variant, str(folder))
    if choice.index is None:
        return open_checkpoint(folder / choice.files[0]), choice
    shards = {name: open_checkpoint(folder / name) for name in choice.files[1:]}
    return ShardedCheckpoint(folder / choice.index, shards), choice


def open_component(root: Path, name: str, variant: str | None) -> tuple[dict, Mapping, WeightChoice, list[str]]:
    """A component folder: its config.json, its weights (lazily) and the weights choice, and the files read
    (relative to `root`, for the manifest)."""
    config = read_json(root / name / CONFIG)
    weights, choice = open_weights(root / name, variant)
    return config, weights, choice, [f"{name}/{CONFIG}", *(f"{name}/{f}" for f in choice.files)]


def read_tokenizer(root: Path, name: str, reader):
    """A tokenizer folder read by `reader` (e.g. CLIPTokenizer.from_folder): the tokenizer and the files it holds
    (relative to `root`, for the manifest)."""
    try:
        tokenizer = reader(root / name)
    except (OSError, ValueError, ImportError) as error:
        raise ConversionError(f"{root / name}: {error}") from None
    return tokenizer, sorted(f"{name}/{p.name}" for p in (root / name).iterdir() if p.is_file())


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing; the model folder is incomplete") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data


def _component(name: str, config, weights) -> ComponentPlan:
    shapes = tensor_shapes(weights)
    return ComponentPlan(name, "", config, weights, RULES[kind_of(config)], shapes=shapes)


# --- the whole folder -------------------------------------------------------------------------------------


def plan_diffusers_folder(
    root: Path,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    variant: str | None = None,
    kind: str | None = None,
    name: str | None = None,
) -> ModelPlan:
    """Read a diffusers model folder's configs and open its weights lazily.

    Args:
        root: the folder holding model_index.json.
        family: "sd1", "sd2", "sdxl" or "sdxl-refiner" to override what the configs say.
        prediction_type: override the scheduler config's prediction type.
        variant: weights variant, e.g. "fp16".
        kind: "standard", "turbo" or "lcm" to override what convert/kind.py finds.
        name: the model's name (default: the folder's), e.g. a hub repo id; also kind evidence.
    Returns:
        the model's plan.
    Raises:
        ConversionError for a missing component, unreadable config or weights, or an unsupported architecture.
    """
    if family == "sd3":
        raise ConversionError(f"{root}: family sd3 needs an SD3 folder (StableDiffusion3Pipeline); drop --family")
    index = read_json(root / MODEL_INDEX)
    present = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v and v[0]}
    # SD 1.x/2.x and SDXL base have text_encoder; the SDXL refiner has only text_encoder_2.
    text = "text_encoder" if "text_encoder" in present or "text_encoder_2" not in present else "text_encoder_2"
    tokenizer = text.replace("text_encoder", "tokenizer")
    needed = [c for c in ("unet", "vae", text, tokenizer) if c not in present]
    if needed:
        raise ConversionError(
            f"{root / MODEL_INDEX} lists no {', '.join(needed)}: not a Stable Diffusion text-to-image folder "
            f"({index.get('_class_name', 'unknown pipeline')})"
        )
    files = [MODEL_INDEX]
    model_name = name or root.resolve().name
    unet_cfg = read_json(root / "unet" / CONFIG)
    text_cfg = read_json(root / text / CONFIG)
    found_family = overridden(family, _family(present, unet_cfg, text_cfg))
    components, choices = {}, {}
    for name in (c for c in CONVERTED if c in present):
        config, weights, choices[name], read = open_component(root, name, variant)
        files += read
        if name == "unet":
            translated = unet_config(config)
        elif name == "vae":
            translated = vae_config(config)
        else:
            projection = "CLIPTextModelWithProjection" in (config.get("architectures") or [])
            translated = clip_config(config, with_projection=projection)
        components[name] = _component(name, translated, weights)
    tokenizers = {}
    for name in (c for c in ("tokenizer", "tokenizer_2") if c in present):
        tokenizers[name], read = read_tokenizer(root, name, CLIPTokenizer.from_folder)
        files += read
    scheduler_path = root / "scheduler" / SCHEDULER_CONFIG
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else None
    if scheduler is not None:
        files.append(f"scheduler/{SCHEDULER_CONFIG}")
    prediction = _prediction_type(scheduler, prediction_type)
    if scheduler is None:
        scheduler = scheduler_config(found_family.value, prediction.value)
    scheduler = {**scheduler, "prediction_type": prediction.value}
    detection = Detection(
        family=found_family,
        text_encoder=_text_finding(text, text_cfg),
        in_channels=Finding(unet_cfg.get("in_channels", 4), CERTAIN, "unet/config.json in_channels"),
        ema=Finding(False, CERTAIN, "a diffusers folder holds one set of UNet weights"),
        dtype=dtype_finding(components["unet"].source, choices["unet"]),
        prediction_type=prediction,
        kind=detect_kind(
            model_name, override=kind, scheduler=scheduler, time_cond_proj_dim=unet_cfg.get("time_cond_proj_dim")
        ),
        **_sdxl_flags(found_family.value, index, components),
    )
    used = sorted({c.variant for c in choices.values() if c.variant})
    details = {"format": "diffusers", "variant": ",".join(used) or None}
    return ModelPlan(
        name=model_name,
        kind="diffusers",
        detection=detection,
        components=components,
        tokenizers=tokenizers,
        scheduler=scheduler,
        files=SourceFiles(root, tuple(files)),
        details=details,
    )


def _family(present: set[str], unet: dict, text: dict) -> Finding:
    """SDXL (base or refiner) from its components; else SD1 or SD2 from the configs (as the single-file detection
    votes): cross-attention width, the text encoder's activation (OpenAI CLIP: quick_gelu; OpenCLIP: gelu) and the
    UNet's projections."""
    if "text_encoder_2" in present or unet.get("addition_embed_type") == "text_time":
        if "text_encoder" not in present:
            return Finding("sdxl-refiner", CERTAIN, "text_encoder_2 without text_encoder: an SDXL refiner folder")
        return Finding("sdxl", CERTAIN, "text_encoder_2 / the UNet's text-time embedding: an SDXL folder")
    votes = []
    width = unet.get("cross_attention_dim", 1280)
    if width in CONTEXT_FAMILY:
        votes.append((CONTEXT_FAMILY[width], f"cross_attention_dim {width}"))
    act = text.get("hidden_act", "quick_gelu")
    votes.append(("sd2", "OpenCLIP text encoder (gelu)") if act == "gelu" else ("sd1", f"OpenAI CLIP ({act})"))
    linear = unet.get("use_linear_projection", False)
    votes.append(("sd2", "linear proj_in") if linear else ("sd1", "1x1-conv proj_in"))
    evidence = ", ".join(e for _, e in votes)
    if len({f for f, _ in votes}) > 1:
        return Finding(votes[0][0], LOW, f"conflicting evidence: {evidence}")
    return Finding(votes[0][0], CERTAIN if width in CONTEXT_FAMILY else MEDIUM, evidence)


def _prediction_type(scheduler: dict | None, override: str | None) -> Finding:
    if override is not None:
        return Finding(normalize_prediction_type(override), OVERRIDE, "set by the caller")
    if scheduler is None:
        return Finding("epsilon", LOW, "no scheduler/scheduler_config.json; diffusers' default is epsilon")
    value = scheduler.get("prediction_type")
    if value is None:
        return Finding("epsilon", HIGH, "scheduler_config.json has no prediction_type; diffusers' default is epsilon")
    try:
        return Finding(normalize_prediction_type(value), CERTAIN, f"scheduler_config.json prediction_type={value!r}")
    except ValueError:
        raise ConversionError(f"scheduler_config.json: prediction_type {value!r} is not supported") from None


def _text_finding(folder: str, text: dict) -> Finding:
    arch = (text.get("architectures") or ["CLIPTextModel"])[0]
    layers, width = text.get("num_hidden_layers"), text.get("hidden_size")
    return Finding("transformers", CERTAIN, f"{folder}/config.json: {arch}, {layers} layers, width {width}")


# The diffusers SDXL pipelines' constructor defaults, which apply when model_index.json does not set the flag.
_SDXL_FLAG_DEFAULTS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
_TIME_IDS = {False: 6, True: 5}  # (original size, crop, target size) or (original size, crop, aesthetic score)


def _sdxl_flags(family: str, index: dict, components: dict) -> dict[str, Finding]:
    """SDXL's pipeline flags from model_index.json (else the diffusers defaults, or for the aesthetic score what
    the UNet's added embedding is wide enough for), checked against the UNet."""
    if not family.startswith("sdxl"):
        return {}
    unet, text = components["unet"].config, components.get("text_encoder_2")
    flags = {}
    for flag, default in _SDXL_FLAG_DEFAULTS.items():
        if isinstance(index.get(flag), bool):
            flags[flag] = Finding(index[flag], CERTAIN, f"{MODEL_INDEX} {flag}={str(index[flag]).lower()}")
        else:
            flags[flag] = Finding(default, HIGH, f"not in {MODEL_INDEX}; the diffusers SDXL pipelines' default")
    if text is None or text.config.projection_dim is None or unet.addition_time_embed_dim is None:
        raise ConversionError("an SDXL folder needs text_encoder_2 with a projection (CLIPTextModelWithProjection) "
                              "and a UNet with addition_embed_type='text_time'")  # fmt: skip
    pooled, width = text.config.projection_dim, unet.addition_time_embed_dim
    numbers = (unet.projection_class_embeddings_input_dim - pooled) / width
    if numbers not in _TIME_IDS.values():
        raise ConversionError(
            f"unet: projection_class_embeddings_input_dim={unet.projection_class_embeddings_input_dim} is neither "
            f"{pooled} + 6 x {width} (SDXL base) nor {pooled} + 5 x {width} (refiner); the configs disagree"
        )
    aesthetic = numbers == _TIME_IDS[True]
    found = flags["requires_aesthetics_score"]
    if found.confidence != CERTAIN:
        why = f"the UNet's added embedding takes {int(numbers)} micro-conditioning numbers"
        flags["requires_aesthetics_score"] = Finding(aesthetic, HIGH, why)
    elif found.value != aesthetic:
        raise ConversionError(
            f"{MODEL_INDEX} says requires_aesthetics_score={str(found.value).lower()} but the UNet's added embedding "
            f"takes {int(numbers)} micro-conditioning numbers ({'5 with' if aesthetic else '6 without'} an aesthetic "
            "score); the folder is inconsistent"
        )
    return flags


def dtype_finding(weights, choice: WeightChoice, folder: str = "unet") -> Finding:
    """How the denoiser's weights (`folder`) are stored, e.g. float16."""
    counts = Counter(weights.info(k).dtype for k in weights)
    spelled = ", ".join(f"{n} {d}" for d, n in counts.most_common())
    return Finding(stored_dtype(weights), CERTAIN, f"{folder}/{choice.files[0]}: {spelled}")


# --- a separately published VAE folder (--vae) ------------------------------------------------------------


def plan_vae_folder(folder: Path, variant: str | None = None) -> VAESource:
    """A diffusers AutoencoderKL folder (config.json + weights), or a model folder whose vae/ is taken."""
    root = folder
    if (folder / MODEL_INDEX).is_file():
        folder = folder / "vae"
    config = read_json(folder / CONFIG)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConversionError(f"{folder / CONFIG}: a {config['_class_name']}, not an AutoencoderKL (VAE)")
    weights, choice = open_weights(folder, variant)
    plan = _component("vae", vae_config(config), weights)
    names = tuple(str((folder / n).relative_to(root)) for n in (CONFIG, *choice.files))
    finding = Finding(root.resolve().name, OVERRIDE, f"diffusers VAE folder {folder}")
    return VAESource(root.resolve().name, plan, SourceFiles(root, names), finding, stored_dtype(weights))
