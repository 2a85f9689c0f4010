"""SD3's T5 text encoder and tokenizer against transformers' T5EncoderModel and T5Tokenizer.

The encoder: tiny random configs (every parameter randomised), saved with save_pretrained, converted through
t5_config + the T5 key map, loaded strictly, compared at float32 (the parity target) and float16 (must stay finite,
also where plain float16 would overflow). The tokenizer: a tiny SentencePiece unigram model trained here, turned into
transformers' T5Tokenizer, compared id for id.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from t5_fixtures import train_spiece

from mlx_sd.components import load_component, save_component
from mlx_sd.models.t5 import relative_position_buckets
from mlx_sd.t5_tokenizer import T5Tokenizer
from mlx_sd_convert.diffusers import T5_RULES, convert_weights, t5_config, t5_rules
from mlx_sd_convert.keymap import ConversionError
from oracles import assert_close, load_ours, randomize

FP32_TOL = 1e-4
FP16_TOL = 2e-2
FP16_MAX = 65504.0
LENGTH = 40  # > max_distance (20): the far buckets saturate

TINY_T5 = dict(
    vocab_size=100,
    d_model=64,
    d_kv=16,
    num_heads=4,
    d_ff=96,
    num_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
)


def reference_t5(feed_forward_proj: str, seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return randomize(T5EncoderModel(T5Config(feed_forward_proj=feed_forward_proj, **TINY_T5)), seed)


def exported(ref, folder):
    """config.json and state dict as save_pretrained writes them."""
    ref.save_pretrained(folder)
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


def token_ids(seed=0) -> np.ndarray:
    """(2, LENGTH): words, eos (1), then padding (0) as SD3 feeds T5; the second row full."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, TINY_T5["vocab_size"], size=(2, LENGTH))
    ids[0, 25] = 1
    ids[0, 26:] = 0
    return ids


def run_reference(ref, ids, **kwargs):
    with torch.no_grad():
        return ref(input_ids=torch.from_numpy(ids), **kwargs)


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(feed_forward_proj, tmp_path):
    ref = reference_t5(feed_forward_proj)
    config, state = exported(ref, tmp_path / "hf")
    cfg = t5_config(config)
    assert cfg.feed_forward_proj == feed_forward_proj
    weights = convert_weights("text_encoder_3", cfg, state)
    ids = token_ids()
    expected = run_reference(ref, ids).last_hidden_state
    err = assert_close(load_ours(cfg, weights)(mx.array(ids)), expected, FP32_TOL, f"t5 {feed_forward_proj} fp32")
    # Through a component folder, as the pipeline loads it; float16 must stay close.
    save_component(tmp_path / "mlx", cfg, {k: mx.array(v) for k, v in weights.items()})
    half = load_component(tmp_path / "mlx", mx.float16)(mx.array(ids))
    assert half.dtype == mx.float16
    err16 = assert_close(half, expected, FP16_TOL, f"t5 {feed_forward_proj} fp16")
    print(f"t5 {feed_forward_proj}: fp32 {err:.2e}, fp16 {err16:.2e}")


def test_t5_float16_where_plain_half_overflows(tmp_path):
    """Feed-forward weights scaled up until the residual stream leaves float16's range (as T5 v1.1 XXL's does):
    our float16 model still matches the float32 reference."""
    ref = reference_t5("gated-gelu", seed=1)
    with torch.no_grad():
        for block in ref.encoder.block:
            block.layer[1].DenseReluDense.wi_0.weight.mul_(150)
            block.layer[1].DenseReluDense.wi_1.weight.mul_(150)
    config, state = exported(ref, tmp_path)
    cfg = t5_config(config)
    ids = token_ids(1)
    out = run_reference(ref, ids, output_hidden_states=True)
    peak = max(float(h.abs().max()) for h in out.hidden_states)
    assert peak > FP16_MAX, f"the case should overflow float16 (peak {peak:.3g})"
    got = load_ours(cfg, convert_weights("text_encoder_3", cfg, state), mx.float16)(mx.array(ids))
    assert np.isfinite(np.array(got.astype(mx.float32))).all()
    err = assert_close(got, out.last_hidden_state, FP16_TOL, "t5 fp16, large activations")
    print(f"t5 fp16 with hidden states up to {peak:.3g}: {err:.2e}")


def test_t5_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    for buckets, distance, length in [(32, 128, 512), (8, 20, LENGTH), (32, 64, 300)]:
        relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        expected = T5Attention._relative_position_bucket(relative, True, buckets, distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(length, buckets, distance), expected)


