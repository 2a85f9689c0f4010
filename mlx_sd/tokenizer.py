"""CLIP byte-level BPE tokenizer: prompt -> (B, 77) token ids, with truncation reported, never silent.

Reference: Radford et al. 2021 (CLIP), whose tokenizer every Stable Diffusion text encoder uses. The BPE itself runs
in the `tokenizers` library; this file fixes the vocabulary, the text normalisation and the padding.

Two normalisations exist in the wild and give different ids for the same prompt, so both are supported:

- "hf": transformers' `CLIPTokenizer` (5.x): Unicode NFC, whitespace runs -> one space, lowercase. This is what
  diffusers pipelines feed their text encoders, so models converted from diffusers folders default to it.
- "openai": OpenAI's original `simple_tokenizer.py`, as copied into open_clip: `ftfy.fix_text`, HTML-unescape twice,
  strip, whitespace runs -> one space, lowercase. The original SD2/SDXL code (open_clip) and AUTOMATIC1111's
  OpenCLIP path use it, so models converted from original single files default to it. (transformers 4.x's Python
  CLIPTokenizer, which the original SD1 code and AUTOMATIC1111 load for CLIP-L, cleans the same way when ftfy is
  installed, minus the HTML unescape.)

They differ on mojibake ("cafÃ©"), HTML entities ("&amp;"), curly quotes and full-width letters (ftfy rewrites
them), and on which spelling of the special tokens a prompt may contain (`<|endoftext|>` for transformers,
`<end_of_text>` for open_clip).

Padding is per model: SD1 and SDXL's first tokenizer pad with eos (49407), SD2 and SDXL's second with id 0, the
byte "!". diffusers folders say so with `pad_token: "!"`; transformers 5 then also turns every "!" typed in a
prompt into the pad token (id 0). open_clip and the original SD2 code keep "!" as the ordinary BPE token (256),
and so do we: the pad id is only ever written after eos.
"""

from __future__ import annotations

import gzip
import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import ftfy
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = 49406, 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77  # CLIP's context: bos + 75 word tokens + eos
# CLIP's vocabulary: 256 byte symbols, the same 256 as word ends ("a</w>"), one token per merge, bos, eos. The
# gz file ranks 262,145 merges; CLIP kept the first 48,894 (open_clip writes the bound as `49152 - 256 - 2 + 1`,
# the +1 because its slice starts after the header line).
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2
BUNDLED_VOCAB = "bpe_simple_vocab_16e6.txt.gz"  # MIT, (c) 2021 OpenAI: see assets/CLIP_LICENSE
NORMALIZATIONS = ("hf", "openai")
CONFIG_FILE = "config.json"

# How CLIP splits text into words before BPE: the special tokens, contractions, letter runs, single digits, runs
# of anything else; whitespace separates and is dropped. The spellings of the special tokens differ per reference.
_HF_SPECIALS = {BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
_OPENAI_SPECIALS = {"<start_of_text>": BOS_ID, "<end_of_text>": EOS_ID}
_LITERALS = r"'s|'t|'re|'ve|'m|'ll|'d"
_HF_WORDS = r"<\|startoftext\|>|<\|endoftext\|>|" + _LITERALS + r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
# OpenAI compiles its pattern IGNORECASE. On lowercased text that matters twice: the literals also match "ſ" (U+017F,
# whose case fold is "s"), and [^\s\p{L}\p{N}] excludes U+0345 (combining ypogegrammeni, case fold iota), which
# [\p{L}] does not match either, so OpenAI's tokenizer drops it.
_OPENAI_WORDS = "(?i:<start_of_text>|<end_of_text>|" + _LITERALS + r")|[\p{L}]+|[\p{N}]|[^\s\p{L}\x{345}\p{N}]+"
_OPENAI_SPLIT = pre_tokenizers.Split(Regex(_OPENAI_WORDS), behavior="removed", invert=True)


@dataclass(frozen=True)
class TokenizerConfig:
    """What a model folder records about its tokenizer (beside the vocabulary).

    normalization: "hf" (transformers, diffusers folders) or "openai" (OpenAI / open_clip, original checkpoints).
    pad_token_id: written after eos up to `max_length`: 49407 (SD1, SDXL encoder 1) or 0 (SD2, SDXL encoder 2).
    max_length: ids per prompt, bos and eos included.
    """

    normalization: str = "hf"
    pad_token_id: int = EOS_ID
    max_length: int = MAX_LENGTH

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"tokenizer normalization must be 'hf' (transformers/diffusers) or 'openai' (OpenAI CLIP/open_clip), "
                f"got {self.normalization!r}"
            )
        if self.max_length < 2:
            raise ValueError(f"tokenizer max_length must leave room for bos and eos, got {self.max_length}")


