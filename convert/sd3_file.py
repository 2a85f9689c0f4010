"""Stability's SD3 / SD3.5 single files -> a `ModelPlan`.

    model.diffusion_model.*                               the MMDiT (convert/sd3.py)       -> transformer/
    first_stage_model.*                                   the 16-channel autoencoder (ldm layout, no quant convs,
                                                          convert/ldm_vae.py)              -> vae/
    text_encoders.clip_l.transformer.text_model.*         CLIP-L as transformers saves it  -> text_encoder/
    text_encoders.clip_g.transformer.text_model.*         bigG, transformers layout too,
    text_encoders.clip_g.transformer.text_projection.*    with its projection              -> text_encoder_2/
    text_encoders.t5xxl.transformer.shared|encoder.*      the T5 v1.1 XXL encoder (optional) -> text_encoder_3/

The published files differ in what they hold: sd3_medium_incl_clips*.safetensors carry the CLIP towers (and T5 in
the *_t5xxl* files, fp8 in one), sd3_medium.safetensors and the SD3.5 files only the MMDiT and the autoencoder.
Text encoders published as files of their own (the repos' text_encoders/clip_l, clip_g, t5xxl_fp16.safetensors)
complete them or replace the file's: passed by the caller, or found where Stability's repos and UIs keep them
(convert/sd3_text.py: the towers, the files and where they are looked for).

The tokenizers are not in the files: the CLIP ones are the bundled vocabulary, padded as SD3's folders pad (CLIP-L
with eos, bigG with "!" = id 0) and cleaned as transformers does (SD3's reference code tokenizes with transformers);
T5's comes from the hub (google/t5-v1_1-xxl's spiece.model, which is what SD3's tokenizer_3 holds), cached as any
hub download.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from mlx_sd.t5_tokenizer import SPIECE_FILE, T5Tokenizer
from mlx_sd.tokenizer import CLIPTokenizer

from .families import SD3_REPOS, T5_TOWER, TEXT_TOWERS, family_config, scheduler_config
from .hub import fetch_file
from .keymap import ComponentPlan, ConversionError, rename
from .kind import detect_kind
from .ldm import TOP_LEVEL_DROPS, KeyView, plan_component, strip_prefix
from .ldm_detect import CERTAIN, FLOW, VAE_PREFIX, Detection, Finding
from .ldm_vae import vae_config_from_shapes, vae_rules
from .plan import ModelPlan, SourceFiles
from .readers import Checkpoint
from .sd3 import (
    PREFIX,
    check_overrides,
    mmdit_config_from_checkpoint,
    mmdit_prefix,
    mmdit_rules,
    release,
    release_evidence,
)
from .sd3_text import (
    CLIP_G_PREFIX,
    CLIP_L_PREFIX,
    IDENTITY,
    PLACES,
    T5_PREFIX,
    TOWER_NAMES,
    TowerFile,
    clip_g,
    clip_l,
    discover_text_encoders,
    open_text_encoders,
    relative_name,
    t5,
)

# SD3's tokenizer_3 is T5 v1.1's SentencePiece model; this repo publishes it ungated (the SD3 repos are gated).
T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
# SD3's reference code tokenizes CLIP prompts with transformers' CLIPTokenizer (mlx_sd/tokenizer.py "hf").
SD3_NORMALIZATION = "hf"
# The towers a single file may hold: component folder -> (key prefix, plan builder).
_TOWERS = {
    "text_encoder": (CLIP_L_PREFIX, clip_l),
    "text_encoder_2": (CLIP_G_PREFIX, clip_g),
    T5_TOWER[0]: (T5_PREFIX, t5),
}
_CLIPS = ("text_encoder", "text_encoder_2")


def plan_sd3_file(
    path: Path,
    checkpoint: Checkpoint,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    kind: str | None = None,
    text_encoders: Sequence[Path] | None = None,
) -> ModelPlan:
    """Plan the conversion of an SD3 / SD3.5 single file (nothing but headers are read; the T5 tokenizer may be
    fetched from the hub when the model has T5).

    Args:
        path: the file; checkpoint: it, opened; shapes, dtypes: key -> shape / dtype name of every tensor.
        family, prediction_type, kind: overrides; only "sd3", "flow" and standard/turbo make sense (else refused).
        text_encoders: files of CLIP-L, bigG and/or T5 (convert/sd3_text.py), taking the place of the file's own
            towers; None: the file's, and when it has no CLIP towers, the published files found near it.
    Raises:
        ConversionError for a file that is not a whole SD3 model (no CLIP towers in or beside it), tensors that
        belong to no component, text encoders that do not fit the MMDiT, or a T5 tokenizer that cannot be had
        offline.
    """
    check_overrides(family, prediction_type, kind, str(path))
    if mmdit_prefix(shapes) != PREFIX:
        raise ConversionError(
            f"{path}: an SD3 MMDiT alone (its keys have no {PREFIX} prefix; no autoencoder or text encoders); "
            "convert the model's diffusers folder instead, e.g. mlx-sd convert "
            f"{SD3_REPOS['sd3.5-large']} OUT"
        )
    transformer = _transformer(checkpoint, shapes)
    components = {"transformer": transformer}
    vae_keys = strip_prefix(shapes, VAE_PREFIX)
    if vae_keys:
        components["vae"] = _vae(checkpoint, shapes, vae_keys)
    for slot, (prefix, build) in _TOWERS.items():
        if any(k.startswith(prefix) for k in shapes):
            components[slot] = build(checkpoint, shapes)
    _check_everything_claimed(shapes, components)
    if text_encoders is None and not all(slot in components for slot in _CLIPS):
        text_encoders = discover_text_encoders(path)
    known = {slot: components[slot].config.hidden_size for slot in _CLIPS if slot in components}
    separate = open_text_encoders(text_encoders or [], known)
    components.update({slot: tower.plan for slot, tower in separate.items()})
    missing = [slot for slot in _CLIPS if slot not in components]
    if missing:
        raise ConversionError(_no_clips(path, missing, release(transformer.config), text_encoders))
    _check_towers(components, separate)

    with_t5 = T5_TOWER[0] in components
    tokenizers = {
        tokenizer: CLIPTokenizer.bundled(pad_token_id=pad, normalization=SD3_NORMALIZATION)
        for _, tokenizer, pad in TEXT_TOWERS["sd3"]
    }
    if with_t5:
        tokenizers[T5_TOWER[1]] = _t5_tokenizer()
    counts = Counter(dtypes[PREFIX + k] for k in transformer.source).most_common()
    where = {slot: _where(slot, path, separate) for slot in _TOWERS}
    t5_finding = (
        Finding(True, CERTAIN, f"{where[T5_TOWER[0]]} (tokenizer: {T5_TOKENIZER_REPO}/{SPIECE_FILE})")
        if with_t5
        else Finding(False, CERTAIN, f"no {T5_PREFIX}* tensors or T5 file: SD3 conditions on zeros in T5's place")
    )
    detection = Detection(
        family=Finding("sd3", CERTAIN, f"{PREFIX}joint_blocks.* (an MMDiT): {release_evidence(transformer.config)}"),
        text_encoder=Finding("sd3", CERTAIN, "; ".join(f"{TOWER_NAMES[s]}: {where[s]}" for s in _CLIPS)),
        in_channels=Finding(transformer.config.in_channels, CERTAIN, "x_embedder.proj takes that many channels"),
        ema=Finding(False, CERTAIN, "SD3 files hold one set of MMDiT weights"),
        dtype=Finding(counts[0][0], CERTAIN, "MMDiT tensors: " + ", ".join(f"{n} {d}" for d, n in counts)),
        prediction_type=Finding(FLOW, CERTAIN, "SD3 / SD3.5 are rectified-flow models"),
        kind=detect_kind(path.stem, override=kind, metadata=checkpoint.metadata),
        text_encoder_3=t5_finding,
    )
    names = {slot: relative_name(tower.path, path.parent) for slot, tower in separate.items()}
    details = {"format": checkpoint.format} | ({"text_encoders": names} if names else {})
    return ModelPlan(
        name=path.stem,
        kind="single-file",
        detection=detection,
        components=components,
        tokenizers=tokenizers,
        scheduler=scheduler_config("sd3", FLOW),
        files=SourceFiles(path.parent, (path.name, *names.values())),
        details=details,
    )


def _where(slot: str, path: Path, separate: dict[str, TowerFile]) -> str:
    if slot in separate:
        return f"{relative_name(separate[slot].path, path.parent)} (a file of its own)"
    return f"{_TOWERS[slot][0]}* (transformers layout)"


def _no_clips(path: Path, missing: list[str], name: str | None, given) -> str:
    repo = SD3_REPOS.get(name or "", SD3_REPOS["sd3.5-large"])
    lacking = " and ".join(TOWER_NAMES[slot] for slot in missing)
    where = (
        "among the text encoder files passed"
        if given
        else f"in the file, nor as clip_l/clip_g.safetensors in {', '.join(p + '/' for p in PLACES)} beside it"
    )
    return (
        f"{path}: no {lacking} {where}: the file holds the MMDiT and the autoencoder but not SD3's CLIP text "
        f"encoders (as sd3.5_large.safetensors and sd3_medium.safetensors are published); pass them: mlx-sd convert "
        f"{path.name} OUT --text-encoder clip_l.safetensors --text-encoder clip_g.safetensors [--text-encoder "
        f"t5xxl_fp16.safetensors] (text_encoders/ of {repo}), or convert the diffusers folder (mlx-sd convert {repo} "
        "OUT)"
    )


def _check_towers(components: dict[str, ComponentPlan], separate: dict[str, TowerFile]) -> None:
    """The text towers must give the MMDiT what it takes: pooled CLIP-L + bigG, and T5's width (the CLIP states are
    padded to it)."""
    config = components["transformer"].config
    large, big = components["text_encoder"].config, components["text_encoder_2"].config
    pooled = large.projection_dim + big.projection_dim
    if pooled != config.pooled_projection_dim:
        raise ConversionError(
            f"the CLIP towers ({_named('text_encoder', separate)}, {_named('text_encoder_2', separate)}) pool "
            f"{large.projection_dim} + {big.projection_dim} = {pooled} values, but this MMDiT takes "
            f"{config.pooled_projection_dim}: they are not its text encoders"
        )
    width = large.hidden_size + big.hidden_size
    t5_config = components[T5_TOWER[0]].config if T5_TOWER[0] in components else None
    if width > config.joint_attention_dim or (t5_config and t5_config.d_model != config.joint_attention_dim):
        t5_width = f", T5 {t5_config.d_model}" if t5_config else ""
        raise ConversionError(
            f"the text towers' widths (CLIP {large.hidden_size} + {big.hidden_size}{t5_width}) do not fit this "
            f"MMDiT's {config.joint_attention_dim}-wide text tokens: they are not its text encoders"
        )


def _named(slot: str, separate: dict[str, TowerFile]) -> str:
    return f"{TOWER_NAMES[slot]} " + (str(separate[slot].path.name) if slot in separate else "of the file")


def _transformer(checkpoint, shapes) -> ComponentPlan:
    keys = strip_prefix(shapes, PREFIX)
    config = mmdit_config_from_checkpoint({k: shapes[v] for k, v in keys.items()})
    return plan_component("transformer", PREFIX, config, KeyView(checkpoint, keys, shapes), mmdit_rules(config))


def _vae(checkpoint, shapes, keys: dict[str, str]) -> ComponentPlan:
    """SD3's autoencoder: the ldm layout; its latent scale and shift (not in the file) from the published config."""
    published = family_config("sd3", "vae")
    config = vae_config_from_shapes({k: shapes[v] for k, v in keys.items()}, published["scaling_factor"])
    config = replace(config, shift_factor=published["shift_factor"])
    if config.latent_channels != published["latent_channels"]:
        raise ConversionError(
            f"vae ({VAE_PREFIX}*): {config.latent_channels} latent channels; SD3's autoencoder has "
            f"{published['latent_channels']} (is an SD 1.x/XL autoencoder stored in this file?)"
        )
    return plan_component("vae", VAE_PREFIX, config, KeyView(checkpoint, keys, shapes), vae_rules(config))


def _t5_tokenizer() -> T5Tokenizer:
    path = fetch_file(T5_TOKENIZER_REPO, SPIECE_FILE, "the T5 tokenizer of the file's text_encoders.t5xxl")
    try:
        return T5Tokenizer.from_spiece(path)
    except (OSError, ValueError, ImportError) as error:
        raise ConversionError(f"{path}: {error}") from None


def _check_everything_claimed(shapes: Mapping, components: dict[str, ComponentPlan]) -> None:
    claimed = {plan.prefix + k for plan in components.values() for k in plan.source if k != IDENTITY}
    stray = sorted(k for k in shapes if k not in claimed and rename(k, TOP_LEVEL_DROPS) is None)
    if stray:
        shown = ", ".join(stray[:8]) + (f" and {len(stray) - 8} more" if len(stray) > 8 else "")
        raise ConversionError(
            f"{len(stray)} tensors belong to no SD3 component ({shown}); the file may be damaged, or hold a part "
            "mlx-sd does not convert"
        )
