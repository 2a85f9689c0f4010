"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word"): learned token embeddings used by name.

An embedding holds n vectors per text encoder. Loading it adds its name to each tower's tokenizer (ids after the
vocabulary, `name`, `name_1`, ... for n > 1, as diffusers' `load_textual_inversion` does) and appends the vectors
as rows of that tower's token-embedding matrix; a prompt that contains the name then encodes to those n ids.
Names match anywhere in the prompt, case-insensitively (transformers' added-token rule).

Which vectors go to which tower: SD1/SD2 models have one text encoder and take a single (n, D) tensor; SDXL takes
`clip_l` (n, 768) for its first encoder and `clip_g` (n, 1280) for its second (the refiner has only the second).
Reading the file formats (A1111 `.pt`/`.safetensors`, diffusers `learned_embeds`) is `mlx_sd_convert.embeddings`'s
job.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from .conditioning import PromptEncoder

SHORT_HASH = 12  # A1111's "TI hashes" records the first 12 hex digits of the file's sha256
# Which vectors of an embedding file each text encoder of a family takes ("" = the file's single tensor).
TOWER_KEYS = {"sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}
TOWER_KEYS["sdxl-refiner"] = TOWER_KEYS["sdxl"]


@dataclass(frozen=True, eq=False)
class Embedding:
    """A textual-inversion embedding.

    name: the word that invokes it in prompts (A1111: the file name without extension).
    vectors: "" -> (n, D) for single-encoder models, or "clip_l"/"clip_g" -> (n, D) for SDXL.
    sha256: of the file ("" if unknown); step: training step recorded in the file, if any.
    """

    name: str
    vectors: Mapping[str, mx.array] = field(repr=False)
    sha256: str = ""
    path: str = ""
    step: int | None = None

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHORT_HASH]

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.vectors.items()}


def _tower_vectors(embedding: Embedding, family: str, text: PromptEncoder) -> dict[str, mx.array]:
    """tower name -> (n, D) vectors for this model, or ValueError saying why the embedding does not fit it."""
    keys = TOWER_KEYS.get(family)
    out = {}
    for tower in text.towers:
        key = keys[tower.name] if keys else ""
        if key not in embedding.vectors:
            have = ", ".join(repr(k) if k else "one tensor" for k in embedding.vectors)
            need = f"{key!r} vectors" if key else "a single tensor"
            raise ValueError(f"embedding {embedding.name!r} has {have}; a {family} model needs {need}")
        width = tower.encoder.config.hidden_size
        vectors = embedding.vectors[key]
        if vectors.ndim != 2 or vectors.shape[1] != width:
            raise ValueError(
                f"embedding {embedding.name!r} has vectors of shape {tuple(vectors.shape)}; the {tower.name} of "
                f"this {family} model takes width {width} (the embedding was made for another model family)"
            )
        out[tower.name] = vectors
    counts = {v.shape[0] for v in out.values()}
    if len(counts) != 1:
        raise ValueError(f"embedding {embedding.name!r}: its towers have different vector counts {sorted(counts)}")
    return out


def _token_names(name: str, count: int) -> list[str]:
    return [name] + [f"{name}_{i}" for i in range(1, count)]


def check_embedding(embedding: Embedding, family: str, text: PromptEncoder) -> str | None:
    """Why `embedding` cannot be used with this model (family and text encoders), or None when it can."""
    try:
        _tower_vectors(embedding, family, text)
    except ValueError as error:
        return str(error)
    return None


def add_embeddings(text: PromptEncoder, family: str, embeddings: Sequence[Embedding]) -> None:
    """Add embeddings to a model's text towers: tokens to each tokenizer, vectors to each token-embedding matrix.

    Raises:
        ValueError if an embedding does not fit the model or its name is already a token (checked for all
        embeddings before anything is added).
    """
    plans = [(e, _tower_vectors(e, family, text)) for e in embeddings]
    names = [e.name for e in embeddings]
    for tower in text.towers:
        taken = [n for e, _ in plans for n in _token_names(e.name, e.num_vectors) if tower.tokenizer.has_token(n)]
        if taken or len(set(names)) != len(names):
            raise ValueError(f"embeddings {taken or names}: names repeated or already loaded; rename the files")
    for tower in text.towers:
        table = tower.encoder.embeddings.token_embedding
        rows = [table.weight]
        for embedding, vectors in plans:
            ids = tower.tokenizer.add_multi_vector_token(embedding.name, vectors[tower.name].shape[0])
            expected = list(range(sum(r.shape[0] for r in rows), sum(r.shape[0] for r in rows) + len(ids)))
            if ids != expected:
                raise ValueError(
                    f"{tower.name}: tokenizer ids {ids} do not follow the {expected[0]} embedding rows; the "
                    "tokenizer and text encoder disagree on the vocabulary size"
                )
            rows.append(vectors[tower.name].astype(table.weight.dtype))
        table.weight = mx.concatenate(rows)
        mx.eval(table.weight)


def used_embeddings(text: PromptEncoder, embeddings: Sequence[Embedding], prompts: Sequence[str]) -> list[Embedding]:
    """The embeddings whose name occurs (as the tokenizer matches it) in any of `prompts`, in loading order."""
    tokenizer = text.towers[0].tokenizer
    ids = {i for prompt in prompts for i in tokenizer.encode(prompt)}
    first_id = {name: tokenizer.vocab_size - len(tokenizer.added_tokens) + k
                for k, name in enumerate(tokenizer.added_tokens)}  # fmt: skip
    return [e for e in embeddings if first_id.get(e.name) in ids]


def ti_hashes(embeddings: Sequence[Embedding]) -> str | None:
    """A1111's "TI hashes" infotext value: "name: hash12, other: hash12"."""
    return ", ".join(f"{e.name}: {e.short_hash}" for e in embeddings if e.short_hash) or None
