"""Tokenizer parity: ids identical to transformers' CLIPTokenizer ("hf") and open_clip's SimpleTokenizer ("openai").

transformers ships no CLIP vocabulary, so its reference is built from vocab.json + merges.txt written here from
open_clip's own parse of the gz file (not from ours), with model_max_length=77 as ORACLE.md advises.
"""

import gzip
import json
import random
import unicodedata

import numpy as np
import pytest
from transformers import CLIPTokenizer as ReferenceCLIPTokenizer

from mlx_sd.tokenizer import (
    BOS_ID,
    BUNDLED_VOCAB,
    EOS_ID,
    NUM_MERGES,
    VOCAB_SIZE,
    CLIPTokenizer,
    read_bpe_gz,
)
from oracles import open_clip_module

LONG = "a photo of " + ", ".join(f"detail number {i}" for i in range(40))  # ~160 tokens
BATTERY = [
    "a photo of an astronaut riding a horse on mars",
    "",
    "   ",
    # punctuation, contractions, brackets, symbols
    "Hello, world! What's up? It's 5 o'clock... (yes) [no] {maybe} <tag> #hash @user $100 50% a&b c*d e+f g=h",
    "~tilde `tick` ^caret |pipe| back\\slash semi;colon: 'single' \"double\" --- ___ ?!?! ...",
    "I'll they've we're she'd I'm don't I'LL THEY'VE O'Neil 'sup it'ſ ’ſ",
    # "!" must stay BPE token 256 (never the pad id 0)
    "wow!",
    "!!!",
    "! ! !",
    "hello! world!! end!",
    # emoji, ZWJ sequences, skin tones, flags, variation selectors
    "🐱‍👤 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️ 🇫🇷 a cat🐈in a hat🎩",
    # accents, composed and decomposed
    "café naïve résumé Ångström Dvořák crème brûlée",
    "cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m",
    # numbers
    "1234567890 3.14159 1,000,000 2nd 10x 0xFF 1e-5 -42 ½ ² ٣ ४",
    # scripts
    "一只可爱的猫 日本語のテキスト 한국어 텍스트",
    "Привет мир, кошка в шляпе",
    "مرحبا بالعالم، قطة",
    "नमस्ते दुनिया สวัสดีชาวโลก Γειά σου Κόσμε ᾳ α\u0345",
    # whitespace of every kind
    "a\u00a0b\tc\nd\r\n  e   f\u3000g\u2003h\u200bi\ufeffj  ",
    "\t\n leading and trailing \n\t",
    # HTML entities (and double-escaped ones)
    "Tom &amp; Jerry &lt;3 &quot;hi&quot; &#39;x&#39; &amp;amp; &nbsp;space &eacute;",
    # typographic quotes and dashes
    "“smart quotes” ‘single’ — em dash – en dash … ellipsis «guillemets» „low“",
    # full-width letters and digits
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３ ！",
    # mojibake
    "The Mona Lisa doesnâ€™t have eyebrows. cafÃ© Ã¼ber",
    # mixed case
    "A PhOtO Of A CaT, DSLR, 8K UHD, HDR",
    # AUTOMATIC1111 prompt syntax
    "(masterpiece:1.2), (best quality), [[blurry]], ((red:1.3) dress), {blue eyes}, [cat:dog:0.5] BREAK "
    "<lora:foo_v2:0.8>, embedding:bar, \\(escaped\\), (red:1.3)",
    # special-token text typed into a prompt
    "<|startoftext|>a <|endoftext|> b <|ENDOFTEXT|>",
    "<start_of_text>x <end_of_text> y <END_OF_TEXT> !!<end_of_text> z<end_of_text>",
    # control characters
    "a\x00b\x07c\x1fd\x7fe\u0085f",
    # longer than 77 tokens
    LONG,
    "word " * 100,
]
# One word per code point of the blocks where tokenizers tend to disagree.
BLOCKS = [(0x00, 0x250), (0x300, 0x370), (0x2000, 0x2070), (0x3000, 0x3040), (0xFF00, 0xFFF0), (0x1F300, 0x1F700)]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    return open_clip_module("tokenizer").SimpleTokenizer()


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory, open_clip_tokenizer):
    """vocab.json + merges.txt as diffusers folders hold them, written from open_clip's parse of the gz."""
    folder = tmp_path_factory.mktemp("clip_vocab")
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in open_clip_tokenizer.encoder.items()}
    merges = sorted(open_clip_tokenizer.bpe_ranks, key=open_clip_tokenizer.bpe_ranks.get)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
    return folder


