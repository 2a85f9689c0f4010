"""Parity of the core networks with the references, on tiny random-weight configurations.

Every reference parameter is randomised, exported as diffusers/transformers/open_clip publish it, mapped through
the converter's key tables and loaded strictly into our module; outputs are compared at fp32 (and fp16).
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd import backend
from mlx_sd.components import build
from mlx_sd.models import layers, winograd
from mlx_sd_convert.diffusers import clip_config, convert_weights, unet_config, vae_config
from mlx_sd_convert.keymap import apply_rules
from mlx_sd_convert.openclip import openclip_config, openclip_rules
from oracles import (
    assert_close,
    load_ours,
    nchw_to_nhwc,
    open_clip_module,
    randomize,
    state_dict_numpy,
    token_batch,
)

FP32_TOL = 1e-4  # the bound; observed errors are printed by -s and listed in the README
FP16_TOL = 2e-2  # half precision carries ~1e-3 relative rounding per op through dozens of layers


# --- UNet ---------------------------------------------------------------------------------------------------

TINY_UNETS = {
    # SD1 layout: 8 heads everywhere, 1x1-conv proj_in/proj_out, quick cross-attention dim.
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=48,
    ),
    # SD2 layout: per-stage head counts, linear projections.
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        cross_attention_dim=40,
    ),
    # SD1/SD2 inpainting: latents + mask + masked-image latents.
    "inpaint": dict(
        in_channels=9,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=4,
        cross_attention_dim=32,
    ),
    # SDXL layout: no attention in stage 0, deeper transformers later, added text-time embedding.
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=[1, 2, 3],
        attention_head_dim=[2, 4, 4],
        use_linear_projection=True,
        cross_attention_dim=48,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
    # LCM-distilled UNet: guidance-scale embedding added to the timestep embedding.
    "lcm": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=32,
        time_cond_proj_dim=16,
    ),
}


def reference_unet(name, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(norm_num_groups=32, **TINY_UNETS[name]), seed)


def run_unet_pair(ref, ours, x, t, context, added=None, timestep_cond=None, dtype=mx.float32):
    with torch.no_grad():
        kwargs = {}
        if added is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
        if timestep_cond is not None:
            kwargs["timestep_cond"] = timestep_cond
        expected = ref(x, t, encoder_hidden_states=context, **kwargs).sample
    cast = lambda a: mx.array(a.numpy()).astype(dtype)  # noqa: E731
    got = ours(
        nchw_to_nhwc(x).astype(dtype),
        mx.array(t.numpy()),
        cast(context),
        pooled=None if added is None else cast(added[0]),
        time_ids=None if added is None else cast(added[1]),
        timestep_cond=None if timestep_cond is None else cast(timestep_cond),
    )
    return nchw_to_nhwc(expected), got


# Latent sizes: square, non-square, and sizes that are multiples of 8 pixels but not of 2^stages latents.
UNET_CASES = [
    ("sd1", (16, 16)),
    ("sd1", (12, 20)),
    ("sd1", (9, 13)),
    ("sd2", (16, 8)),
    ("sd2", (7, 10)),
    ("inpaint", (10, 14)),
    ("sdxl", (16, 16)),
    ("sdxl", (11, 6)),
    ("lcm", (8, 8)),
]


@pytest.mark.parametrize("name,size", UNET_CASES, ids=[f"{n}-{h}x{w}" for n, (h, w) in UNET_CASES])
def test_unet_matches_diffusers(name, size):
    ref = reference_unet(name)
    cfg = unet_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("unet", cfg, state_dict_numpy(ref)))

    g = torch.Generator().manual_seed(1)
    B = 2
    x = torch.randn(B, cfg.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 17.5])  # per-sample, one fractional (Karras schedules give fractional t)
    context = torch.randn(B, 7, cfg.cross_attention_dim, generator=g)
    added = None
    if cfg.addition_time_embed_dim:
        added = (torch.randn(B, 32, generator=g), torch.tensor([[512.0, 768, 0, 16, 1024, 1024]] * B))
    tcond = torch.randn(B, cfg.time_cond_proj_dim, generator=g) if cfg.time_cond_proj_dim else None

    expected, got = run_unet_pair(ref, ours, x, t, context, added, tcond)
    err = assert_close(got, expected, FP32_TOL, f"unet {name} {size}")
    print(f"unet {name} {size}: fp32 rel err {err:.2e}")


def test_unet_text_context_keeps_keys_and_values_across_steps():
    """The pipeline hands the UNet a TextContext, computing each cross-attention layer's keys and values at the first
    step only: two steps with one TextContext match diffusers (which recomputes them) and our raw-array path bit for
    bit, and the second step finds every layer's keys and values kept."""
    ref = reference_unet("sdxl")
    cfg = unet_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("unet", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(4)
    context = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    added = (torch.randn(2, 32, generator=g), torch.tensor([[512.0, 512, 0, 0, 512, 512]] * 2))
    text = layers.TextContext(mx.array(context.numpy()))
    cross = [m for name, m in ours.named_modules() if name.endswith("attn2")]
    assert cross
    for step, t in enumerate((torch.tensor([999.0, 999.0]), torch.tensor([501.5, 501.5]))):
        x = torch.randn(2, 4, 8, 8, generator=g)
        expected, raw = run_unet_pair(ref, ours, x, t, context, added)
        pooled, time_ids = (mx.array(a.numpy()) for a in added)
        got = ours(nchw_to_nhwc(x), mx.array(t.numpy()), text, pooled=pooled, time_ids=time_ids)
        assert_close(got, expected, FP32_TOL, f"unet with TextContext, step {step}")
        assert np.array_equal(np.array(got), np.array(raw))
        assert len(text._keys_values) == len(cross)


def test_unet_and_vae_with_winograd_convolutions(monkeypatch):
    """The tiny models' convolutions are below the CPU's Winograd thresholds; with them lowered, every 3x3 conv of a
    UNet and a VAE runs as F(4x4, 3x3) (models/winograd.py) and both still match diffusers."""
    if backend.conv3x3_kernel(mx.float32) != "winograd":
        pytest.skip("Winograd convolutions run on CPU only")
    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_INPUTS", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_WORK", 1)
    calls = []
    monkeypatch.setattr(layers, "conv3x3_winograd", lambda *args: calls.append(1) or winograd.conv3x3_winograd(*args))
    test_unet_matches_diffusers("sd1", (12, 20))
    test_vae_matches_diffusers((24, 40))
    assert len(calls) > 20