@dataclass(frozen=True)
class TokenBatch:
    """Padded token ids for a batch of prompts, and what truncation cut off.

    ids: (B, max_length) int32: bos, word tokens, eos, then the pad id.
    num_tokens: word tokens kept per prompt (eos sits at index num_tokens + 1).
    dropped_tokens: word tokens cut off per prompt (0 when the prompt fit).
    dropped_text: the text those tokens came from ("" when nothing was dropped). For "openai" normalisation it is
        a slice of the cleaned (ftfy'd, lowercased) prompt, since that is the text the tokens were made from.
    """

    ids: np.ndarray
    num_tokens: tuple[int, ...]
    dropped_tokens: tuple[int, ...]
    dropped_text: tuple[str, ...]

    @property
    def truncated(self) -> bool:
        return any(self.dropped_tokens)

    def warnings(self) -> list[str]:
        """One human-readable line per truncated prompt, for apps to print."""
        return [
            f"prompt {i}: {n} tokens beyond the {self.ids.shape[1] - 2}-token limit were dropped: {text!r}"
            for i, (n, text) in enumerate(zip(self.dropped_tokens, self.dropped_text))
            if n
        ]


class CLIPTokenizer:
    """CLIP tokenizer with a fixed vocabulary, one of two normalisations and a per-model pad id.

    Build it with `from_folder` (a diffusers `tokenizer/` folder or one written by `save`) or `bundled` (the CLIP
    vocabulary shipped with mlx-sd). `encode` gives raw word ids; calling the tokenizer gives a padded `TokenBatch`.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: Sequence[tuple[str, str]],
        config: TokenizerConfig = TokenizerConfig(),
        added_tokens: Sequence[str] = (),
    ):
        """Args:
        vocab: token -> id, CLIP layout (49,408 entries with `<|startoftext|>` and `<|endoftext|>`).
        merges: BPE merges in rank order, e.g. ("i", "n").
        config: normalisation, pad id and length.
        added_tokens: names added after the vocabulary (see `add_tokens`), in id order.
        """
        missing = [t for t in (BOS_TOKEN, EOS_TOKEN) if t not in vocab]
        if missing:
            raise ValueError(f"not a CLIP vocabulary: {missing} missing; CLIP vocabularies name bos/eos like that")
        if not 0 <= config.pad_token_id < len(vocab):
            raise ValueError(f"pad_token_id {config.pad_token_id} is outside the vocabulary (0..{len(vocab) - 1})")
        self.config = config
        self._vocab = dict(vocab)
        self._merges = [tuple(m) for m in merges]
        self._backend = _backend(self._vocab, self._merges, config.normalization)
        self._added: list[str] = []
        self._expand: dict[int, list[int]] = {}  # multi-vector textual-inversion names: first id -> all ids
        if added_tokens:
            self.add_tokens(added_tokens)

    # --- construction ---------------------------------------------------------------------------------------

    @classmethod
    def bundled(
        cls, *, pad_token_id: int = EOS_ID, normalization: str = "openai", max_length: int = MAX_LENGTH
    ) -> CLIPTokenizer:
        """The CLIP vocabulary shipped inside mlx-sd, for models converted from single files.

        Args:
            pad_token_id: EOS_ID (49407) for SD1 and SDXL's first encoder, 0 for SD2 and SDXL's second.
            normalization: "openai" (the original SD code's tokenizer) or "hf" (what diffusers would do).
            max_length: ids per prompt, bos and eos included.
        """
        vocab, merges = read_bpe_gz(Path(__file__).parent / "assets" / BUNDLED_VOCAB)
        return cls(vocab, merges, TokenizerConfig(normalization, pad_token_id, max_length))

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        normalization: str | None = None,
        pad_token_id: int | None = None,
        max_length: int | None = None,
    ) -> CLIPTokenizer:
        """Read a tokenizer folder: one written by `save`, or a diffusers/transformers `tokenizer/` folder.

        A transformers folder holds `tokenizer.json` or `vocab.json` + `merges.txt`; its pad token and length come
        from `tokenizer_config.json` / `special_tokens_map.json` (defaults: eos, 77), and tokens added after the
        vocabulary (textual inversion) are kept. Its normalizer is not read: transformers folders use "hf".
        Keyword arguments left None take the folder's value.

        Returns:
            The tokenizer. Raises FileNotFoundError naming the files looked for, ValueError for a non-CLIP folder.
        """
        folder = Path(folder)
        if (folder / CONFIG_FILE).exists() and (folder / "vocab.json").exists():
            vocab, merges, settings, added = _read_own_folder(folder)
        else:
            vocab, merges, settings, added = _read_transformers_folder(folder)
        overrides = {"normalization": normalization, "pad_token_id": pad_token_id, "max_length": max_length}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(vocab, merges, TokenizerConfig(**settings), added)

    def save(self, folder: str | Path) -> None:
        """Write `vocab.json` + `merges.txt` (transformers' format) and `config.json` (our settings, added tokens)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self._vocab, ensure_ascii=False), encoding="utf-8")
        merges = "\n".join(f"{a} {b}" for a, b in self._merges)
        (folder / "merges.txt").write_text(f"#version: 0.2\n{merges}\n", encoding="utf-8")
        config = {"kind": "tokenizer", **asdict(self.config), "added_tokens": self._added}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # --- tokenizing -----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Word token ids of one prompt: no bos/eos, no padding, no truncation."""
        return self._encode(text)[0]

    def __call__(self, texts: str | Sequence[str]) -> TokenBatch:
        """Tokenize prompts to (B, max_length) ids: bos, words (truncated if need be), eos, padding.

        Args:
            texts: one prompt or a list of prompts.
        Returns:
            A TokenBatch; `dropped_tokens` / `dropped_text` say what truncation cut off, per prompt.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        room = self.config.max_length - 2
        ids = np.full((len(texts), self.config.max_length), self.config.pad_token_id, dtype=np.int32)
        kept, dropped, dropped_text = [], [], []
        for row, text in zip(ids, texts):
            words, starts, source = self._encode(text)
            n = min(len(words), room)
            row[: n + 2] = [BOS_ID, *words[:n], EOS_ID]
            kept.append(n)
            dropped.append(len(words) - n)
            dropped_text.append(source[starts[n] :].strip() if len(words) > n else "")
        return TokenBatch(ids, tuple(kept), tuple(dropped), tuple(dropped_text))

    def _encode(self, text: str) -> tuple[list[int], list[int], str]:
        """(word ids, start of each id's text in `source`, source): source is the text the ids were made from."""
        ids, starts, source = self._encode_words(text)
        if self._expand and any(i in self._expand for i in ids):
            pairs = [(j, start) for i, start in zip(ids, starts) for j in self._expand.get(i, (i,))]
            ids, starts = [j for j, _ in pairs], [start for _, start in pairs]
        return ids, starts, source

    def _encode_words(self, text: str) -> tuple[list[int], list[int], str]:
        if self.config.normalization == "hf":
            enc = self._backend.encode(text, add_special_tokens=False)
            return enc.ids, [a for a, _ in enc.offsets], text
        source = clean_openai(text)
        # Special tokens become their ids; the text between them goes through BPE (which never sees them).
        ids, starts, pos = [], [], 0
        specials = []
        if "_of_text>" in source:
            specials = [s for s in _OPENAI_SPLIT.pre_tokenize_str(source) if s[0] in _OPENAI_SPECIALS]
        for piece, (a, b) in [*specials, ("", (len(source), len(source)))]:
            enc = self._backend.encode(source[pos:a], add_special_tokens=False)
            ids += enc.ids
            starts += [pos + s for s, _ in enc.offsets]
            if piece:
                ids.append(_OPENAI_SPECIALS[piece])
                starts.append(a)
            pos = b
        return ids, starts, source

    # --- textual inversion ------------------------------------------------------------------------------------

    def add_tokens(self, names: Sequence[str]) -> list[int]:
        """Add whole-token names after the vocabulary (textual inversion), as transformers' `add_tokens` does.

        Each name gets the next id (49408, 49409, ...) and is matched in the normalised prompt before the
        split into words, anywhere it occurs, case-insensitively (the name is lowercased like the prompt).

        Returns:
            The new ids, in the order of `names`. Raises ValueError for a name already in the vocabulary.
        """
        names = list(names)
        taken = [n for n in names if not n or n in self._vocab or n in self._added]
        if taken or len(set(names)) != len(names):
            raise ValueError(
                f"cannot add tokens {taken or names}: empty, repeated or already in the vocabulary; choose other names"
            )
        self._backend.add_tokens([AddedToken(n, normalized=True) for n in names])
        self._added += names
        return [self._backend.token_to_id(n) for n in names]

    def add_multi_vector_token(self, name: str, count: int) -> list[int]:
        """Add a textual-inversion name that stands for `count` vectors, as diffusers' `load_textual_inversion` does.

        The tokens added are `name`, `name_1`, ..., `name_{count-1}` (consecutive ids); `name` in a prompt then
        encodes to all `count` ids in order (diffusers rewrites the prompt text to "name name_1 ..." instead: same
        ids).

        Returns:
            The `count` new ids. Raises ValueError for a name already in the vocabulary.
        """
        if count < 1:
            raise ValueError(f"{name!r}: an embedding needs at least one vector, got {count}")
        ids = self.add_tokens([name] + [f"{name}_{i}" for i in range(1, count)])
        if count > 1:
            self._expand[ids[0]] = ids
        return ids

    # --- facts ----------------------------------------------------------------------------------------------

    def has_token(self, name: str) -> bool:
        """Whether `name` is already a whole token (of the vocabulary or added): `add_tokens` would refuse it."""
        return name in self._vocab or name in self._added

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def normalization(self) -> str:
        return self.config.normalization

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (the text encoder's embedding must have at least this many rows)."""
        return len(self._vocab) + len(self._added)

    @property
    def added_tokens(self) -> tuple[str, ...]:
        return tuple(self._added)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"CLIPTokenizer(normalization={c.normalization!r}, pad_token_id={c.pad_token_id}, "
            f"max_length={c.max_length}, vocab_size={self.vocab_size})"
        )


def clean_openai(text: str) -> str:
    """OpenAI CLIP's text cleaning (`basic_clean`, `whitespace_clean`, lowercase), in its order."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def _backend(vocab: dict[str, int], merges: list[tuple[str, str]], normalization: str) -> Tokenizer:
    """The `tokenizers` pipeline: normaliser, word split, byte-level mapping, BPE with CLIP's "</w>" word ends."""
    bpe = BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS_TOKEN)
    backend = Tokenizer(bpe)
    if normalization == "hf":
        # transformers' CLIPTokenizer, piece by piece, so ids match it on every input. It matches its special
        # tokens verbatim in the raw prompt, before lowercasing.
        backend.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        split = pre_tokenizers.Split(Regex(_HF_WORDS), behavior="removed", invert=True)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _HF_SPECIALS])
    else:
        # The text arrives cleaned by `clean_openai`; lowercasing again only matters for added token names. The
        # byte-level step must not re-split words with GPT-2's case-sensitive regex (it would cut "'ſ").
        backend.normalizer = normalizers.Lowercase()
        split = _OPENAI_SPLIT
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    return backend


