"""SD3 / SD3.5 ControlNets against diffusers: SD3ControlNetModel read from a diffusers folder (InstantX's kind: joint
blocks, own position table, zero pooled input; Stability's SD3.5 kind: image-only blocks, the MMDiT's patch
embedding), the MMDiT adding their residuals, and generation against StableDiffusion3ControlNetPipeline."""

from __future__ import annotations

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import tiny_controlnet
from test_pipeline import as_array, generators
from tiny_sd3 import TRANSFORMER, sd3_folder, tiny_sd3

from mlx_sd.controlnet import ControlNetUnit
from mlx_sd.pipeline import Pipeline
from mlx_sd_convert.controlnet import is_control_config, read_controlnet
from oracles import assert_close, psnr, randomize

PROMPT = "a red lighthouse on mars, photo"
MIN_PSNR = 50.0  # 8-bit rounding gives ~59 dB; a guidance window off by one step gives far less
# A 4-block MMDiT (SD3.5 large's qk norms) and 2-block ControlNets: residual int(i / 2) after block i, none after the
# last, as diffusers' interval_control.
MMDIT = dict(TRANSFORMER, num_layers=4, qk_norm="rms_norm")
INSTANTX = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
                pos_embed_max_size=32)  # fmt: skip
# as diffusers' scripts/convert_sd3_controlnet_to_diffusers.py configures Stability's SD3.5 large ControlNets
SD35 = dict(INSTANTX, joint_attention_dim=None, caption_projection_dim=2048, pos_embed_max_size=None,
            pos_embed_type=None, use_pos_embed=False, force_zeros_for_pooled_projection=False)  # fmt: skip
KINDS = {"instantx": INSTANTX, "sd35": SD35}


def control_image(seed: int, size=(64, 64)) -> Image.Image:
    rough = np.random.default_rng(seed).integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(rough).resize(size, Image.NEAREST)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd3cn")
    pipe = tiny_sd3(tmp, seed=5, transformer=MMDIT)
    pipe.set_progress_bar_config(disable=True)
    return pipe, Pipeline(sd3_folder(pipe, tmp / "mlx"))


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """kind -> (the diffusers SD3ControlNetModel, ours read from its saved folder)."""
    from diffusers import SD3ControlNetModel

    tmp = tmp_path_factory.mktemp("sd3controlnets")
    out = {}
    for i, (kind, config) in enumerate(KINDS.items()):
        reference = randomize(SD3ControlNetModel(**config), 20 + i)
        if reference.pos_embed is not None:
            with torch.no_grad():  # a buffer: random too, so that a wrong table cannot pass
                g = torch.Generator().manual_seed(i)
                reference.pos_embed.pos_embed.copy_(torch.randn(reference.pos_embed.pos_embed.shape, generator=g))
        reference.save_pretrained(tmp / kind)
        assert is_control_config(tmp / kind / "config.json")
        out[kind] = (reference, read_controlnet(tmp / kind, mx.float32))
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_sd3_controlnet_residuals_match_diffusers(sd3, controlnets, kind):
    ref_pipe, ours_pipe = sd3
    reference, ours = controlnets[kind]
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 16, 8, 12, generator=g)
    context, pooled = torch.randn(2, 7, 64, generator=g), torch.randn(2, 32, generator=g)
    timestep = torch.tensor([700.0, 250.5])
    if kind == "sd35":  # diffusers' pipeline gives it the transformer's patch embedding
        reference.pos_embed = reference._get_pos_embed_from_transformer(ref_pipe.transformer)
    try:
        with torch.no_grad():
            expected = reference(x, cond, 1.0, context if kind == "instantx" else None, pooled, timestep,
                                 return_dict=False)[0]  # fmt: skip
    finally:
        if kind == "sd35":
            reference.pos_embed = None
    nhwc = lambda t: mx.array(t.permute(0, 2, 3, 1).numpy())  # noqa: E731
    got = ours.model(nhwc(x), mx.array(timestep.numpy()), mx.array(context.numpy()) if kind == "instantx" else None,
                     mx.array(pooled.numpy()), nhwc(cond), ours_pipe.model.unet.pos_embed)  # fmt: skip
    assert len(got) == len(expected) == 2
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, 1e-5, f"{kind} residual {i}")
    # the MMDiT adds them as diffusers' transformer does
    with torch.no_grad():
        want = ref_pipe.transformer(x, context, pooled, timestep, block_controlnet_hidden_states=expected,
                                    return_dict=False)[0]  # fmt: skip
    out = ours_pipe.model.unet(nhwc(x), mx.array(timestep.numpy()), mx.array(context.numpy()),
                               mx.array(pooled.numpy()), controlnet_residuals=got)  # fmt: skip
    assert_close(out, want.permute(0, 2, 3, 1), 1e-5, f"{kind} MMDiT with residuals")


