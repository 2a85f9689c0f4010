"""Parity of the SD3 / SD3.5 MMDiT (mlx_sd/models/mmdit.py) with diffusers' SD3Transformer2DModel, on tiny random-weight
configurations: converted from a diffusers state dict (convert/diffusers.py) and from Stability's single-file layout
(convert/sd3.py), whose test-side writer is checked against diffusers' own single-file converter."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd.components import build, load_component, save_component
from mlx_sd.models import MMDiTConfig
from mlx_sd_convert.diffusers import convert_weights, mmdit_config
from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.sd3 import PREFIX, convert_mmdit, is_sd3, mmdit_config_from_checkpoint, mmdit_prefix
from oracles import assert_close, load_ours, nchw_to_nhwc, randomize, state_dict_numpy

FP32_TOL = 1e-4
FP16_TOL = 2e-2  # half precision through 3 blocks of attention, adaLN and feed-forwards

TINY = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    caption_projection_dim=32,
    pooled_projection_dim=20,
    out_channels=16,
    pos_embed_max_size=16,
)
VARIANTS = {
    "sd3-medium": {},
    "sd35-large": dict(qk_norm="rms_norm"),
    "sd35-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1)),
}
# Stability's files fix the head width at 64 (convert/sd3.py infers heads = width / 64).
SINGLE_FILE = dict(attention_head_dim=64, caption_projection_dim=128)


def reference(variant: str, seed: int = 0, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    ref = randomize(SD3Transformer2DModel(**{**TINY, **VARIANTS[variant], **overrides}), seed)
    with torch.no_grad():  # the position table is a buffer: random too, so that a wrong crop cannot pass
        g = torch.Generator().manual_seed(seed + 1)
        ref.pos_embed.pos_embed.copy_(torch.randn(ref.pos_embed.pos_embed.shape, generator=g))
    return ref


def inputs(cfg, size, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, *size, generator=g)
    context = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([999.0, 17.5][:batch])  # sigma * 1000: per sample, one fractional
    return x, t, context, pooled


def run_pair(ref, ours, x, t, context, pooled, dtype=mx.float32, timestep=None):
    with torch.no_grad():
        expected = ref(x, context, pooled, t).sample
    cast = lambda a: mx.array(a.numpy()).astype(dtype)  # noqa: E731
    got = ours(nchw_to_nhwc(x).astype(dtype), mx.array(t.numpy()) if timestep is None else timestep, cast(context),
               cast(pooled))  # fmt: skip
    return nchw_to_nhwc(expected), got


# 8x8 and 6x10 patches (centre crops, non-square), 16x16 (the whole table; enough tokens for the CPU's blocked
# attention path), 15x3 (off-centre crop offsets).
CASES = [(v, s) for v in VARIANTS for s in ((16, 16), (12, 20))] + [("sd3-medium", (32, 32)), ("sd35-medium", (30, 6))]


@pytest.mark.parametrize("variant,size", CASES, ids=[f"{v}-{h}x{w}" for v, (h, w) in CASES])
def test_mmdit_matches_diffusers(variant, size):
    ref = reference(variant)
    cfg = mmdit_config(dict(ref.config))
    assert cfg.dual_attention_layers == tuple(VARIANTS[variant].get("dual_attention_layers", ()))
    ours = load_ours(cfg, convert_weights("transformer", cfg, state_dict_numpy(ref)))
    expected, got = run_pair(ref, ours, *inputs(cfg, size))
    err = assert_close(got, expected, FP32_TOL, f"mmdit {variant} {size}")
    print(f"mmdit {variant} {size}: fp32 rel err {err:.2e}, max abs {np.abs(np.array(got - expected)).max():.2e}")


def test_mmdit_scalar_timestep_and_fp16():
    ref = reference("sd35-medium", seed=3)
    cfg = mmdit_config(dict(ref.config))
    weights = convert_weights("transformer", cfg, state_dict_numpy(ref))
    x, _, context, pooled = inputs(cfg, (12, 8), batch=1, seed=2)
    t = torch.tensor([500.0])
    for dtype, tol in ((mx.float32, FP32_TOL), (mx.float16, FP16_TOL)):
        expected, got = run_pair(ref, load_ours(cfg, weights, dtype), x, t, context, pooled, dtype, timestep=500.0)
        assert got.dtype == dtype and bool(mx.isfinite(got).all())
        err = assert_close(got, expected, tol, f"mmdit {dtype}")
        print(f"mmdit sd35-medium scalar t {dtype}: rel err {err:.2e}")


def test_mmdit_component_folder_round_trip(tmp_path):
    """The "mmdit" kind is registered: a component folder saves and loads strictly."""
    ref = reference("sd35-large")
    cfg = mmdit_config(dict(ref.config))
    weights = convert_weights("transformer", cfg, state_dict_numpy(ref))
    save_component(tmp_path / "transformer", cfg, {k: mx.array(v) for k, v in weights.items()})
    expected, got = run_pair(ref, load_component(tmp_path / "transformer"), *inputs(cfg, (8, 8)))
    assert_close(got, expected, FP32_TOL, "mmdit from its component folder")


def test_mmdit_refuses_latents_it_cannot_take():
    ours = build(mmdit_config(dict(reference("sd3-medium").config)))
    args = (mx.array([1.0]), mx.zeros((1, 7, 24)), mx.zeros((1, 20)))
    with pytest.raises(ValueError, match=r"latent size 34x32 .*at most 16x16 patches \(pos_embed_max_size\)"):
        ours(mx.zeros((1, 34, 32, 16)), *args)
    with pytest.raises(ValueError, match="15x16 is not a multiple of the patch size 2"):
        ours(mx.zeros((1, 15, 16, 16)), *args)


@pytest.mark.parametrize(
    "setting,match",
    [
        (dict(use_pos_embed_interpolation=True), r"unknown settings \['use_pos_embed_interpolation'\]"),
        (dict(qk_norm="layer_norm"), "qk_norm='layer_norm'"),
        (dict(pos_embed_max_size=None), "pos_embed_max_size=None"),
        (dict(caption_projection_dim=48), "caption_projection_dim 48 must equal"),
    ],
)
def test_mmdit_config_refuses_what_it_does_not_implement(setting, match):
    config = {**TINY, "_class_name": "SD3Transformer2DModel", "_diffusers_version": "0.42.1", **setting}
    with pytest.raises(ConversionError, match=match):
        mmdit_config(config)


# --- Stability's single-file layout ------------------------------------------------------------------------


def _swap(value: np.ndarray) -> np.ndarray:
    first, second = np.split(value, 2, axis=0)
    return np.concatenate([second, first], axis=0)


def to_single_file(sd: dict[str, np.ndarray], num_layers: int, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """diffusers names -> Stability's (sd3_impls/mmdit.py): fused qkv, (shift, scale) final modulations. Written
    independently of convert/sd3.py's rules; every diffusers tensor must be used."""
    sd, out = dict(sd), {}
    pop = sd.pop
    out["pos_embed"] = pop("pos_embed.pos_embed")
    for p in ("weight", "bias"):
        out[f"x_embedder.proj.{p}"] = pop(f"pos_embed.proj.{p}")
        for sai, ours in (("t_embedder", "timestep_embedder"), ("y_embedder", "text_embedder")):
            out[f"{sai}.mlp.0.{p}"] = pop(f"time_text_embed.{ours}.linear_1.{p}")
            out[f"{sai}.mlp.2.{p}"] = pop(f"time_text_embed.{ours}.linear_2.{p}")
        out[f"context_embedder.{p}"] = pop(f"context_embedder.{p}")
        out[f"final_layer.linear.{p}"] = pop(f"proj_out.{p}")
        out[f"final_layer.adaLN_modulation.1.{p}"] = _swap(pop(f"norm_out.linear.{p}"))
        for i in range(num_layers):
            b, t = f"joint_blocks.{i}", f"transformer_blocks.{i}"
            x, c = f"{b}.x_block", f"{b}.context_block"
            out[f"{x}.attn.qkv.{p}"] = np.concatenate([pop(f"{t}.attn.to_{n}.{p}") for n in "qkv"])
            out[f"{c}.attn.qkv.{p}"] = np.concatenate([pop(f"{t}.attn.add_{n}_proj.{p}") for n in "qkv"])
            out[f"{x}.attn.proj.{p}"] = pop(f"{t}.attn.to_out.0.{p}")
            out[f"{x}.adaLN_modulation.1.{p}"] = pop(f"{t}.norm1.linear.{p}")
            out[f"{x}.mlp.fc1.{p}"] = pop(f"{t}.ff.net.0.proj.{p}")
            out[f"{x}.mlp.fc2.{p}"] = pop(f"{t}.ff.net.2.{p}")
            if i < num_layers - 1:
                out[f"{c}.attn.proj.{p}"] = pop(f"{t}.attn.to_add_out.{p}")
                out[f"{c}.adaLN_modulation.1.{p}"] = pop(f"{t}.norm1_context.linear.{p}")
                out[f"{c}.mlp.fc1.{p}"] = pop(f"{t}.ff_context.net.0.proj.{p}")
                out[f"{c}.mlp.fc2.{p}"] = pop(f"{t}.ff_context.net.2.{p}")
            else:  # the pre-only text stream: AdaLayerNormContinuous
                out[f"{c}.adaLN_modulation.1.{p}"] = _swap(pop(f"{t}.norm1_context.linear.{p}"))
            if f"{t}.attn2.to_q.{p}" in sd:
                out[f"{x}.attn2.qkv.{p}"] = np.concatenate([pop(f"{t}.attn2.to_{n}.{p}") for n in "qkv"])
                out[f"{x}.attn2.proj.{p}"] = pop(f"{t}.attn2.to_out.0.{p}")
    for i in range(num_layers):
        t, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        for ours, sai in (("attn.norm_q", f"{x}.attn.ln_q"), ("attn.norm_k", f"{x}.attn.ln_k"),
                          ("attn.norm_added_q", f"{c}.attn.ln_q"), ("attn.norm_added_k", f"{c}.attn.ln_k"),
                          ("attn2.norm_q", f"{x}.attn2.ln_q"), ("attn2.norm_k", f"{x}.attn2.ln_k")):  # fmt: skip
            if f"{t}.{ours}.weight" in sd:
                out[f"{sai}.weight"] = pop(f"{t}.{ours}.weight")
    assert not sd, f"diffusers tensors the writer left out: {sorted(sd)}"
    return {prefix + k: v for k, v in out.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_writer_agrees_with_diffusers_converter(variant):
    """The test's writer is the exact inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    ref = reference(variant, **SINGLE_FILE)
    sd = state_dict_numpy(ref)
    single = {k: torch.from_numpy(v.copy()) for k, v in to_single_file(sd, ref.config.num_layers).items()}
    back = convert_sd3_transformer_checkpoint_to_diffusers(single)
    assert not single, f"tensors diffusers' converter did not read: {sorted(single)}"
    assert sorted(back) == sorted(sd)
    for k, v in back.items():
        assert np.array_equal(v.numpy(), sd[k]), k


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("prefix", [PREFIX, ""], ids=["full-file", "bare"])
def test_single_file_matches_diffusers(variant, prefix):
    ref = reference(variant, **SINGLE_FILE)
    sd = state_dict_numpy(ref)
    single = to_single_file(sd, ref.config.num_layers, prefix)
    if prefix:  # a whole file holds the other components too; a bare one is the transformer alone
        single["first_stage_model.decoder.conv_in.weight"] = np.zeros((4, 4, 3, 3), np.float32)
    assert is_sd3(single) and mmdit_prefix(single) == prefix

    cfg, weights = convert_mmdit(single)
    assert cfg == replace(mmdit_config(dict(ref.config)), sample_size=cfg.sample_size)
    expected_weights = convert_weights("transformer", cfg, sd)
    assert sorted(weights) == sorted(expected_weights)
    for k, v in weights.items():
        assert np.array_equal(v, expected_weights[k]), k
    expected, got = run_pair(ref, load_ours(cfg, weights), *inputs(cfg, (12, 20)))
    err = assert_close(got, expected, FP32_TOL, f"mmdit single file {variant}")
    print(f"mmdit single file {variant} ({prefix or 'bare'}): fp32 rel err {err:.2e}")


# Stability's releases, as diffusers publishes their transformer/config.json: (layers, dual layers, qk_norm, table).
RELEASES = {
    "sd3_medium": (24, (), None, 192),
    "sd3.5_large": (38, (), "rms_norm", 192),
    "sd3.5_medium": (24, tuple(range(13)), "rms_norm", 384),
}


@pytest.mark.parametrize("release", list(RELEASES))
def test_single_file_config_of_the_releases(release):
    """The inferred config of each release's shapes (written here without tensors) is diffusers' published one."""
    layers, dual, qk_norm, table = RELEASES[release]
    D = 64 * layers  # Stability's MMDiT: depth = width / 64 (sd3_infer.py)
    shapes = {
        "x_embedder.proj.weight": (D, 16, 2, 2),
        "pos_embed": (1, table * table, D),
        "context_embedder.weight": (D, 4096),
        "y_embedder.mlp.0.weight": (D, 2048),
        "final_layer.linear.weight": (64, D),
    }
    for i in range(layers):
        shapes[f"joint_blocks.{i}.x_block.attn.qkv.weight"] = (3 * D, D)
        if qk_norm:
            shapes[f"joint_blocks.{i}.x_block.attn.ln_q.weight"] = (64,)
        if i in dual:
            shapes[f"joint_blocks.{i}.x_block.attn2.qkv.weight"] = (3 * D, D)
    assert mmdit_config_from_checkpoint(shapes) == MMDiTConfig(
        sample_size=128,
        patch_size=2,
        in_channels=16,
        num_layers=layers,
        attention_head_dim=64,
        num_attention_heads=layers,
        joint_attention_dim=4096,
        caption_projection_dim=D,
        pooled_projection_dim=2048,
        out_channels=16,
        pos_embed_max_size=table,
        dual_attention_layers=dual,
        qk_norm=qk_norm,
    )


def test_single_file_detection():
    assert not is_sd3(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"])
    assert mmdit_prefix(["model.diffusion_model.input_blocks.0.0.weight"]) is None
    with pytest.raises(ConversionError, match="not an SD3"):
        convert_mmdit({"model.diffusion_model.input_blocks.0.0.weight": np.zeros((1,))})


def test_single_file_names_tensors_it_cannot_place():
    ref = reference("sd3-medium", **SINGLE_FILE)
    sd = state_dict_numpy(ref)
    single = to_single_file(sd, ref.config.num_layers)
    extra = dict(single)
    # a text feed-forward in the last (pre-only) block: not a parameter of this model
    extra[f"{PREFIX}joint_blocks.2.context_block.mlp.fc1.weight"] = np.zeros((512, 128), np.float32)
    extra[f"{PREFIX}register_tokens"] = np.zeros((1, 4, 128), np.float32)
    with pytest.raises(ConversionError, match=r"(?s)match no rule \(register_tokens\).*not parameters.*mlp\.fc1"):
        convert_mmdit(extra)
    missing = dict(single)
    del missing[f"{PREFIX}joint_blocks.1.x_block.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"missing from the checkpoint \(transformer_blocks\.1\.ff\.net\.2\.bias"):
        convert_mmdit(missing)