@pytest.fixture(scope="module")
def transformers_tokenizer(vocab_folder):
    return ReferenceCLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77)


def reference_words(transformers_tokenizer, text):
    return transformers_tokenizer(text, add_special_tokens=False)["input_ids"]


def mismatches(ours, reference, texts):
    return [(t, ours(t), reference(t)) for t in texts if ours(t) != reference(t)]


def code_point_words(assigned_only: bool) -> list[str]:
    """Chunks of text with every code point in BLOCKS as its own word, inside one and after an apostrophe."""
    chars = [chr(c) for lo, hi in BLOCKS for c in range(lo, hi)]
    if assigned_only:  # the word pattern's Unicode tables differ between regex engines for newer code points
        chars = [c for c in chars if unicodedata.category(c) != "Cn"]
    return [" ".join(f"{c} x{c}y '{c}" for c in chars[i : i + 500]) for i in range(0, len(chars), 500)]


def random_prompts(count: int = 400) -> list[str]:
    """Random jumbles of the characters and fragments where tokenizers disagree (a fuzz test with a fixed seed)."""
    pool = list("aAzZ éÉe\u0301ñßİıſﬁ!?.,;:'\"’“”()[]{}<>|_-–—…&#@$%^*+=/\\~`0123456789٣½²\u00a0\t\n\r")
    pool += list("\u3000\u200b\u200d\ufeff🐱👤🏽🇫🇷❤️ЖжΣσςع中日ｆＦ！\u0345")
    pool += ["'s", "'LL", "&amp;", "&#39;", "Ã©", "â€™"]
    pool += ["<|endoftext|>", "<|startoftext|>", "<end_of_text>", "<START_OF_TEXT>", "cat", "photo", "(red:1.3)"]
    rng = random.Random(0)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(count)]


# --- the bundled vocabulary -------------------------------------------------------------------------------------


def test_bundled_vocabulary_is_clip_and_parses_like_open_clip(open_clip_tokenizer):
    from mlx_sd import tokenizer as module

    asset = module.__file__.replace("tokenizer.py", f"assets/{BUNDLED_VOCAB}")
    with open(asset, "rb") as ours, open(open_clip_module("tokenizer").default_bpe(), "rb") as reference:
        assert ours.read() == reference.read()
    vocab, merges = read_bpe_gz(asset)
    assert (len(merges), len(vocab), NUM_MERGES, VOCAB_SIZE) == (48894, 49408, 48894, 49408)
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {rename.get(t, t): i for t, i in open_clip_tokenizer.encoder.items()}
    assert merges == sorted(open_clip_tokenizer.bpe_ranks, key=open_clip_tokenizer.bpe_ranks.get)
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (BOS_ID, EOS_ID) == (49406, 49407)
    assert gzip.decompress(open(asset, "rb").read()).startswith(b'"bpe_simple_vocab_16e6.txt#version: 0.2\n')


# --- raw word ids -----------------------------------------------------------------------------------------------


def test_hf_encode_matches_transformers(vocab_folder, transformers_tokenizer):
    for ours in (CLIPTokenizer.from_folder(vocab_folder), CLIPTokenizer.bundled(normalization="hf")):
        texts = BATTERY + code_point_words(assigned_only=False) + random_prompts()
        assert not mismatches(ours.encode, lambda t: reference_words(transformers_tokenizer, t), texts)


def test_openai_encode_matches_open_clip(vocab_folder, open_clip_tokenizer):
    for ours in (CLIPTokenizer.bundled(), CLIPTokenizer.from_folder(vocab_folder, normalization="openai")):
        texts = BATTERY + code_point_words(assigned_only=True) + random_prompts()
        assert not mismatches(ours.encode, open_clip_tokenizer.encode, texts)


def test_normalizations_differ_where_the_references_do(transformers_tokenizer, open_clip_tokenizer):
    """The battery is only a test of both modes if the references disagree on it."""
    hf, openai = CLIPTokenizer.bundled(normalization="hf"), CLIPTokenizer.bundled(normalization="openai")
    for text in ["Tom &amp; Jerry", "“smart quotes”", "ＦＵＬＬＷＩＤＴＨ", "cafÃ©", "<|endoftext|>", "<end_of_text>"]:
        assert reference_words(transformers_tokenizer, text) != open_clip_tokenizer.encode(text), text
        assert hf.encode(text) != openai.encode(text), text