def test_t5_embedding_keys(tmp_path):
    """transformers 5 writes `shared.weight` alone; files with both copies drop the encoder's; files with only the
    encoder's copy load it into `shared`; a whole T5 (decoder, LM head) converts to its encoder."""
    _, state = exported(reference_t5("gated-gelu"), tmp_path)
    cfg = t5_config({"feed_forward_proj": "gated-gelu", **TINY_T5})
    assert "encoder.embed_tokens.weight" not in state
    expected = convert_weights("text_encoder_3", cfg, state)
    both = {**state, "encoder.embed_tokens.weight": state["shared.weight"], "lm_head.weight": state["shared.weight"]}
    both["decoder.final_layer_norm.weight"] = state["encoder.final_layer_norm.weight"]
    assert t5_rules(both) is T5_RULES
    encoder_only = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in state.items()}
    for source in (both, encoder_only):
        got = convert_weights("text_encoder_3", cfg, source, rules=t5_rules(source))
        assert got.keys() == expected.keys()
        np.testing.assert_array_equal(got["shared.weight"], expected["shared.weight"])
    with pytest.raises(ConversionError, match="shared.weight"):
        convert_weights("text_encoder_3", cfg, encoder_only)  # the default map wants shared.weight


@pytest.mark.parametrize(
    "change, message",
    [
        ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu'"),
        ({"feed_forward_proj": "gelu"}, "feed_forward_proj='gelu'"),
        ({"feed_forward_proj": "gated-gelu", "dense_act_fn": "relu"}, "dense_act_fn='relu'"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"layer_scale": 0.1}, "unknown settings \\['layer_scale'\\]"),
    ],
)
def test_t5_config_refuses_other_networks(change, message):
    config = {"feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new", "is_gated_act": True, **TINY_T5}
    with pytest.raises(ConversionError, match=message):
        t5_config({**config, **change})


def test_t5_config_sd3():
    """SD3's text_encoder_3/config.json (transformers 4.x) translates to the XXL encoder, our defaults."""
    sd3 = {
        "_name_or_path": "google/t5-v1_1-xxl",
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": 24,
        "num_heads": 64,
        "num_layers": 24,
        "output_past": True,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "vocab_size": 32128,
    }
    from mlx_sd.models import T5Config

    assert t5_config(sd3) == T5Config()


# --- tokenizer ------------------------------------------------------------------------------------------------

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of A CAT, 4K HDR!!! (masterpiece:1.2) [dog] {x} 3.14159 -- 1234567890",
    "café über naïve façade, 東京 🙂",
    "  leading, trailing   and  repeated spaces\tand\ttabs\nand newlines  ",
    "literal specials: </s> <pad> <extra_id_3> <unk>",
    "",
    " ".join(f"word{i} katori" for i in range(200)),  # far beyond 256 tokens
]


@pytest.fixture(scope="module")
def t5_tokenizers(tmp_path_factory):
    """(a folder with only spiece.model, one saved by transformers 5, transformers' tokenizer loaded from it)."""
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    tmp = tmp_path_factory.mktemp("t5_tokenizer")
    spiece_only = train_spiece(tmp / "spiece_only")
    saved = tmp / "transformers"
    ReferenceT5Tokenizer.from_pretrained(spiece_only).save_pretrained(saved)
    return spiece_only, saved, ReferenceT5Tokenizer.from_pretrained(saved)


def reference_ids(reference, texts, max_length):
    out = reference(texts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True)
    return np.array(out["input_ids"], dtype=np.int32)


def assert_same_ids(ours: T5Tokenizer, reference):
    for max_length in (16, 256):
        got = ours.encode(PROMPTS, max_length)
        assert got.dtype == np.int32 and got.shape == (len(PROMPTS), max_length)
        np.testing.assert_array_equal(got, reference_ids(reference, PROMPTS, max_length), err_msg=f"{max_length}")
    for text in PROMPTS:
        assert ours.tokenize(text) == reference(text, add_special_tokens=False)["input_ids"], text


def test_t5_tokenizer_matches_transformers(t5_tokenizers, tmp_path):
    _, saved, reference = t5_tokenizers
    ours = T5Tokenizer.from_folder(saved)
    assert ours.vocab_size == len(reference)
    assert_same_ids(ours, reference)
    assert ours.encode([""], 4).tolist() == [[1, 0, 0, 0]]
    ours.save(tmp_path)  # what the converter copies into a model folder
    assert_same_ids(T5Tokenizer.from_folder(tmp_path), reference)


def test_t5_tokenizer_from_spiece_model(t5_tokenizers):
    spiece_only, _, reference = t5_tokenizers
    assert_same_ids(T5Tokenizer.from_folder(spiece_only), reference)


def test_t5_tokenizer_transformers4_file(t5_tokenizers, tmp_path):
    """SD3's hub tokenizer.json (written by transformers 4): Replace + Metaspace pipeline; transformers 5 and we
    both run its own pipeline instead."""
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    _, saved, _ = t5_tokenizers
    data = json.loads((saved / "tokenizer.json").read_text())
    data["normalizer"] = {
        "type": "Sequence",
        "normalizers": [data["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}],
    }
    data["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text((saved / "tokenizer_config.json").read_text())
    assert_same_ids(T5Tokenizer.from_folder(tmp_path), ReferenceT5Tokenizer.from_pretrained(tmp_path))