@pytest.mark.parametrize("kind,weight,start,end", [("instantx", 0.7, 0.0, 1.0), ("sd35", 1.3, 0.2, 0.8)])
def test_sd3_controlnet_pipeline_matches_diffusers(sd3, controlnets, monkeypatch, kind, weight, start, end):
    """Generation with one unit against StableDiffusion3ControlNetPipeline. diffusers samples the control image's
    latents with an unseeded generator; mlx-sd takes the VAE's mean, as diffusers is made to here."""
    from diffusers import StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    ref_pipe, ours = sd3
    reference, controlnet = controlnets[kind]
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    image = control_image(4)
    pipe = StableDiffusion3ControlNetPipeline(**ref_pipe.components, controlnet=reference)
    pipe.set_progress_bar_config(disable=True)
    try:
        expected = pipe(PROMPT, negative_prompt="blurry", control_image=image, width=64, height=64,
                        num_inference_steps=5, guidance_scale=5.0, controlnet_conditioning_scale=weight,
                        control_guidance_start=start, control_guidance_end=end, generator=generators(7, 1),
                        output_type="np").images  # fmt: skip
    finally:
        reference.pos_embed = reference.pos_embed if kind == "instantx" else None
    unit = ControlNetUnit(controlnet, image, weight, start, end)
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", width=64, height=64, steps=5, guidance=5.0, seed=7)
    result = ours.generate(**kwargs, controlnet=(unit,))
    value = psnr(as_array(result.images), expected, data_range=1.0)
    print(f"sd3 controlnet {kind}: PSNR {value:.1f} dB")
    assert value >= MIN_PSNR, f"sd3 controlnet {kind} w={weight} [{start}, {end}]: PSNR {value:.1f} dB"
    plain = ours.generate(**kwargs)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))  # the control acted


def test_two_sd3_units_and_skip_layer_guidance_run(sd3, controlnets):
    """Two units sum (diffusers' SD3MultiControlNetModel); skip-layer guidance's second pass gets the residuals."""
    _, ours = sd3
    units = tuple(ControlNetUnit(controlnets[k][1], control_image(i), 0.5) for i, k in enumerate(KINDS))
    kwargs = dict(prompt=PROMPT, width=64, height=64, steps=3, guidance=4.0, seed=1)
    both = ours.generate(**kwargs, controlnet=units)
    one = ours.generate(**kwargs, controlnet=units[:1])
    assert not np.array_equal(np.asarray(both.images[0]), np.asarray(one.images[0]))
    ours.generate(**kwargs, controlnet=units, skip_guidance_layers=(1,))


def test_unet_controlnets_refused_on_sd3_and_sd3_ones_on_unets(sd3, controlnets, sd1, tmp_path):
    _, ours = sd3
    image = control_image(0)
    tiny_controlnet("sd1", 1).save_pretrained(tmp_path / "sd1cn")
    unet_cn, sd3_cn = read_controlnet(tmp_path / "sd1cn", mx.float32), controlnets["instantx"][1]
    assert sd3_cn.is_sd3 and not unet_cn.is_sd3
    request = dict(prompt=PROMPT, width=64, height=64, steps=1)
    with pytest.raises(ValueError, match="is a UNet ControlNet.*this is an SD3 model"):
        ours.generate(**request, controlnet=(ControlNetUnit(unet_cn, image),))
    with pytest.raises(ValueError, match="is an SD3 ControlNet.*this is an SD 1.x/2.x/XL model"):
        sd1[1].generate(**request, controlnet=(ControlNetUnit(sd3_cn, image),))
    refused = {
        "reference-only": ControlNetUnit(None, image, module="reference_only"),
        "control_mode controlnet": ControlNetUnit(sd3_cn, image, control_mode="controlnet"),
        "inpainting modules": ControlNetUnit(sd3_cn, image, module="inpaint"),
    }
    for what, unit in refused.items():
        with pytest.raises(ValueError, match=what):
            ours.generate(**request, controlnet=(unit,))


