"""T5's SentencePiece (unigram) tokenizer: prompt -> (B, max_length) ids for SD3's T5 encoder.

The unigram model runs in the `tokenizers` library. The ids are those of transformers' T5Tokenizer (5.x), which
diffusers' SD3 pipeline calls as `tokenizer(texts, padding="max_length", max_length=256, truncation=True)`: the text's
pieces, cut to max_length - 1, then eos `</s>` (id 1), then pad `<pad>` (id 0) up to max_length.

transformers 5 does not run a tokenizer.json's own text pipeline for T5: it keeps the file's vocabulary, added tokens
and SentencePiece normaliser (its `Precompiled` character map) and sets its own pre-tokenizer, whitespace split then
"▁" before every word. Files written by transformers 4 (SD3's hub folders) instead collapse runs of spaces with a
`Replace` and let `Metaspace` split; `_as_transformers5` rebuilds the pipeline as transformers 5 does, so both kinds of
file give transformers 5's ids.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

TOKENIZER_FILE = "tokenizer.json"
SPIECE_FILE = "spiece.model"
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's SentencePiece model puts them first
EXTRA_IDS = 100  # T5's sentinel tokens `<extra_id_0>`..`<extra_id_99>`, appended to the vocabulary in reverse
MAX_LENGTH = 256  # diffusers SD3 pipelines' default max_sequence_length
SPACE = "▁"  # SentencePiece's word-start marker


class T5Tokenizer:
    """Text -> T5 token ids. Thread-safe: encoding never changes the backend's settings."""

    def __init__(self, tokenizer: Tokenizer):
        """Wrap a `tokenizers.Tokenizer` already set up as T5's (see `from_folder`)."""
        self._tokenizer = tokenizer
        for token, expected in ((PAD_TOKEN, PAD_ID), (EOS_TOKEN, EOS_ID)):
            if tokenizer.token_to_id(token) != expected:
                raise ValueError(f"T5 tokenizer: {token} has id {tokenizer.token_to_id(token)}, expected {expected}")

    @classmethod
    def from_folder(cls, folder: str | Path) -> T5Tokenizer:
        """Load a tokenizer folder (a diffusers SD3 `tokenizer_3/`): its tokenizer.json, else its spiece.model."""
        folder = Path(folder)
        if (folder / TOKENIZER_FILE).is_file():
            return cls(_as_transformers5(json.loads((folder / TOKENIZER_FILE).read_text(encoding="utf-8"))))
        if (folder / SPIECE_FILE).is_file():
            return cls.from_spiece(folder / SPIECE_FILE, _extra_ids(folder))
        raise FileNotFoundError(f"{folder}: no {TOKENIZER_FILE} or {SPIECE_FILE} (is this a T5 tokenizer folder?)")

    @classmethod
    def from_spiece(cls, path: str | Path, extra_ids: int = EXTRA_IDS) -> T5Tokenizer:
        """Build the tokenizer from a SentencePiece model file, as transformers 5 converts one.

        Reading the file needs `sentencepiece` and `protobuf` (as it does in transformers); tokenizer.json does not.
        """
        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as e:
            raise ImportError(
                f"{path}: reading a SentencePiece model needs `pip install sentencepiece protobuf` "
                f"(or give the folder a {TOKENIZER_FILE})"
            ) from e
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(path).read_bytes())
        if proto.trainer_spec.model_type != proto.trainer_spec.UNIGRAM:
            raise ValueError(f"{path}: not a unigram SentencePiece model (T5's are)")
        vocab = [(p.piece, p.score) for p in proto.pieces]
        extras = [f"<extra_id_{i}>" for i in range(extra_ids)]
        vocab += [(t, 0.0) for t in reversed(extras)]
        tokenizer = Tokenizer(Unigram(vocab, unk_id=UNK_ID, byte_fallback=False))
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _specials(extras)])
        return cls(_set_pipeline(tokenizer, proto.normalizer_spec.precompiled_charsmap))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def tokenize(self, text: str) -> list[int]:
        """One text's ids, without eos, padding or truncation (for prompt weighting and length checks)."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, texts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
        """(B, max_length) int32 ids: each text's pieces cut to max_length - 1, eos, then padding (id 0).

        Equal to transformers' `tokenizer(texts, padding="max_length", max_length=max_length, truncation=True)`.
        """
        if max_length < 1:
            raise ValueError(f"max_length={max_length}: T5 rows need room for eos")
        out = np.full((len(texts), max_length), PAD_ID, np.int32)
        for row, encoding in zip(out, self._tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            ids = encoding.ids[: max_length - 1] + [EOS_ID]
            row[: len(ids)] = ids
        return out

    def save(self, folder: str | Path) -> None:
        """Write tokenizer.json (the pipeline as used here), which `from_folder` reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(folder / TOKENIZER_FILE))


def _specials(extras: list[str]) -> list[str]:
    return [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN, *extras]


def _extra_ids(folder: Path) -> int:
    config = folder / "tokenizer_config.json"
    return json.loads(config.read_text()).get("extra_ids", EXTRA_IDS) if config.is_file() else EXTRA_IDS


def _as_transformers5(data: dict) -> Tokenizer:
    """A tokenizer.json's vocabulary and added tokens with transformers 5's T5 pipeline (see the module docstring)."""
    if data.get("model", {}).get("type") != "Unigram":
        raise ValueError(f"T5 tokenizer: tokenizer.json holds a {data.get('model', {}).get('type')} model, not Unigram")
    tokenizer = Tokenizer.from_str(json.dumps(data))
    return _set_pipeline(tokenizer, _precompiled_charsmap(data.get("normalizer")))


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """The SentencePiece character map of a tokenizer.json normaliser (alone or in a Sequence), if any."""
    parts = [] if normalizer is None else normalizer.get("normalizers", [normalizer])
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return base64.b64decode(part["precompiled_charsmap"])
    return None


def _set_pipeline(tokenizer: Tokenizer, charsmap: bytes | None) -> Tokenizer:
    """transformers 5's T5Tokenizer text pipeline: the SentencePiece normaliser, whitespace split, "▁" before every
    word, eos after the text."""
    tokenizer.normalizer = normalizers.Precompiled(charsmap) if charsmap else None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", EOS_TOKEN], pair=["$A", EOS_TOKEN, "$B", EOS_TOKEN], special_tokens=[(EOS_TOKEN, EOS_ID)]
    )
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer
