"""A tiny T5 tokenizer for tests: a SentencePiece unigram model trained here, in T5's layout (<pad> 0, </s> 1, <unk> 2,
no bos), and the transformers T5Tokenizer folder made from it (what a diffusers SD3 folder's tokenizer_3 holds)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

WORDS = "a photo of an astronaut riding horse on mars café word katori red lighthouse blurry".split()


def train_spiece(folder: Path) -> Path:
    """Train the SentencePiece model into `folder` (spiece.model alone, as google/t5-v1_1-xxl publishes it)."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "mu", "sen", "pho", "cat", "dog", "ast", "naut", "ing", "er", "é", "ü", "42", "7"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)] + WORDS
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,!? ") for _ in range(600)]
    corpus = folder.parent / f"{folder.name}-corpus.txt"
    corpus.write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "spiece.vocab").unlink()
    corpus.unlink()
    return folder


def t5_tokenizer_folder(tmp: Path) -> Path:
    """tmp/tokenizer_3: the tokenizer as transformers saves it (tokenizer.json, tokenizer_config.json, ...)."""
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    spiece = train_spiece(tmp / "spiece")
    ReferenceT5Tokenizer.from_pretrained(spiece).save_pretrained(tmp / "tokenizer_3")
    return tmp / "tokenizer_3"
