"""Control-LoRA (Stability's SDXL control-lora files) against diffusers' ControlNetModel made from the same UNet
(`ControlNetModel.from_unet`) with the file's contents applied as ComfyUI's `ControlLora` / `ControlLoraOps` apply
them: full tensors replace, each `up`/`down` pair adds up @ down to the UNet's weight. The file is written in the
original names (tests/sgm_fixtures.py's map, proven against diffusers' single-file loader), on tiny SDXL shapes;
the generation test runs the pipeline's own UNet with the Control-LoRA against diffusers' SDXL ControlNet pipeline.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sgm_fixtures import _unet_key
from test_controlnet import EMBED, check_model
from test_controlnet_pipeline import SCHEDULER, check, control_image
from test_pipeline import PROMPT, generators
from test_sdxl_pipeline import sdxl, xl_pipe  # noqa: F401  (the SDXL fixture)
from tiny_pipelines import UNETS

from mlx_sd.controlnet import ControlNetUnit
from mlx_sd_convert.controlnet import read_controlnet
from mlx_sd_convert.diffusers import convert_weights, unet_config
from mlx_sd_convert.keymap import ConversionError
from oracles import load_ours, randomize, state_dict_numpy

RANK = 3


def _hint_names() -> dict[str, str]:
    """diffusers' ControlNet-own layer names -> the original's."""
    names = {"controlnet_cond_embedding.conv_in": "input_hint_block.0", "controlnet_mid_block": "middle_block_out.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{4 * len(EMBED) - 2}"}  # fmt: skip
    names |= {f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 * (j + 1)}" for j in range(6)}
    names |= {f"controlnet_down_blocks.{i}": f"zero_convs.{i}.0" for i in range(12)}
    return names


def control_lora(unet, seed: int = 7) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A random Control-LoRA for `unet` (a diffusers UNet) in the original names, and the diffusers ControlNet it
    stands for. Every encoder weight gets a rank-3 update; half the biases and norms are replaced; `label_emb.0.2`
    has both a full weight and an update; `time_embed.2` is left out (the UNet's own is used)."""
    from diffusers import ControlNetModel

    g = torch.Generator().manual_seed(seed)
    reference = randomize(ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBED), seed)
    own = _hint_names()
    merged = {k: v.clone() for k, v in unet.state_dict().items()}
    file = {"lora_controlnet": torch.zeros(())}
    state = reference.state_dict()
    for key in state:
        layer, _, leaf = key.rpartition(".")
        if layer in own:  # the ControlNet's own layers: full, as randomize made them
            file[f"{own[layer]}.{leaf}"] = state[key].clone()
            continue
        ldm = _unet_key(key, unet.config)
        value = merged[key]
        if ldm.startswith("time_embed.2."):
            state[key] = value
            continue
        if leaf == "weight" and value.ndim in (2, 4) or ldm == "label_emb.0.2.weight":
            if ldm == "label_emb.0.2.weight":
                value = torch.randn(value.shape, generator=g) / value.shape[1] ** 0.5
                file[ldm] = value
            out, rest = value.shape[0], value.shape[1:]
            up = torch.randn(out, RANK, *([1, 1] if value.ndim == 4 else []), generator=g) * 0.1
            down = torch.randn(RANK, *rest, generator=g) / float(np.prod(rest)) ** 0.5
            file[ldm[: -len(".weight")] + ".up"], file[ldm[: -len(".weight")] + ".down"] = up, down
            value = value + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
        elif torch.rand((), generator=g) < 0.5:
            value = value + 0.1 * torch.randn(value.shape, generator=g)
            file[ldm] = value
        state[key] = value
    reference.load_state_dict(state, strict=True)
    return file, reference.eval()


def _unet(seed: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return randomize(UNet2DConditionModel(**{k: v for k, v in UNETS["sdxl"].items()}), seed).eval()


def test_control_lora_matches_diffusers_controlnet_from_the_unet(tmp_path):
    unet = _unet()
    file, reference = control_lora(unet)
    path = tmp_path / "control-lora-canny-rank3.safetensors"
    save_file({k: v.contiguous() for k, v in file.items()}, path)
    cfg = unet_config(dict(unet.config))
    ours_unet = load_ours(cfg, convert_weights("unet", cfg, state_dict_numpy(unet)))
    controlnet = read_controlnet(path, mx.float32)
    assert controlnet.model is None and controlnet.title.startswith("control-lora-canny-rank3 [")
    controlnet.check(cfg)
    bound = controlnet.bound(ours_unet)
    check_model(reference, bound.model, "sdxl", "Control-LoRA bound to the UNet")
    assert controlnet.bound(ours_unet).model is bound.model  # the same weights: bound once
    # a LoRA fused into the UNet (new arrays) binds anew, on the fused weights
    layer = ours_unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    path = ("down_blocks", 1, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q", "weight")
    bound_weight, base_weight = _at(bound.model.parameters(), path), np.array(layer.weight)
    layer.weight = layer.weight * 1.5
    rebound = controlnet.bound(ours_unet).model
    assert rebound is not bound.model
    np.testing.assert_allclose(_at(rebound.parameters(), path), 1.5 * base_weight + bound_weight - base_weight,
                               atol=1e-5)  # fmt: skip


def _at(tree, path) -> np.ndarray:
    for step in path:
        tree = tree[step]
    return np.array(tree)


def test_control_lora_generation_matches_diffusers(sdxl, tmp_path):  # noqa: F811
    """The pipeline binds the Control-LoRA to its own UNet: the image equals diffusers' with the ControlNet the file
    stands for."""
    parts, ours = sdxl
    file, reference = control_lora(parts["unet"], seed=9)
    save_file({k: v.contiguous() for k, v in file.items()}, tmp_path / "cl.safetensors")
    unit = ControlNetUnit(read_controlnet(tmp_path / "cl.safetensors", mx.float32), control_image(6, (64, 96)), 0.8)
    pipe = xl_pipe("StableDiffusionXLControlNetPipeline", {**parts, "controlnet": reference}, SCHEDULER)
    expected = pipe(PROMPT, image=unit.image, width=64, height=96, num_inference_steps=5, guidance_scale=5.0,
                    controlnet_conditioning_scale=0.8, generator=generators(8, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=64, height=96, steps=5, guidance=5.0, seed=8, sampler=SCHEDULER,
                           controlnet=(unit,))  # fmt: skip
    check(result, expected, "SDXL Control-LoRA")


def test_bad_control_loras_are_named(tmp_path, sdxl):  # noqa: F811
    parts, ours = sdxl
    file, _ = control_lora(parts["unet"])
    broken = {k: v for k, v in file.items() if not k.startswith("zero_convs.1.")}
    save_file({k: v.contiguous() for k, v in broken.items()}, tmp_path / "broken.safetensors")
    with pytest.raises(ConversionError, match="broken.safetensors: a Control-LoRA with missing controlnet_down_blocks"):
        read_controlnet(tmp_path / "broken.safetensors")
    halves = {k: v for k, v in file.items() if k != "input_blocks.1.0.in_layers.2.down"}
    save_file({k: v.contiguous() for k, v in halves.items()}, tmp_path / "halves.safetensors")
    with pytest.raises(ConversionError, match=r"LoRA halves without their pair \(input_blocks.1.0.in_layers.2.up"):
        read_controlnet(tmp_path / "halves.safetensors")
