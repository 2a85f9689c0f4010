"""IP-Adapter: the CLIP image tower against transformers, the image processing against CLIPImageProcessor, and
generation against diffusers' `load_ip_adapter` (SD 1.x and SDXL), on tiny random-weight models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_pipeline import PROMPT, as_array, diffusers_pipe, generators
from test_sdxl_pipeline import sdxl, xl_pipe  # noqa: F401  (the SDXL fixture)

from mlx_sd.ip_adapter import pixels
from mlx_sd.pipeline import Pipeline
from mlx_sd_convert.controlnet import a1111_hash
from mlx_sd_convert.ip_adapter import read_image_encoder, read_ip_adapter
from mlx_sd_convert.keymap import ConversionError
from oracles import assert_close, psnr, randomize

MIN_PSNR = 50.0  # the images agree to 8-bit rounding (~59 dB)
SCHEDULER = "EulerDiscreteScheduler"
ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
               patch_size=8, projection_dim=16, hidden_act="gelu")  # fmt: skip


def tiny_encoder(folder, seed: int = 21):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER)), seed)
    encoder.save_pretrained(folder)
    return encoder


def tiny_ip_state(unet, seed: int = 22, tokens: int = 4) -> dict[str, torch.Tensor]:
    """An IP-Adapter for `unet` (diffusers): image_proj and to_k_ip / to_v_ip for every cross-attention layer,
    numbered 1, 3, 5, ... in the order of diffusers' attention processors, as the published files are."""
    g = torch.Generator().manual_seed(seed)
    dim = unet.config.cross_attention_dim
    state = {
        "image_proj.proj.weight": torch.randn(tokens * dim, ENCODER["projection_dim"], generator=g) / 4,
        "image_proj.proj.bias": 0.2 * torch.randn(tokens * dim, generator=g),
        "image_proj.norm.weight": 1 + 0.2 * torch.randn(dim, generator=g),
        "image_proj.norm.bias": 0.2 * torch.randn(dim, generator=g),
    }
    modules = dict(unet.named_modules())
    cross = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    for i, name in enumerate(cross):
        inner = modules[name].to_k.out_features
        for kind in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{kind}.weight"] = torch.randn(inner, dim, generator=g) / dim**0.5
    return state