# --- reading vocabularies ---------------------------------------------------------------------------------------


def _byte_symbols() -> list[str]:
    """The 256 printable characters standing for bytes in byte-level BPE, in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen...) are shifted to
    U+0100 and up, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@lru_cache(maxsize=2)
def read_bpe_gz(path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (a header line, then ranked merges).

    Returns:
        (vocab, merges): 49,408 tokens, ids in CLIP's order, and the 48,894 merges CLIP uses. Do not mutate them
        (cached).
    """
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    symbols = _byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS_TOKEN, EOS_TOKEN]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merges of two symbols each; is this CLIP's BPE file?")
    return {t: i for i, t in enumerate(tokens)}, merges


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _read_merges_txt(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return [tuple(line.split(" ")) for line in lines if line]


def _read_own_folder(folder: Path):
    data = _read_json(folder / CONFIG_FILE)
    if data.pop("kind", None) != "tokenizer":
        raise ValueError(f'{folder / CONFIG_FILE} does not describe a tokenizer (no "kind": "tokenizer")')
    added = data.pop("added_tokens", [])
    known = {f.name for f in fields(TokenizerConfig)}
    if set(data) - known:
        raise ValueError(
            f"{folder / CONFIG_FILE}: unknown keys {sorted(set(data) - known)}; written by a newer mlx-sd?"
        )
    vocab = _read_json(folder / "vocab.json")
    return vocab, _read_merges_txt(folder / "merges.txt"), data, added


def _read_transformers_folder(folder: Path):
    """vocab, merges, settings and added tokens of a transformers tokenizer folder."""
    if (folder / "tokenizer.json").exists():
        model = _read_json(folder / "tokenizer.json").get("model", {})
        if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
            raise ValueError(
                f"{folder / 'tokenizer.json'} is not a CLIP BPE tokenizer (model type "
                f"{model.get('type')!r}, end_of_word_suffix {model.get('end_of_word_suffix')!r})"
            )
        vocab = model["vocab"]
        # tokenizers >= 0.20 writes merges as pairs, older versions as "a b" strings.
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    elif (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        vocab = _read_json(folder / "vocab.json")
        merges = _read_merges_txt(folder / "merges.txt")
    else:
        raise FileNotFoundError(
            f"{folder}: no tokenizer found (looked for config.json + vocab.json + merges.txt, tokenizer.json, or "
            "vocab.json + merges.txt); pass the model's tokenizer/ folder, or use CLIPTokenizer.bundled()"
        )
    config = _read_json(folder / "tokenizer_config.json")
    special = _read_json(folder / "special_tokens_map.json")
    added = _read_added_tokens(folder, config, len(vocab))
    # special_tokens_map.json wins where the two disagree, as in transformers.
    pad = _content(special.get("pad_token")) or _content(config.get("pad_token")) or EOS_TOKEN
    ids = {**vocab, **{name: len(vocab) + i for i, name in enumerate(added)}}
    if pad not in ids:
        raise ValueError(f"{folder}: pad token {pad!r} is not in the vocabulary; pass pad_token_id explicitly")
    settings = {"normalization": "hf", "pad_token_id": ids[pad]}
    # transformers writes model_max_length = 1e30 when unset: CLIP's 77 then.
    length = config.get("model_max_length")
    if isinstance(length, (int, float)) and 2 <= length < 1e6:
        settings["max_length"] = int(length)
    return vocab, merges, settings, added


def _content(token) -> str | None:
    """A special-token entry is either a string or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token


def _read_added_tokens(folder: Path, config: dict, base: int) -> list[str]:
    """Tokens a transformers folder adds after its vocabulary (ids >= base), in id order."""
    by_id = {t["id"]: t["content"] for t in _read_json(folder / "tokenizer.json").get("added_tokens", [])}
    by_id |= {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
    by_id |= {i: name for name, i in _read_json(folder / "added_tokens.json").items()}
    ids = sorted(i for i in by_id if i >= base)
    if ids != list(range(base, base + len(ids))):
        raise ValueError(f"{folder}: added token ids {ids} do not follow the vocabulary ({base}, {base + 1}, ...)")
    return [by_id[i] for i in ids]