def test_sd3_controlnet_config_refusals():
    from mlx_sd_convert.controlnet import sd3_controlnet_config
    from mlx_sd_convert.diffusers import ConversionError

    with pytest.raises(ConversionError, match="unknown settings"):
        sd3_controlnet_config({**INSTANTX, "mystery": 1})
    with pytest.raises(ConversionError, match="caption_projection_dim"):
        sd3_controlnet_config({**INSTANTX, "caption_projection_dim": 32})
    assert sd3_controlnet_config(json.loads(json.dumps(SD35))).joint is False


def stability_names(state: dict) -> dict:
    """A diffusers SD3.5 ControlNet's tensors in Stability's file names (diffusers' conversion script, inverted)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("transformer_blocks.") and parts[3] in ("to_k", "to_v"):
            continue
        if key.startswith("transformer_blocks.") and parts[3] == "to_q":
            prefix = ".".join(parts[:2])
            fused = [state[f"{prefix}.attn.{n}.{parts[-1]}"] for n in ("to_q", "to_k", "to_v")]
            out[f"{prefix}.attn.qkv.{parts[-1]}"] = torch.cat(fused)
            continue
        for ours, theirs in (("attn.to_out.0", "attn.proj"), ("ff.net.0.proj", "mlp.fc1"), ("ff.net.2", "mlp.fc2"),
                             ("norm1.linear", "adaLN_modulation.1")):  # fmt: skip
            key = key.replace(ours, theirs)
        out[key] = value.contiguous()
    return out


def test_sd35_single_file_reads_as_its_diffusers_folder(tmp_path):
    """Stability's sd3.5_large_controlnet_*.safetensors layout (64-channel heads, as the real ones), against the
    same network saved as a diffusers folder: the same config and, bit for bit, the same parameters."""
    from diffusers import SD3ControlNetModel
    from mlx.utils import tree_flatten
    from safetensors.torch import save_file

    reference = randomize(SD3ControlNetModel(**{**SD35, "num_attention_heads": 1, "attention_head_dim": 64}), 31)
    reference.save_pretrained(tmp_path / "folder")
    path = tmp_path / "sd3.5_large_controlnet_canny.safetensors"
    save_file(stability_names(reference.state_dict()), str(path))
    folder, single = read_controlnet(tmp_path / "folder", mx.float32), read_controlnet(path, mx.float32)
    assert single.title.startswith("sd3.5_large_controlnet_canny [") and single.is_sd3
    informational = {k: getattr(folder.model.config, k) for k in ("sample_size", "caption_projection_dim")}
    assert replace(single.model.config, **informational) == folder.model.config
    mine, theirs = dict(tree_flatten(single.model.parameters())), dict(tree_flatten(folder.model.parameters()))
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert mx.array_equal(value, theirs[key]).item(), key


def test_sd3_controlnet_from_cli(sd3, controlnets, tmp_path):
    """`mlx-sd generate --controlnet NAME IMAGE --controlnet-dir DIR` on an SD3 model: the library's image."""
    from test_cli import run

    _, ours = sd3
    controlnets["instantx"][0].save_pretrained(tmp_path / "cns" / "sd3-canny")
    control_image(2).save(tmp_path / "control.png")
    out = run("generate", PROMPT, "--model", ours.model.folder, "--width", 64, "--height", 64, "--steps", 3, "--seed",
              5, "--controlnet", "sd3-canny", tmp_path / "control.png", "--controlnet-dir", tmp_path / "cns",
              "--control-weight", 0.8, "--output", tmp_path / "out.png")  # fmt: skip
    assert out.returncode == 0, out.stderr
    unit = ControlNetUnit(controlnets["instantx"][1], Image.open(tmp_path / "control.png"), 0.8)
    expected = ours.generate(prompt=PROMPT, width=64, height=64, steps=3, seed=5, controlnet=(unit,))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out.png")), np.asarray(expected.images[0]))
