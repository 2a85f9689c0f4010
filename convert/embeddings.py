"""Textual-inversion files -> `mlx_sd.textual_inversion.Embedding`, read through the safe checkpoint reader.

Formats (what AUTOMATIC1111 and diffusers accept):

    A1111 .pt / .bin       {"string_to_param": {"*": (n, D)}, "string_to_token": ..., "name", "step", ...}
    diffusers              learned_embeds.bin / .safetensors: {"<token>": (D,)} or (n, D): one tensor
    one-tensor files       {"emb_params": (n, D)} and any other single tensor
    SDXL                   .safetensors {"clip_l": (n, 768), "clip_g": (n, 1280)}

The name is the file name without extension (A1111's rule; diffusers' token name inside the file is ignored, so a
renamed file is invoked by its new name). Pickles that need code (the original textual_inversion repository's
`torch.nn.ParameterDict`) are refused by the reader, naming the class.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.textual_inversion import Embedding

from .keymap import ConversionError
from .readers import open_checkpoint

EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")


def file_sha256(path: str | Path) -> str:
    """sha256 of the whole file (A1111's embedding hash; "TI hashes" records its first 12 hex digits)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_embedding(path: str | Path, name: str | None = None) -> Embedding:
    """Read a textual-inversion embedding file.

    Args:
        path: `.pt`, `.bin` or `.safetensors` in one of the formats above.
        name: the word that invokes it (default: the file name without extension).
    Raises:
        ConversionError naming the file and what is wrong (unknown layout, several tensors, bad shape, unsafe).
    """
    path = Path(path)
    name = name or path.stem
    checkpoint = open_checkpoint(path)
    keys = list(checkpoint)
    if checkpoint.nesting and checkpoint.nesting[-1] == "string_to_param":
        if len(keys) != 1:
            raise ConversionError(f"{path}: string_to_param holds {len(keys)} embeddings ({keys}); expected one")
        tensors = {"": checkpoint[keys[0]]}
    elif set(keys) == set(SDXL_KEYS):
        tensors = {k: checkpoint[k] for k in SDXL_KEYS}
    elif len(keys) == 1:
        tensors = {"": checkpoint[keys[0]]}
    else:
        raise ConversionError(
            f"{path}: not a textual-inversion embedding (tensors {keys[:8]}); expected string_to_param (A1111), "
            "one tensor (diffusers learned_embeds) or clip_l + clip_g (SDXL)"
        )
    vectors = {}
    for key, value in tensors.items():
        value = np.asarray(value, dtype=np.float32)
        value = value[None] if value.ndim == 1 else value
        if value.ndim != 2 or not value.size:
            raise ConversionError(f"{path}: embedding {key or name} has shape {value.shape}; expected (vectors, width)")
        vectors[key] = mx.array(value)
    return Embedding(name, vectors, file_sha256(path), str(path), _step(checkpoint.extras))


def _step(extras: dict[str, str]) -> int | None:
    """The training step an A1111 embedding records ("step": "int 3000" in the reader's descriptions)."""
    kind, _, value = extras.get("step", "").partition(" ")
    return int(value) if kind == "int" and value.lstrip("-").isdigit() else None
