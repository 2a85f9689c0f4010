"""A tiny random-weight diffusers SD3 pipeline and its mlx-sd model folder, for end-to-end parity tests.

Widths are chosen so that every part of SD3's conditioning is exercised: the two CLIP towers' states (16 + 16) are
zero-padded to T5's width (64) before T5's rows follow them, and the pooled vector is both towers' projections (16 +
16). The CLIP tokenizers are the real vocabulary; the T5 tokenizer is a SentencePiece model trained on a small corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import torch
from t5_fixtures import t5_tokenizer_folder
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
CLIP_L = dict(hidden_size=16, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, hidden_act="quick_gelu",
              projection_dim=16)  # fmt: skip
CLIP_G = dict(CLIP_L, hidden_act="gelu")
T5 = dict(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=8, relative_attention_max_distance=20)  # fmt: skip


def tiny_sd3(tmp: Path, seed: int = 0, t5: bool = True, transformer: dict = TRANSFORMER, clip_l: dict = CLIP_L,
             clip_g: dict = CLIP_G, t5_config: dict = T5):  # fmt: skip
    """A StableDiffusion3Pipeline with random weights, the position table included (a buffer in diffusers: random
    too, so that a wrong mapping cannot pass); no T5 when `t5` is False (diffusers then uses zeros). CLIP-L's
    projection is the identity, as SD3 uses that tower (sd3_infer.py pools it unprojected; diffusers' single-file
    loader writes an identity)."""
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
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609, sample_size=64,
    ), seed + 1)  # fmt: skip
    common = dict(vocab_size=49408, max_position_embeddings=77, eos_token_id=2)  # as the hub folders carry them
    towers = [randomize(CLIPTextModelWithProjection(CLIPTextConfig(**c, **common)), seed + 2 + i)
              for i, c in enumerate((clip_l, clip_g))]  # fmt: skip
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        net.pos_embed.pos_embed.copy_(torch.randn(net.pos_embed.pos_embed.shape, generator=g))
        towers[0].text_projection.weight.copy_(torch.eye(clip_l["hidden_size"]))
    parts = dict(
        transformer=net, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        text_encoder=towers[0], tokenizer=tiny_tokenizer(tmp / "tok1"),
        text_encoder_2=towers[1], tokenizer_2=tiny_tokenizer(tmp / "tok2", pad="!"),
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip
    if t5:
        parts["text_encoder_3"] = randomize(T5EncoderModel(T5Config(**t5_config)), seed + 4)
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
