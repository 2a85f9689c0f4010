"""ControlNet: the network and its readers against diffusers' ControlNetModel (and its original-layout converter).

The original ("cldm") layout is built from the original code's UNetModel (stable-diffusion-sdkit's `ldm`: genuine
`input_blocks.*`, `middle_block.*`, `time_embed.*` names) plus the ControlNet's own tensors named as lllyasviel's
cldm.ControlNet names them; diffusers' `convert_controlnet_checkpoint` turns that file into the reference model.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_pipelines import UNETS

from mlx_sd.controlnet import ControlNetUnit
from mlx_sd_convert.controlnet import a1111_hash, read_controlnet
from mlx_sd_convert.keymap import ConversionError
from oracles import assert_close, ldm_module, nchw_to_nhwc, randomize

TOL = 1e-4
FP16_TOL = 2e-2
EMBED = (8, 8, 16, 16)  # the control image embedding's widths: 3 halvings, latent size from 8x pixels


def tiny_controlnet(kind: str, seed: int = 11, **overrides):
    from diffusers import ControlNetModel

    config = {k: v for k, v in UNETS[kind].items() if k not in ("up_block_types", "sample_size")}
    torch.manual_seed(seed)
    return randomize(ControlNetModel(conditioning_embedding_out_channels=EMBED, **{**config, **overrides}), seed)


def inputs(kind: str, batch: int = 2, size: int = 8, seed: int = 0, context_width: int | None = None):
    """Torch inputs for a tiny ControlNet of `kind`: latents, timesteps, context, control image, SDXL additions."""
    g = torch.Generator().manual_seed(seed)
    width = UNETS[kind]["cross_attention_dim"] if context_width is None else context_width
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([700.0, 35.5][:batch])
    context = torch.randn(batch, 9, width, generator=g)
    image = torch.rand(batch, 3, 8 * size, 8 * size, generator=g)
    added = None
    if kind == "sdxl":
        added = {"text_embeds": torch.randn(batch, 16, generator=g), "time_ids": torch.rand(batch, 6, generator=g) * 64}
    return x, t, context, image, added


def check_model(reference, ours, kind: str, what: str, tol: float = TOL) -> None:
    x, t, context, image, added = inputs(kind, context_width=reference.config.cross_attention_dim)
    with torch.no_grad():
        down, mid = reference(x, t, context, image, conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)
    pooled = time_ids = None
    if added:
        pooled, time_ids = mx.array(added["text_embeds"].numpy()), mx.array(added["time_ids"].numpy())
    our_down, our_mid = ours(
        nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()), nchw_to_nhwc(image), pooled, time_ids
    )
    assert len(our_down) == len(down)
    for i, (a, b) in enumerate(zip(our_down, down)):
        assert_close(a, b.permute(0, 2, 3, 1), tol, f"{what}: down residual {i}")
    assert_close(our_mid, mid.permute(0, 2, 3, 1), tol, f"{what}: middle residual")


@pytest.mark.parametrize("kind,order", [("sd1", "rgb"), ("sdxl", "rgb"), ("sd1", "bgr")])
def test_diffusers_folder_matches_diffusers(tmp_path, kind, order):
    reference = tiny_controlnet(kind, controlnet_conditioning_channel_order=order)
    reference.save_pretrained(tmp_path / "cn")
    ours = read_controlnet(tmp_path / "cn", mx.float32)
    assert ours.name == "cn" and ours.title == "cn"
    check_model(reference, ours.model, kind, f"{kind} diffusers folder")
    half = read_controlnet(tmp_path / "cn", mx.float16)  # as on a GPU
    check_model(reference, half.model, kind, f"{kind} float16", FP16_TOL)


# shapes the family head rule reads right: SD 1.x (768-wide context) 8 heads, others 64 channels per head
# and SDXL's 256-wide embedding of each micro-conditioning number
FAMILY_SHAPED = {
    "sd1": dict(cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(block_out_channels=(64, 128), attention_head_dim=[1, 2], cross_attention_dim=1024,
                use_linear_projection=True),
    "sdxl": dict(block_out_channels=(64, 128), attention_head_dim=[1, 2], addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=16 + 6 * 256),
}  # fmt: skip


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_diffusers_named_single_file_reads_its_config_from_shapes(tmp_path, kind):
    reference = tiny_controlnet("sd1" if kind == "sd2" else kind, **FAMILY_SHAPED[kind])
    path = tmp_path / "controlnet_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, path)
    ours = read_controlnet(path, mx.float32)
    assert ours.title == f"controlnet_tiny [{a1111_hash(path)}]"
    assert ours.model.config.conditioning_embedding_out_channels == EMBED
    check_model(reference, ours.model, "sd1" if kind == "sd2" else kind, f"{kind} diffusers-named file")


def _ldm_controlnet(seed: int = 3) -> dict[str, torch.Tensor]:
    """An original-layout ControlNet state dict (cldm.ControlNet's names), tiny SD 1.x shapes."""
    UNetModel = ldm_module("modules.diffusionmodules.openaimodel").UNetModel
    torch.manual_seed(seed)
    unet = randomize(UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
                               num_res_blocks=2, attention_resolutions=[1, 2], num_heads=8, transformer_depth=1,
                               use_spatial_transformer=True, context_dim=768, legacy=False), seed)  # fmt: skip
    state = {k: v for k, v in unet.state_dict().items() if k.startswith(("input_blocks.", "middle_block.", "time_"))}
    g = torch.Generator().manual_seed(seed + 1)

    def conv(name, o, i, k):
        state[f"{name}.weight"] = torch.randn(o, i, k, k, generator=g) / (i * k * k) ** 0.5
        state[f"{name}.bias"] = 0.2 * torch.randn(o, generator=g)

    # input_hint_block: conv, SiLU, (conv, SiLU, strided conv, SiLU) per further stage, conv_out
    widths = [3, *EMBED]
    conv("input_hint_block.0", EMBED[0], 3, 3)
    for j in range(1, len(EMBED)):
        conv(f"input_hint_block.{4 * j - 2}", EMBED[j - 1], EMBED[j - 1], 3)
        conv(f"input_hint_block.{4 * j}", widths[j + 1], EMBED[j - 1], 3)
    conv("input_hint_block.14", 32, EMBED[-1], 3)
    for i, ch in enumerate([32, 32, 32, 32, 64, 64, 64, 64, 64]):  # conv_in, 3 stages of 2 resnets + 2 downsamplers
        conv(f"zero_convs.{i}.0", ch, ch, 1)
    conv("middle_block_out.0", 64, 64, 1)
    return state


