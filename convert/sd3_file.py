"""Stability's SD3 / SD3.5 single files -> a `ModelPlan`.

    model.diffusion_model.*                               the MMDiT (convert/sd3.py)       -> transformer/
    first_stage_model.*                                   the 16-channel autoencoder (ldm layout, no quant convs,
                                                          convert/ldm_vae.py)              -> vae/
    text_encoders.clip_l.transformer.text_model.*         CLIP-L as transformers saves it  -> text_encoder/
    text_encoders.clip_g.transformer.text_model.*         bigG, transformers layout too,
    text_encoders.clip_g.transformer.text_projection.*    with its projection              -> text_encoder_2/
    text_encoders.t5xxl.transformer.shared|encoder.*      the T5 v1.1 XXL encoder (optional) -> text_encoder_3/

The published files differ in what they hold: sd3_medium_incl_clips*.safetensors carry the CLIP towers (and T5 in
the *_t5xxl* files), sd3_medium.safetensors and sd3.5_large.safetensors only the MMDiT and the autoencoder; those
cannot become a model on their own and are refused with the diffusers folder to convert instead.

SD3 pools CLIP-L without its projection (Stability's sd3_infer.py and ComfyUI: return_projected_pooled=False);
diffusers' single-file loader gives that tower an identity `text_projection` so that its CLIPTextModelWithProjection
computes the same thing. So does this converter (a projection stored in the file is dropped, for that reason), which
makes the converted folder look like a diffusers folder's. The tokenizers are not in the files: the CLIP ones are
the bundled vocabulary, padded as SD3's folders pad (CLIP-L with eos, bigG with "!" = id 0) and cleaned as
transformers does (SD3's reference code tokenizes with transformers); T5's comes from the hub
(google/t5-v1_1-xxl's spiece.model, which is what SD3's tokenizer_3 holds), cached as any hub download.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from mlx_sd.t5_tokenizer import SPIECE_FILE, T5Tokenizer
from mlx_sd.tokenizer import CLIPTokenizer

from .diffusers import CLIP_RULES, t5_rules
from .families import SD3_REPOS, T5_TOWER, TEXT_TOWERS, family_config, scheduler_config
from .hub import fetch_file
from .keymap import ComponentPlan, ConversionError, Rule, rename
from .kind import detect_kind
from .ldm import TOP_LEVEL_DROPS, KeyView, clip_config_from_shapes, plan_component, strip_prefix
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

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
# SD3's tokenizer_3 is T5 v1.1's SentencePiece model; this repo publishes it ungated (the SD3 repos are gated).
T5_TOKENIZER_REPO = "google/t5-v1_1-xxl"
# SD3's reference code tokenizes CLIP prompts with transformers' CLIPTokenizer (mlx_sd/tokenizer.py "hf").
SD3_NORMALIZATION = "hf"
_IDENTITY = "<identity>"  # the stand-in key of CLIP-L's identity projection (not a tensor of the file)
_CLIP_L_PROJECTION = Rule(
    r"text_projection\.weight",
    None,
    "SD3 pools CLIP-L without its projection (sd3_infer.py, ComfyUI); an identity projection is written instead, "
    "as diffusers' single-file loader does",
)


def plan_sd3_file(
    path: Path,
    checkpoint: Checkpoint,
    shapes: Mapping[str, tuple[int, ...]],
    dtypes: Mapping[str, str],
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    kind: str | None = None,
) -> ModelPlan:
    """Plan the conversion of an SD3 / SD3.5 single file (nothing but the header is read; the T5 tokenizer may be
    fetched from the hub when the file holds T5).

    Args:
        path: the file; checkpoint: it, opened; shapes, dtypes: key -> shape / dtype name of every tensor.
        family, prediction_type, kind: overrides; only "sd3", "flow" and standard/turbo make sense (else refused).
    Raises:
        ConversionError for a file that is not a whole SD3 model, tensors that belong to no component, or a T5
        tokenizer that cannot be had offline.
    """
    check_overrides(family, prediction_type, kind, str(path))
    if mmdit_prefix(shapes) != PREFIX:
        raise ConversionError(
            f"{path}: an SD3 MMDiT alone (its keys have no {PREFIX} prefix; no autoencoder or text encoders); "
            "convert the model's diffusers folder instead, e.g. mlx-sd convert "
            f"{SD3_REPOS['sd3.5-large']} OUT"
        )
    transformer = _transformer(checkpoint, shapes)
    name = release(transformer.config)
    missing = [p for p in (CLIP_L_PREFIX, CLIP_G_PREFIX) if not any(k.startswith(p) for k in shapes)]
    if missing:
        repo = SD3_REPOS.get(name or "", SD3_REPOS["sd3.5-large"])
        raise ConversionError(
            f"{path}: no {' or '.join(p + '*' for p in missing)}: the file holds the MMDiT and the autoencoder but not "
            f"SD3's CLIP text encoders (as sd3_medium.safetensors and sd3.5_large.safetensors are published); "
            f"convert the diffusers folder instead (mlx-sd convert {repo} OUT), or the file that includes them "
            "(sd3_medium_incl_clips*.safetensors)"
        )
    components = {"transformer": transformer}
    vae_keys = strip_prefix(shapes, VAE_PREFIX)
    if vae_keys:
        components["vae"] = _vae(checkpoint, shapes, vae_keys)
    components["text_encoder"] = _clip_l(checkpoint, shapes)
    components["text_encoder_2"] = _clip_g(checkpoint, shapes)
    with_t5 = any(k.startswith(T5_PREFIX) for k in shapes)
    if with_t5:
        components[T5_TOWER[0]] = _t5(checkpoint, shapes)
    _check_everything_claimed(shapes, components)

    tokenizers = {
        tokenizer: CLIPTokenizer.bundled(pad_token_id=pad, normalization=SD3_NORMALIZATION)
        for _, tokenizer, pad in TEXT_TOWERS["sd3"]
    }
    if with_t5:
        tokenizers[T5_TOWER[1]] = _t5_tokenizer()
    counts = Counter(dtypes[PREFIX + k] for k in transformer.source).most_common()
    t5_finding = (
        Finding(True, CERTAIN, f"{T5_PREFIX}* tensors (tokenizer: {T5_TOKENIZER_REPO}/{SPIECE_FILE})")
        if with_t5
        else Finding(False, CERTAIN, f"no {T5_PREFIX}* tensors: SD3 conditions on zeros in T5's place")
    )
    detection = Detection(
        family=Finding("sd3", CERTAIN, f"{PREFIX}joint_blocks.* (an MMDiT): {release_evidence(transformer.config)}"),
        text_encoder=Finding("sd3", CERTAIN, f"{CLIP_L_PREFIX}* and {CLIP_G_PREFIX}* (transformers layout)"),
        in_channels=Finding(transformer.config.in_channels, CERTAIN, "x_embedder.proj takes that many channels"),
        ema=Finding(False, CERTAIN, "SD3 files hold one set of MMDiT weights"),
        dtype=Finding(counts[0][0], CERTAIN, "MMDiT tensors: " + ", ".join(f"{n} {d}" for d, n in counts)),
        prediction_type=Finding(FLOW, CERTAIN, "SD3 / SD3.5 are rectified-flow models"),
        kind=detect_kind(path.stem, override=kind, metadata=checkpoint.metadata),
        text_encoder_3=t5_finding,
    )
    return ModelPlan(
        name=path.stem,
        kind="single-file",
        detection=detection,
        components=components,
        tokenizers=tokenizers,
        scheduler=scheduler_config("sd3", FLOW),
        files=SourceFiles(path.parent, (path.name,)),
        details={"format": checkpoint.format},
    )


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


class _WithIdentity(Mapping):
    """A tower's tensors plus one identity matrix under `_IDENTITY` (CLIP-L's projection, see the module docstring)."""

    def __init__(self, view: KeyView, size: int):
        self._view, self._size = view, size

    def __getitem__(self, key: str) -> np.ndarray:
        return np.eye(self._size, dtype=np.float32) if key == _IDENTITY else self._view[key]

    def __iter__(self) -> Iterator[str]:
        yield from self._view
        yield _IDENTITY

    def __len__(self) -> int:
        return len(self._view) + 1


def _clip_l(checkpoint, shapes) -> ComponentPlan:
    keys = strip_prefix(shapes, CLIP_L_PREFIX)
    relative = {k: shapes[v] for k, v in keys.items()}
    width = clip_config_from_shapes(relative).hidden_size
    config = replace(clip_config_from_shapes(relative), projection_dim=width)
    rules = [_CLIP_L_PROJECTION, Rule(_IDENTITY, "text_projection.weight"), *CLIP_RULES]
    source = _WithIdentity(KeyView(checkpoint, keys, shapes), width)
    shapes_with_identity = {**relative, _IDENTITY: (width, width)}
    return ComponentPlan("text_encoder", CLIP_L_PREFIX, config, source, rules, shapes=shapes_with_identity)


def _clip_g(checkpoint, shapes) -> ComponentPlan:
    keys = strip_prefix(shapes, CLIP_G_PREFIX)
    relative = {k: shapes[v] for k, v in keys.items()}
    if "text_projection.weight" not in relative:
        raise ConversionError(
            f"text_encoder_2 ({CLIP_G_PREFIX}*): no text_projection.weight; SD3's pooled text needs it"
        )
    projection = relative["text_projection.weight"][0]  # a Linear's (out, in)
    # OpenCLIP bigG (as SDXL's second tower): gelu, not OpenAI CLIP's quick_gelu.
    config = replace(clip_config_from_shapes(relative), hidden_act="gelu", projection_dim=projection)
    return plan_component("text_encoder_2", CLIP_G_PREFIX, config, KeyView(checkpoint, keys, shapes), CLIP_RULES)


def _t5(checkpoint, shapes) -> ComponentPlan:
    from mlx_sd.models import T5Config

    keys = strip_prefix(shapes, T5_PREFIX)
    relative = {k: shapes[v] for k, v in keys.items()}
    rules = t5_rules(relative)
    embedding = relative.get("shared.weight", relative.get("encoder.embed_tokens.weight"))
    bias = relative.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    query = relative.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if embedding is None or bias is None or query is None:
        raise ConversionError(
            f"text_encoder_3 ({T5_PREFIX}*): no shared.weight, relative_attention_bias or q.weight of block 0; the T5 "
            "encoder in this file is incomplete"
        )
    blocks = {int(k.split(".")[2]) for k in relative if k.startswith("encoder.block.")}
    buckets, heads = bias
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in relative
    ff = relative.get(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight", (0,))[0]
    published = family_config("sd3", "text_encoder_3")
    config = T5Config(
        vocab_size=embedding[0],
        d_model=embedding[1],
        d_kv=query[0] // heads,
        d_ff=ff,
        num_layers=len(blocks),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        # Not in the shapes: T5 v1.1's (SD3's) values.
        relative_attention_max_distance=published["relative_attention_max_distance"],
        layer_norm_epsilon=published["layer_norm_epsilon"],
        feed_forward_proj="gated-gelu" if gated else "relu",
    )
    return plan_component(T5_TOWER[0], T5_PREFIX, config, KeyView(checkpoint, keys, shapes), rules)


def _t5_tokenizer() -> T5Tokenizer:
    path = fetch_file(T5_TOKENIZER_REPO, SPIECE_FILE, "the T5 tokenizer of the file's text_encoders.t5xxl")
    try:
        return T5Tokenizer.from_spiece(path)
    except (OSError, ValueError, ImportError) as error:
        raise ConversionError(f"{path}: {error}") from None


def _check_everything_claimed(shapes: Mapping, components: dict[str, ComponentPlan]) -> None:
    claimed = {plan.prefix + k for plan in components.values() for k in plan.source if k != _IDENTITY}
    stray = sorted(k for k in shapes if k not in claimed and rename(k, TOP_LEVEL_DROPS) is None)
    if stray:
        shown = ", ".join(stray[:8]) + (f" and {len(stray) - 8} more" if len(stray) > 8 else "")
        raise ConversionError(
            f"{len(stray)} tensors belong to no SD3 component ({shown}); the file may be damaged, or hold a part "
            "mlx-sd does not convert"
        )
