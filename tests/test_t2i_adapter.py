"""T2I-Adapters: the network against diffusers' T2IAdapter (full, full-XL, light; folders, diffusers-named files and
TencentARC's original names), and generation against diffusers' adapter pipelines (SD 1.x, SDXL)."""

from __future__ import annotations

import mlx.core as mx
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_controlnet_pipeline import MIN_PSNR, SCHEDULER, control_image
from test_pipeline import PROMPT, as_array, diffusers_pipe, generators
from test_sdxl_pipeline import sdxl, xl_pipe  # noqa: F401  (the SDXL fixture)

from mlx_sd.controlnet import ControlNetUnit
from mlx_sd_convert.controlnet import read_controlnet
from mlx_sd_convert.keymap import ConversionError
from oracles import assert_close, psnr, randomize

ADAPTERS = {
    "full_adapter": dict(channels=[32, 64], num_res_blocks=2, downscale_factor=8),
    "full_adapter_xl": dict(channels=[32, 64, 64, 64], num_res_blocks=2, downscale_factor=16),
    "light_adapter": dict(channels=[32, 64], num_res_blocks=2, downscale_factor=8),
}


def tiny_adapter(kind: str, seed: int = 31, in_channels: int = 3):
    from diffusers import T2IAdapter

    torch.manual_seed(seed)
    return randomize(T2IAdapter(in_channels=in_channels, adapter_type=kind, **ADAPTERS[kind]), seed)


def original_names(state: dict, kind: str) -> dict:
    """diffusers' names -> TencentARC's (the inverse of diffusers' scripts/convert_original_t2iadapter.py)."""
    out = {}
    for key, value in state.items():
        parts = key.removeprefix("adapter.").split(".")
        if parts[0] == "body" and kind == "light_adapter" and parts[2] == "resnets":
            parts[2] = "body"
        elif parts[0] == "body" and kind != "light_adapter":
            stage = int(parts[1])
            if parts[2] == "resnets":
                parts = ["body", str(2 * stage + int(parts[3]))] + parts[4:]
            else:  # in_conv belongs to the stage's first resnet
                parts = ["body", str(2 * stage)] + parts[2:]
        out[".".join(parts)] = value.contiguous()
    return out


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_matches_diffusers_from_folder_and_files(tmp_path, kind):
    reference = tiny_adapter(kind)
    reference.save_pretrained(tmp_path / "folder")
    image = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(image)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "diffusers.safetensors")
    if kind != "full_adapter_xl":  # TencentARC published no XL adapter in its original format
        torch.save(original_names(reference.state_dict(), kind), tmp_path / "t2iadapter_tiny.pth")
    for source in ("folder", "diffusers.safetensors", "t2iadapter_tiny.pth"):
        if not (tmp_path / source).exists():
            continue
        ours = read_controlnet(tmp_path / source, mx.float32)
        assert ours.is_adapter and ours.model.config.adapter_type == kind, source
        got = ours.model(mx.array(image.permute(0, 2, 3, 1).numpy()))
        assert len(got) == len(expected)
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b.permute(0, 2, 3, 1), 1e-5, f"{kind} {source}: feature {i}")


@pytest.mark.parametrize("weight", [1.0, 0.7])
def test_sd1_matches_diffusers_adapter_pipeline(sd1, tmp_path, weight):
    parts, ours = sd1
    reference = tiny_adapter("full_adapter")
    reference.save_pretrained(tmp_path / "adapter")
    image = control_image(3)
    pipe = diffusers_pipe("StableDiffusionAdapterPipeline", {**parts, "adapter": reference}, SCHEDULER)
    expected = pipe(PROMPT, image=image, width=64, height=64, num_inference_steps=4, guidance_scale=6.0,
                    adapter_conditioning_scale=weight, generator=generators(3, 1), output_type="np").images  # fmt: skip
    unit = ControlNetUnit(read_controlnet(tmp_path / "adapter", mx.float32), image, weight)
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=6.0, seed=3, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    assert value >= MIN_PSNR, f"T2I-Adapter weight {weight}: PSNR {value:.1f} dB"
    assert 'ControlNet 0: "Module: none, Model: adapter' in result.infotexts[0]


@pytest.mark.parametrize("factor", [1.0, 0.5])
def test_sdxl_matches_diffusers_adapter_pipeline(sdxl, tmp_path, factor):  # noqa: F811
    parts, ours = sdxl
    reference = tiny_adapter("full_adapter_xl", 32)
    reference.save_pretrained(tmp_path / "adapter")
    image = control_image(4)
    pipe = xl_pipe("StableDiffusionXLAdapterPipeline", {**parts, "adapter": reference}, SCHEDULER)
    expected = pipe(PROMPT, image=image, width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
                    adapter_conditioning_scale=0.9, adapter_conditioning_factor=factor, generator=generators(5, 1),
                    output_type="np").images  # fmt: skip
    # diffusers' adapter_conditioning_factor: the fraction of the steps, from the start, the adapter acts in
    unit = ControlNetUnit(read_controlnet(tmp_path / "adapter", mx.float32), image, 0.9, guidance_end=factor)
    result = ours.generate(prompt=PROMPT, width=64, height=64, steps=4, guidance=5.0, seed=5, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    value = psnr(as_array(result.images), expected, data_range=1.0)
    assert value >= MIN_PSNR, f"SDXL T2I-Adapter factor {factor}: PSNR {value:.1f} dB"


def test_adapter_for_another_family_and_style_adapters_are_refused(sd1, tmp_path):
    _, ours = sd1
    tiny_adapter("full_adapter_xl").save_pretrained(tmp_path / "xl")
    unit = ControlNetUnit(read_controlnet(tmp_path / "xl", mx.float32), Image.new("RGB", (64, 64)))
    with pytest.raises(ValueError, match="another model family"):
        ours.generate(prompt="x", width=64, height=64, steps=1, controlnet=(unit,))
    style = {"body.0.block1.weight": torch.zeros(4, 4, 3, 3), "body.0.skep.weight": torch.zeros(4, 4, 3, 3),
             "conv_in.weight": torch.zeros(4, 192, 3, 3)}  # fmt: skip
    save_file(style, tmp_path / "t2iadapter_old.safetensors")
    with pytest.raises(ConversionError, match="skip convolutions"):
        read_controlnet(tmp_path / "t2iadapter_old.safetensors")


def test_library_lists_adapters_beside_controlnets(tmp_path):
    from test_controlnet import tiny_controlnet

    from mlx_sd_convert.library import ControlNetLibrary

    tiny_adapter("full_adapter").save_pretrained(tmp_path / "t2i_sketch")
    tiny_controlnet("sd1").save_pretrained(tmp_path / "edges")
    library = ControlNetLibrary(tmp_path, mx.float32)
    assert list(library.listing()) == ["edges", "t2i_sketch"]
    assert library("t2i_sketch").is_adapter and not library("edges").is_adapter


def test_convert_says_an_adapter_needs_no_conversion(tmp_path):
    from mlx_sd_convert.converter import convert

    reference = tiny_adapter("full_adapter")
    reference.save_pretrained(tmp_path / "folder")
    torch.save(original_names(reference.state_dict(), "full_adapter"), tmp_path / "t2iadapter_x.pth")
    for source in ("folder", "t2iadapter_x.pth"):
        with pytest.raises(ConversionError, match="used as it is"):
            convert(tmp_path / source, tmp_path / "out")