def _ldm_reference(state: dict):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    config = dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  conditioning_embedding_out_channels=EMBED)  # fmt: skip
    reference = ControlNetModel(**config)
    reference.load_state_dict(convert_controlnet_checkpoint(dict(state), dict(reference.config)), strict=True)
    return reference.eval()


@pytest.mark.parametrize("suffix,prefix", [(".pth", "control_model."), (".safetensors", "")])
def test_original_layout_matches_diffusers_conversion(tmp_path, suffix, prefix):
    state = _ldm_controlnet()
    reference = _ldm_reference(state)
    path = tmp_path / f"control_tiny{suffix}"
    stored = {prefix + k: v.contiguous() for k, v in state.items()}
    if prefix:  # ControlNet 1.0's files bundle the SD model: only the control model is read
        stored["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 4, 3, 3)
        torch.save(stored, path)
    else:
        save_file(stored, path)
    ours = read_controlnet(path, mx.float32)
    assert ours.model.config.transformer_depth == (1, 1, 0)
    check_model(reference, ours.model, "sd1", f"original layout {suffix}")


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConversionError, match="no such ControlNet"):
        read_controlnet(tmp_path / "missing.safetensors")
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 8)}, path)
    with pytest.raises(ConversionError, match="LoRA"):
        read_controlnet(path)
    state = _ldm_controlnet()
    del state["zero_convs.3.0.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(ConversionError, match="missing.*controlnet_down_blocks.3.weight"):
        read_controlnet(tmp_path / "broken.safetensors")


def test_unit_settings_are_checked():
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    for bad, match in [
        (dict(guidance_start=0.5, guidance_end=0.5), "start < end"),
        (dict(weight=-1), "weight"),
        (dict(control_mode="strong"), "control_mode"),
        (dict(resize_mode="latent"), "resize_mode"),
    ]:
        with pytest.raises(ValueError, match=match):
            ControlNetUnit("x", image, **bad).validate()
    scales = ControlNetUnit("x", image, weight=2.0, control_mode="guess").scales(13)
    np.testing.assert_allclose(scales, 2.0 * torch.logspace(-1, 0, 13).numpy(), rtol=1e-6)


def test_preprocessors():
    import cv2
    from PIL import Image

    from mlx_sd.preprocessors import pixel_perfect_res, preprocess

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)).resize((768, 512), Image.NEAREST)
    # at the processor resolution already (short side 512, sides multiples of 64): OpenCV's Canny on the image
    edges = np.asarray(preprocess(photo, "canny", 512, 50, 150))
    expected = cv2.Canny(np.asarray(photo), 50, 150)
    assert edges.shape == (512, 768, 3) and all(np.array_equal(edges[..., c], expected) for c in range(3))
    assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    small = preprocess(photo.resize((300, 200)), "canny")  # short side scaled to 512 (A1111's default)
    assert small.size == (768, 512)
    assert np.array_equal(np.asarray(preprocess(photo, "invert")), 255 - np.asarray(photo))
    assert preprocess(photo, "none") is not photo and np.array_equal(np.asarray(preprocess(photo, "none")), photo)
    with pytest.raises(ValueError, match="module 'none'"):
        preprocess(photo, "depth_midas")
    # A1111's model-free preprocessors (its processor.py, transcribed) on an image already at the resolution
    x = np.asarray(photo).astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(x, (0, 0), 6.0) - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    lineart = (intensity * 127).clip(0, 255).astype(np.uint8)
    g1, g2 = cv2.GaussianBlur(x, (0, 0), 0.5), cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    xdog = np.zeros(dog.shape, np.uint8)
    xdog[2 * (255 - dog) > 20] = 255
    threshold = np.zeros(dog.shape, np.uint8)
    threshold[np.min(np.asarray(photo), axis=2) > 100] = 255
    for module, a, expected in (("lineart_standard", None, lineart), ("scribble_xdog", 20, xdog),
                                ("threshold", 100, threshold)):  # fmt: skip
        got = np.asarray(preprocess(photo, module, 512, a))
        assert all(np.array_equal(got[..., c], expected) for c in range(3)), module
    tile = preprocess(photo, "tile_resample", threshold_a=2.0)
    assert np.array_equal(np.asarray(tile), cv2.resize(np.asarray(photo), (384, 256), interpolation=cv2.INTER_AREA))
    assert preprocess(photo, "tile_resample", threshold_a=1.05).size == photo.size  # rates below 1.1: unchanged
    # A1111's pixel perfect: the short side as the resize mode scales it (cover for crop/resize, fit for fill)
    assert pixel_perfect_res((1024, 768), 512, 512, "crop") == 512
    assert pixel_perfect_res((1024, 768), 512, 512, "fill") == 384