def test_unet_scalar_timestep_and_fp16():
    ref = reference_unet("sd2", seed=3)
    cfg = unet_config(dict(ref.config))
    weights = convert_weights("unet", cfg, state_dict_numpy(ref))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 5, cfg.cross_attention_dim, generator=g)
    t = torch.tensor(500)
    for dtype, tol in ((mx.float32, FP32_TOL), (mx.float16, FP16_TOL)):
        expected, got = run_unet_pair(ref, load_ours(cfg, weights, dtype), x, t, context, dtype=dtype)
        assert got.dtype == dtype
        err = assert_close(got, expected, tol, f"unet {dtype}")
        print(f"unet sd2 scalar t {dtype}: rel err {err:.2e}")


def test_unet_requires_sdxl_conditioning():
    ref = reference_unet("sdxl")
    cfg = unet_config(dict(ref.config))
    ours = build(cfg)
    with pytest.raises(ValueError, match="pooled and time_ids"):
        ours(mx.zeros((1, 8, 8, 4)), mx.array([1.0]), mx.zeros((1, 3, 48)))


# --- VAE ----------------------------------------------------------------------------------------------------


def reference_vae(seed=0, **overrides):
    from diffusers import AutoencoderKL

    cfg = dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**cfg), seed)


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_vae_matches_diffusers(size):
    ref = reference_vae()
    cfg = vae_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("vae", cfg, state_dict_numpy(ref)))

    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, *size, generator=g) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        latents = torch.randn(2, 4, size[0] // 4, size[1] // 4, generator=g)
        decoded = ref.decode(latents).sample
    ours_dist = ours.encode(nchw_to_nhwc(image))
    errs = {
        "mean": assert_close(ours_dist.mean, nchw_to_nhwc(dist.mean), FP32_TOL, "vae mean"),
        "logvar": assert_close(ours_dist.logvar, nchw_to_nhwc(dist.logvar), FP32_TOL, "vae logvar"),
        "decode": assert_close(ours.decode(nchw_to_nhwc(latents)), nchw_to_nhwc(decoded), FP32_TOL, "vae decode"),
    }
    print(f"vae {size}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))

    # Sampling is mean + std * noise with the noise we pass.
    noise = nchw_to_nhwc(torch.randn(dist.mean.shape, generator=g))
    expected = nchw_to_nhwc(dist.mean) + nchw_to_nhwc(dist.std) * noise
    assert_close(ours_dist.sample(noise=noise), expected, FP32_TOL, "vae sample")
    a = ours_dist.sample(key=mx.random.key(5))
    b = ours_dist.sample(key=mx.random.key(5))
    assert mx.array_equal(a, b)


def test_sd3_vae_matches_diffusers():
    """SD3's VAE: 16 latent channels, no quant_conv/post_quant_conv, latents shifted before scaling."""
    ref = reference_vae(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
                        shift_factor=0.0609)  # fmt: skip
    cfg = vae_config(dict(ref.config))
    assert (cfg.latent_channels, cfg.use_quant_conv, cfg.use_post_quant_conv) == (16, False, False)
    ours = load_ours(cfg, convert_weights("vae", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 32, 24, generator=g) * 2 - 1
    with torch.no_grad():
        mean = ref.encode(image).latent_dist.mean
        latents = (mean - ref.config.shift_factor) * ref.config.scaling_factor  # StableDiffusion3Img2ImgPipeline
        decoded = ref.decode(latents / ref.config.scaling_factor + ref.config.shift_factor).sample  # SD3 pipeline
    ours_latents = cfg.scale(ours.encode(nchw_to_nhwc(image)).mean)
    assert_close(ours_latents, nchw_to_nhwc(latents), FP32_TOL, "sd3 vae latents")
    assert_close(ours.decode(cfg.unscale(ours_latents)), nchw_to_nhwc(decoded), FP32_TOL, "sd3 vae decode")


def test_vae_old_attention_names_and_fp16():
    """Hub folders saved before diffusers 0.14 name the mid attention query/key/value/proj_attn."""
    ref = reference_vae(
        seed=4,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
    )
    cfg = vae_config(dict(ref.config))
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in state_dict_numpy(ref).items():
        for new, legacy in renames.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{legacy}.")
        old[k] = v
    assert any(".query." in k for k in old)
    weights = convert_weights("vae", cfg, old)
    latents = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nchw_to_nhwc(ref.decode(latents).sample)
    for dtype, tol in ((mx.float32, FP32_TOL), (mx.float16, FP16_TOL)):
        got = load_ours(cfg, weights, dtype).decode(nchw_to_nhwc(latents).astype(dtype))
        print(f"vae decode {dtype}: rel err {assert_close(got, expected, tol, f'vae {dtype}'):.2e}")


# --- CLIP text encoders -------------------------------------------------------------------------------------


def reference_clip(with_projection: bool, seed=0, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=24,
        max_position_embeddings=77,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )
    cfg.update(overrides)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    torch.manual_seed(seed)
    return randomize(cls(CLIPTextConfig(**cfg)), seed)


CLIP_CASES = [
    # (id, with projection, overrides, pad id)
    ("clip-l-legacy-eos", False, dict(hidden_act="quick_gelu", eos_token_id=2), 49407),
    ("clip-l", False, dict(hidden_act="quick_gelu"), 49407),
    ("openclip-as-hf", False, dict(hidden_act="gelu"), 0),
    ("bigg-projection", True, dict(hidden_act="gelu"), 0),
]


@pytest.mark.parametrize("case", CLIP_CASES, ids=[c[0] for c in CLIP_CASES])
def test_clip_matches_transformers(case):
    _, with_projection, overrides, pad = case
    ref = reference_clip(with_projection, **overrides)
    cfg = clip_config(ref.config.to_dict(), with_projection)
    ours = load_ours(cfg, convert_weights("text_encoder", cfg, state_dict_numpy(ref)))
    ids = token_batch(pad)
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = ours(mx.array(ids))
    assert len(got.hidden_states) == len(out.hidden_states) == cfg.num_hidden_layers + 1
    for i, (a, b) in enumerate(zip(got.hidden_states, out.hidden_states)):
        assert_close(a, b, FP32_TOL, f"hidden state {i}")
    errs = {"last": assert_close(got.last_hidden_state, out.last_hidden_state, FP32_TOL, "last hidden state")}
    if with_projection:
        errs["text_embeds"] = assert_close(got.text_embeds, out.text_embeds, FP32_TOL, "text_embeds")
    else:
        errs["pooled"] = assert_close(got.pooled, out.pooler_output, FP32_TOL, "pooled")
    print(f"{case[0]}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))


def test_clip_prefixless_keys_and_early_exit():
    """transformers >= 5.6 saves CLIPTextModel without `text_model.`; hub folders have it. Both load."""
    ref = reference_clip(False, hidden_act="quick_gelu")
    cfg = clip_config(ref.config.to_dict(), False)
    state = state_dict_numpy(ref)
    flipped = {
        (k[len("text_model.") :] if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()
    }
    a = convert_weights("text_encoder", cfg, state)
    b = convert_weights("text_encoder", cfg, flipped)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    ours = load_ours(cfg, a)
    ids = mx.array(token_batch(49407, lengths=(3,)))
    full = ours(ids)
    early = ours(ids, num_layers=2)
    assert len(early.hidden_states) == 3
    assert mx.array_equal(early.hidden_states[2], full.hidden_states[2])


def reference_openclip(seed=0, layers=4, output_dim=24):
    TextTransformer = open_clip_module("transformer").TextTransformer
    torch.manual_seed(seed)
    model = TextTransformer(
        context_length=77,
        vocab_size=49408,
        width=64,
        heads=4,
        layers=layers,
        output_dim=output_dim,
        act_layer=torch.nn.GELU,
    )
    return randomize(model, seed)


def test_openclip_text_tower_matches_open_clip():
    """SDXL's encoder 2 layout: all layers kept, pooled at argmax, projected by text_projection."""
    ref = reference_openclip()
    state = state_dict_numpy(ref)
    cfg = openclip_config({k: v.shape for k, v in state.items()}, heads=4)
    ours = load_ours(cfg, apply_rules("text_encoder", state, openclip_rules(), _shapes(cfg)))
    ids = token_batch(0)
    with torch.no_grad():
        pooled_proj, tokens = ref(torch.from_numpy(ids)), None
        # open_clip returns the projected pooled embedding; recompute the per-token states it saw.
        x = ref.token_embedding(torch.from_numpy(ids)) + ref.positional_embedding
        states = [x]
        for block in ref.transformer.resblocks:
            x = block(x, attn_mask=ref.attn_mask)
            states.append(x)
        tokens = ref.ln_final(x)
    got = ours(mx.array(ids))
    for i, (a, b) in enumerate(zip(got.hidden_states, states)):
        assert_close(a, b, FP32_TOL, f"openclip hidden state {i}")
    e1 = assert_close(got.last_hidden_state, tokens, FP32_TOL, "openclip ln_final")
    e2 = assert_close(got.text_embeds, pooled_proj, FP32_TOL, "openclip projected pooled")
    print(f"openclip: last {e1:.2e}, projected pooled {e2:.2e}")


def test_openclip_sd2_penultimate_matches_ldm():
    """SD2's layout: the original FrozenOpenCLIPEmbedder runs all but the last block, then ln_final."""
    ref = reference_openclip(layers=4)
    state = state_dict_numpy(ref)
    cfg = openclip_config({k: v.shape for k, v in state.items()}, keep_layers=3, heads=4)
    ours = load_ours(cfg, apply_rules("text_encoder", state, openclip_rules(drop_layers=[3]), _shapes(cfg)))
    ids = token_batch(0, seed=3)
    with torch.no_grad():
        # ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder.encode_with_transformer, layer="penultimate"
        x = ref.token_embedding(torch.from_numpy(ids)) + ref.positional_embedding
        for block in ref.transformer.resblocks[:-1]:
            x = block(x, attn_mask=ref.attn_mask)
        expected = ref.ln_final(x)
    err = assert_close(ours(mx.array(ids)).last_hidden_state, expected, FP32_TOL, "sd2 penultimate")
    print(f"openclip sd2 penultimate: {err:.2e}")


def _shapes(cfg):
    from mlx_sd.components import parameter_shapes

    return parameter_shapes(build(cfg))