# --- padded batches ---------------------------------------------------------------------------------------------


def test_hf_batch_pads_with_eos_like_transformers(vocab_folder, transformers_tokenizer):
    batch = CLIPTokenizer.from_folder(vocab_folder)(BATTERY)
    reference = transformers_tokenizer(BATTERY, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert batch.ids.shape == (len(BATTERY), 77) and batch.ids.dtype == np.int32
    np.testing.assert_array_equal(batch.ids, np.array(reference))


def test_hf_batch_pads_with_zero_like_transformers(vocab_folder):
    """SD2 / SDXL encoder 2 folders name "!" (id 0) as pad token. transformers 5 then also turns every "!" in the
    prompt into id 0 (see test_exclamation_mark_is_not_padding), so compare on prompts without "!"."""
    reference = ReferenceCLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77, pad_token="!")
    texts = [t for t in BATTERY if "!" not in t]
    expected = reference(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(CLIPTokenizer.from_folder(vocab_folder, pad_token_id=0)(texts).ids, expected)


@pytest.mark.parametrize("pad_token_id", [0, EOS_ID])
def test_openai_batch_matches_open_clip(open_clip_tokenizer, pad_token_id):
    """open_clip pads with 0 (SD2's and SDXL's OpenCLIP); with eos (SD1 through A1111) only the padding differs."""
    expected = open_clip_tokenizer(BATTERY).numpy()
    for row, text in zip(expected, BATTERY):
        row[min(len(open_clip_tokenizer.encode(text)), 75) + 2 :] = pad_token_id
    np.testing.assert_array_equal(CLIPTokenizer.bundled(pad_token_id=pad_token_id)(BATTERY).ids, expected)


def test_exclamation_mark_is_not_padding(vocab_folder, transformers_tokenizer, open_clip_tokenizer):
    """Our pad id only ever follows eos; a literal "!" stays BPE token 256 as in open_clip and the original SD2 code.

    transformers 5 registers pad_token="!" as a special token, so in diffusers' SD2/SDXL pipelines every "!" of a
    prompt becomes id 0: that quirk is the one place we deliberately differ from a transformers folder.
    """
    text = "wow! so good!!"
    quirky = ReferenceCLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77, pad_token="!")
    assert 0 in reference_words(quirky, text)
    for normalization in ("hf", "openai"):
        ours = CLIPTokenizer.bundled(pad_token_id=0, normalization=normalization)
        assert ours.encode(text) == open_clip_tokenizer.encode(text) == reference_words(transformers_tokenizer, text)
        assert 0 not in ours.encode(text) and 256 in ours.encode(text)
        row = ours(text).ids[0]
        assert list(row[: row.tolist().index(EOS_ID) + 1]) == [BOS_ID, *ours.encode(text), EOS_ID]
        assert (row[len(ours.encode(text)) + 2 :] == 0).all()


# --- truncation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["hf", "openai"])
def test_truncation_is_reported(normalization, transformers_tokenizer, open_clip_tokenizer):
    reference = {
        "hf": lambda t: reference_words(transformers_tokenizer, t),
        "openai": open_clip_tokenizer.encode,
    }[normalization]
    ours = CLIPTokenizer.bundled(normalization=normalization)
    texts = ["short prompt", LONG, "word " * 100, "Ünïcödé " * 40]
    batch = ours(texts)
    for i, text in enumerate(texts):
        words = reference(text)
        assert batch.num_tokens[i] == min(len(words), 75)
        assert batch.dropped_tokens[i] == max(len(words) - 75, 0)
        if len(words) > 75:
            # the reported text is where the dropped tokens came from: it re-tokenizes to exactly them
            assert reference(batch.dropped_text[i]) == words[75:]
            assert batch.ids[i, 76] == EOS_ID and list(batch.ids[i, 1:76]) == words[:75]
        else:
            assert batch.dropped_text[i] == ""
    assert batch.truncated and len(batch.warnings()) == 3 and "prompt 1:" in batch.warnings()[0]
    assert not ours(["short prompt"]).truncated


# --- folders ----------------------------------------------------------------------------------------------------