def test_library_lists_finds_and_caches(tmp_path):
    from mlx_sd_convert.library import ControlNetLibrary

    folder = tmp_path / "ControlNet"
    tiny_controlnet("sd1", **FAMILY_SHAPED["sd1"]).save_pretrained(folder / "edges")
    state = _ldm_controlnet()
    (folder / "sub").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "sub" / "control_depth.safetensors")
    (folder / "control_depth.yaml").write_text("model: {}\n")  # A1111 keeps yaml files beside: not ControlNets
    library = ControlNetLibrary(folder, mx.float32)
    title = f"control_depth [{a1111_hash(folder / 'sub' / 'control_depth.safetensors')}]"
    assert list(library.listing()) == [title, "edges"]
    assert library.find("control_depth") == library.find(title) == folder / "sub" / "control_depth.safetensors"
    first = library("control_depth [00000000]")  # another file's hash in the title: found by name, as A1111 does
    assert library(title) is first and library("edges").name == "edges"
    with pytest.raises(ConversionError, match="not found.*available: control_depth"):
        library("canny")
    small = tmp_path / "tiny_sd2.safetensors"  # widths below one 64-channel head: no published family's
    save_file({k: v.contiguous() for k, v in tiny_controlnet("sdxl").state_dict().items()}, small)
    with pytest.raises(ConversionError, match="diffusers folder"):
        read_controlnet(small)


def test_convert_says_a_controlnet_needs_no_conversion(tmp_path):
    from mlx_sd_convert.converter import convert

    save_file({k: v.contiguous() for k, v in _ldm_controlnet().items()}, tmp_path / "control_v11p_sd15_x.safetensors")
    tiny_controlnet("sd1").save_pretrained(tmp_path / "folder")
    for source in ("control_v11p_sd15_x.safetensors", "folder"):
        with pytest.raises(ConversionError, match="a ControlNet, used as it is: mlx-sd generate --controlnet"):
            convert(tmp_path / source, tmp_path / "out")
        assert not (tmp_path / "out").exists()
