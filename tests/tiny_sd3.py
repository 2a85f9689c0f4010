"""A tiny random-weight diffusers SD3 pipeline and its mlx-sd model folder, for end-to-end parity tests.

Widths are chosen so that every part of SD3's conditioning is exercised: the two CLIP towers' states (16 + 16) are
zero-padded to T5's width (64) before T5's rows follow them, and the pooled vector is both towers' projections (16 +
16). The CLIP tokenizers are the real vocabulary; the T5 tokenizer is a SentencePiece model trained on a small corpus.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import mlx.core as mx
import pytest
import torch
from tiny_pipelines import tiny_tokenizer

from mlx_sd.components import save_component
from mlx_sd.model import MANIFEST, ModelInfo
from mlx_sd.t5_tokenizer import T5Tokenizer
from mlx_sd.tokenizer import CLIPTokenizer
from mlx_sd_convert.diffusers import clip_config, convert_weights, mmdit_config, t5_config, vae_config
from oracles import randomize, state_dict_numpy

TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16, pos_embed_max_size=32,
)  # fmt: skip
SD35_MEDIUM = dict(TRANSFORMER, num_layers=3, qk_norm="rms_norm", dual_attention_layers=(0, 1))


def t5_tokenizer_folder(tmp: Path) -> Path:
    """A T5 tokenizer folder (spiece.model + transformers' files) from a SentencePiece model trained here."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "mu", "sen", "pho", "cat", "dog", "ast", "naut", "ing", "er", "é", "ü", "42", "7"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    words += "a photo of an astronaut riding horse on mars red lighthouse blurry".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(".,!? ") for _ in range(600)]
    (tmp / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spiece = tmp / "spiece"
    spiece.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"), model_prefix=str(spiece / "spiece"), vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    ReferenceT5Tokenizer.from_pretrained(spiece).save_pretrained(tmp / "tokenizer_3")
    return tmp / "tokenizer_3"


def tiny_sd3(tmp: Path, seed: int = 0, t5: bool = True, transformer: dict = TRANSFORMER):
    """A StableDiffusion3Pipeline with random weights (no T5 when `t5` is False: diffusers then uses zeros)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    from transformers import T5Tokenizer as ReferenceT5Tokenizer

    torch.manual_seed(seed)
    net = randomize(SD3Transformer2DModel(**transformer), seed)
    vae = randomize(AutoencoderKL(
        block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    ), seed + 1)  # fmt: skip

    def clip(s: int, act: str):
        cfg = CLIPTextConfig(hidden_size=16, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                             vocab_size=49408, hidden_act=act, projection_dim=16, eos_token_id=2)  # fmt: skip
        return randomize(CLIPTextModelWithProjection(cfg), s)

    parts = dict(
        transformer=net, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=clip(seed + 2, "quick_gelu"), tokenizer=tiny_tokenizer(tmp / "tok1"),
        text_encoder_2=clip(seed + 3, "gelu"), tokenizer_2=tiny_tokenizer(tmp / "tok2", pad="!"),
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    if t5:
        cfg = T5Config(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                       relative_attention_max_distance=20)  # fmt: skip
        parts["text_encoder_3"] = randomize(T5EncoderModel(cfg), seed + 4)
        parts["tokenizer_3"] = ReferenceT5Tokenizer.from_pretrained(t5_tokenizer_folder(tmp))
    return StableDiffusion3Pipeline(**parts)


def sd3_folder(pipe, out: Path) -> Path:
    """Write an mlx-sd SD3 model folder from the pipeline's components, component by component."""
    nets = {"transformer": mmdit_config, "vae": vae_config}
    for name, translate in nets.items():
        module = getattr(pipe, name)
        cfg = translate(dict(module.config))
        weights = convert_weights(name, cfg, state_dict_numpy(module))
        save_component(out / name, cfg, {k: mx.array(v) for k, v in weights.items()})
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        cfg = clip_config(getattr(pipe, enc).config.to_dict(), with_projection=True)
        weights = convert_weights(enc, cfg, state_dict_numpy(getattr(pipe, enc)))
        save_component(out / enc, cfg, {k: mx.array(v) for k, v in weights.items()})
        getattr(pipe, tok).save_pretrained(out / tok)
        CLIPTokenizer.from_folder(out / tok, normalization="hf").save(out / tok)
    if pipe.text_encoder_3 is not None:
        cfg = t5_config(pipe.text_encoder_3.config.to_dict())
        weights = convert_weights("text_encoder_3", cfg, state_dict_numpy(pipe.text_encoder_3))
        save_component(out / "text_encoder_3", cfg, {k: mx.array(v) for k, v in weights.items()})
        pipe.tokenizer_3.save_pretrained(out / "tokenizer_3")
        T5Tokenizer.from_folder(out / "tokenizer_3").save(out / "tokenizer_3")
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(pipe.scheduler.config)))
    (out / MANIFEST).write_text(ModelInfo(family="sd3", prediction_type="flow", name="tiny-sd3").to_json())
    return out