def tiny_plus_state(unet, seed: int = 25, tokens: int = 6, hidden: int = 48, depth: int = 4) -> dict:
    """An IP-Adapter Plus for `unet` in the original Resampler names (h94/IP-Adapter's plus files): learned queries,
    perceiver attention (norm1 on the image tokens, norm2 on the queries, fused to_kv), a GELU feed-forward."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=None):
        return torch.randn(*shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    dim, width, inner, ffn = unet.config.cross_attention_dim, ENCODER["hidden_size"], 64, 4 * hidden
    state = {"image_proj.latents": rand(1, tokens, hidden, scale=1.0), "image_proj.proj_in.weight": rand(hidden, width),
             "image_proj.proj_in.bias": rand(hidden, scale=0.2), "image_proj.proj_out.weight": rand(dim, hidden),
             "image_proj.proj_out.bias": rand(dim, scale=0.2), "image_proj.norm_out.weight": 1 + rand(dim, scale=0.2),
             "image_proj.norm_out.bias": rand(dim, scale=0.2)}  # fmt: skip
    for i in range(depth):
        p = f"image_proj.layers.{i}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            state[f"{p}.{norm}.weight"], state[f"{p}.{norm}.bias"] = (
                1 + rand(hidden, scale=0.2),
                rand(hidden, scale=0.2),
            )
        state |= {f"{p}.0.to_q.weight": rand(inner, hidden), f"{p}.0.to_kv.weight": rand(2 * inner, hidden),
                  f"{p}.0.to_out.weight": rand(hidden, inner), f"{p}.1.1.weight": rand(ffn, hidden),
                  f"{p}.1.3.weight": rand(hidden, ffn)}  # fmt: skip
    layers = {k: v for k, v in tiny_ip_state(unet, seed + 1).items() if k.startswith("ip_adapter.")}
    return state | layers


def test_image_encoder_and_processing_match_transformers(tmp_path):
    from transformers import CLIPImageProcessor

    reference = tiny_encoder(tmp_path / "encoder")
    ours = read_image_encoder(tmp_path / "encoder", mx.float32)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(pixel_values=x).image_embeds
    assert_close(ours(mx.array(x.permute(0, 2, 3, 1).numpy())), expected, 1e-5, "image embeds")

    processor = CLIPImageProcessor(size=32, crop_size=32)  # what diffusers' load_ip_adapter makes for this encoder
    for size in ((50, 40), (40, 71), (32, 32)):
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        expected = processor(image, return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.array(pixels(image, 32)), expected, atol=2e-6)


@pytest.fixture(scope="module")
def adapter_files(sd1, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ip-adapter")
    parts, _ = sd1
    encoder = tiny_encoder(tmp / "image_encoder")
    state = tiny_ip_state(parts["unet"])
    save_file({k: v.contiguous() for k, v in state.items()}, tmp / "ip.safetensors")
    nested = {"image_proj": {}, "ip_adapter": {}}  # the .bin layout: a state dict per part
    for key, value in state.items():
        part, rest = key.split(".", 1)
        nested[part][rest] = value
    torch.save(nested, tmp / "ip.bin")
    return tmp, encoder


def compare(pipe, model, folder, weights: str, encoder, image, scale: float, seed: int, guidance: float, what: str):
    """diffusers' `pipe` with `load_ip_adapter(folder, weights)` against our pipeline on `model` with the same adapter,
    both at 64x64 in 4 Euler steps; returns our result."""
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weights)
    pipe.set_ip_adapter_scale(scale)
    expected = pipe(PROMPT, ip_adapter_image=image, width=64, height=64, num_inference_steps=4, guidance_scale=guidance,
                    generator=generators(seed, 1), output_type="np").images  # fmt: skip
    ours = Pipeline(model, ip_adapter=read_ip_adapter(folder / weights, encoder, mx.float32))
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=guidance, seed=seed, sampler=SCHEDULER,
                           ip_adapter_image=image, ip_adapter_scale=scale)  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    assert value >= MIN_PSNR, f"{what}: PSNR {value:.1f} dB"
    return result, expected


@pytest.mark.parametrize("weights,scale,guidance", [("ip.safetensors", 0.7, 6.0), ("ip.bin", 1.0, 1.0)])
def test_sd1_matches_diffusers_load_ip_adapter(sd1, adapter_files, weights, scale, guidance):
    parts, _ = sd1
    tmp, encoder = adapter_files
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 40, 3), dtype=np.uint8))
    pipe = diffusers_pipe("StableDiffusionPipeline", {**parts, "image_encoder": encoder}, SCHEDULER)
    result, expected = compare(pipe, sd1[1].model, tmp, weights, tmp / "image_encoder", image, scale, 4, guidance,
                               weights)  # fmt: skip
    assert f"IP-Adapter: ip [{a1111_hash(tmp / weights)}], IP-Adapter weight: {scale}" in result.infotexts[0]
    plain = sd1[1].generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=guidance, seed=4, sampler=SCHEDULER)
    assert psnr(as_array(plain.images), expected, data_range=1.0) < 40  # the image prompt acted


@pytest.mark.parametrize("mode", ["img2img", "controlnet"])
def test_with_img2img_and_a_controlnet_matches_diffusers(sd1, adapter_files, mode, tmp_path):
    """The image prompt beside an init image, and beside a ControlNet (whose own attention sees no image tokens)."""
    from test_controlnet import tiny_controlnet

    from mlx_sd.controlnet import ControlNetUnit
    from mlx_sd_convert.controlnet import read_controlnet

    parts, _ = sd1
    tmp, encoder = adapter_files
    rng = np.random.default_rng(12)
    image = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
    other = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    common = dict(num_inference_steps=5, guidance_scale=5.0, generator=generators(2, 1), output_type="np")
    ours_kwargs = dict(steps=5, guidance=5.0, seed=2, sampler=SCHEDULER, ip_adapter_image=image, ip_adapter_scale=0.8)
    if mode == "img2img":
        pipe = diffusers_pipe("StableDiffusionImg2ImgPipeline", {**parts, "image_encoder": encoder}, SCHEDULER)
        call = dict(image=other, strength=0.7)
        ours_kwargs |= dict(init_image=other, strength=0.7)
    else:
        reference = tiny_controlnet("sd1", 14)
        reference.save_pretrained(tmp_path / "cn")
        pipe = diffusers_pipe("StableDiffusionControlNetPipeline",
                              {**parts, "image_encoder": encoder, "controlnet": reference}, SCHEDULER)  # fmt: skip
        call = dict(image=other, width=64, height=64, controlnet_conditioning_scale=0.8)
        unit = ControlNetUnit(read_controlnet(tmp_path / "cn", mx.float32), other, 0.8)
        ours_kwargs |= dict(width=64, height=64, controlnet=(unit,))
    pipe.load_ip_adapter(str(tmp), subfolder="", weight_name="ip.safetensors")
    pipe.set_ip_adapter_scale(0.8)
    expected = pipe(PROMPT, ip_adapter_image=image, **call, **common).images
    ours = Pipeline(sd1[1].model, ip_adapter=read_ip_adapter(tmp / "ip.safetensors", tmp / "image_encoder", mx.float32))
    value = psnr(as_array(ours.generate(prompt=PROMPT, **ours_kwargs).images), expected, data_range=1.0)
    assert value >= MIN_PSNR, f"IP-Adapter with {mode}: PSNR {value:.1f} dB"


def test_plus_matches_diffusers_load_ip_adapter(sd1, adapter_files, tmp_path):
    parts, _ = sd1
    tmp, encoder = adapter_files
    save_file({k: v.contiguous() for k, v in tiny_plus_state(parts["unet"]).items()}, tmp_path / "plus.safetensors")
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (36, 44, 3), dtype=np.uint8))
    pipe = diffusers_pipe("StableDiffusionPipeline", {**parts, "image_encoder": encoder}, SCHEDULER)
    compare(pipe, sd1[1].model, tmp_path, "plus.safetensors", tmp / "image_encoder", image, 0.9, 7, 6.0, "Plus")


def test_sdxl_matches_diffusers_load_ip_adapter(sdxl, tmp_path):  # noqa: F811
    parts, base = sdxl
    encoder = tiny_encoder(tmp_path / "image_encoder", seed=23)
    state = tiny_ip_state(parts["unet"], seed=24)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "xl.safetensors")
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    pipe = xl_pipe("StableDiffusionXLPipeline", {**parts, "image_encoder": encoder}, SCHEDULER)
    compare(pipe, base.model, tmp_path, "xl.safetensors", tmp_path / "image_encoder", image, 0.8, 6, 5.0, "SDXL")


def test_refusals(sd1, sdxl, adapter_files, tmp_path):  # noqa: F811
    tmp, _ = adapter_files
    adapter = read_ip_adapter(tmp / "ip.safetensors", tmp / "image_encoder", mx.float32)
    with pytest.raises(ValueError, match="another|family"):
        Pipeline(sdxl[1].model, ip_adapter=adapter)
    with pytest.raises(ValueError, match="needs an IP-Adapter"):
        sd1[1].generate(prompt="x", width=64, height=64, steps=1, ip_adapter_image=Image.new("RGB", (8, 8)))
    faceid = {"image_proj.proj.0.weight": torch.zeros(64, 512), "image_proj.perceiver_resampler.proj_in.weight":
              torch.zeros(32, 16), "ip_adapter.1.to_k_ip.weight": torch.zeros(32, 32)}  # fmt: skip
    save_file(faceid, tmp_path / "ip-adapter-faceid-plus_sd15.safetensors")
    with pytest.raises(ConversionError, match="FaceID"):
        read_ip_adapter(tmp_path / "ip-adapter-faceid-plus_sd15.safetensors", tmp / "image_encoder")
    with pytest.raises(ConversionError, match="config.json"):
        read_ip_adapter(tmp / "ip.safetensors", tmp_path)