def test_from_folder_reads_a_transformers_tokenizer_json(tmp_path, vocab_folder):
    """transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json, added tokens included."""
    reference = ReferenceCLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77, pad_token="!")
    reference.add_tokens(["<cat-toy>", "MyStyle"])
    reference.save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists()

    ours = CLIPTokenizer.from_folder(tmp_path)
    assert (ours.pad_token_id, ours.max_length, ours.normalization) == (0, 77, "hf")
    assert ours.added_tokens == ("<cat-toy>", "MyStyle") and ours.vocab_size == 49410
    texts = [t for t in BATTERY if "!" not in t] + ["a <cat-toy> in mystyle", "A <CAT-TOY>, MYSTYLE"]
    assert not mismatches(ours.encode, lambda t: reference_words(reference, t), texts)


def test_from_folder_reads_a_diffusers_tokenizer_folder(tmp_path, vocab_folder, transformers_tokenizer):
    """An SDXL `tokenizer_2/` as published: vocab.json, merges.txt, "!" as pad token in both JSON files."""
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((vocab_folder / name).read_bytes())
    token = {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special_map = {"bos_token": "<|startoftext|>", "eos_token": token, "pad_token": "!", "unk_token": token}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    config = {
        "added_tokens_decoder": {"0": {**token, "content": "!", "special": True}},
        "model_max_length": 77,
        "pad_token": "!",
        "tokenizer_class": "CLIPTokenizer",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))

    ours = CLIPTokenizer.from_folder(tmp_path)
    assert (ours.pad_token_id, ours.max_length, ours.vocab_size, ours.added_tokens) == (0, 77, VOCAB_SIZE, ())
    reference = ReferenceCLIPTokenizer.from_pretrained(tmp_path)
    assert reference.pad_token_id == 0 and reference.model_max_length == 77
    texts = [t for t in BATTERY if "!" not in t]
    expected = reference(texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ours(texts).ids, expected)
    # without any config the defaults are transformers': pad with eos, 77 ids
    bare = CLIPTokenizer.from_folder(vocab_folder)
    assert (bare.pad_token_id, bare.max_length) == (EOS_ID, 77)


def test_save_writes_a_folder_transformers_and_we_read_back(tmp_path, transformers_tokenizer, open_clip_tokenizer):
    ours = CLIPTokenizer.bundled(pad_token_id=0, normalization="openai")
    ours.add_tokens(["<my-embedding>"])
    ours.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"vocab.json", "merges.txt", "config.json"}

    written = ReferenceCLIPTokenizer.from_pretrained(tmp_path, model_max_length=77)
    texts = BATTERY[:12]
    assert [reference_words(written, t) for t in texts] == [reference_words(transformers_tokenizer, t) for t in texts]

    loaded = CLIPTokenizer.from_folder(tmp_path)
    assert (loaded.normalization, loaded.pad_token_id, loaded.added_tokens) == ("openai", 0, ("<my-embedding>",))
    assert not mismatches(loaded.encode, open_clip_tokenizer.encode, BATTERY)
    assert loaded.encode("a <My-Embedding> cat") == [320, 49408, 2368]
    assert CLIPTokenizer.from_folder(tmp_path, normalization="hf").normalization == "hf"


def test_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIPTokenizer.bundled"):
        CLIPTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a CLIP BPE tokenizer"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="'hf'.*'openai'"):
        CLIPTokenizer.bundled(normalization="ftfy")


# --- added tokens (textual inversion) ---------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["hf", "openai"])
def test_add_tokens_matches_transformers(vocab_folder, normalization):
    names = ["<cat-toy>", "MyStyle", "sks", "two words"]
    reference = ReferenceCLIPTokenizer.from_pretrained(vocab_folder, model_max_length=77)
    assert reference.add_tokens(names) == 4
    ours = CLIPTokenizer.bundled(normalization=normalization)
    assert ours.add_tokens(names) == [reference.convert_tokens_to_ids(n) for n in names] == [49408, 49409, 49410, 49411]
    # matched before the word split, anywhere and case-insensitively, like transformers (plain text only, where the
    # two normalisations agree)
    texts = ["a <cat-toy> on a table", "A <CAT-TOY>", "in mystyle, MYSTYLE", "asksb sks", "two words  two\twords"]
    assert not mismatches(ours.encode, lambda t: reference_words(reference, t), texts)
    with pytest.raises(ValueError, match="already in the vocabulary"):
        ours.add_tokens(["cat"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        ours.add_tokens(["sks"])
