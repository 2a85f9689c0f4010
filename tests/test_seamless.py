"""Seamless tiling (A1111's "Tiling": every Conv2d with padding_mode="circular") against torch and diffusers.

The reference sets `padding_mode = "circular"` on every torch.nn.Conv2d of diffusers' UNet and VAE, as A1111's
`apply_circular` does on its model; ours switches its convolutions with `set_circular` per request.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline import MIN_PSNR, PROMPT, as_array, diffusers_pipe, generators

from mlx_sd.models.layers import Conv2d, set_circular
from oracles import assert_close, psnr

CONVS = [  # (B, H, W, C in, C out, kernel, stride, padding): MLX's conv, Winograd (float32 CPU), stride 2, 1x1
    (1, 6, 9, 8, 16, 3, 1, 1), (1, 40, 36, 64, 64, 3, 1, 1), (2, 10, 12, 8, 8, 3, 2, 1), (1, 5, 5, 8, 4, 1, 1, 0),
]  # fmt: skip


@pytest.mark.parametrize("B,H,W,cin,cout,k,stride,pad", CONVS)
def test_circular_conv_equals_torch(B, H, W, cin, cout, k, stride, pad):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, cin, H, W)).astype(np.float32)
    ref = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, padding_mode="circular")
    ours = Conv2d(cin, cout, k, stride=stride, padding=pad)
    ours.weight = mx.array(ref.weight.detach().numpy().transpose(0, 2, 3, 1))
    ours.bias = mx.array(ref.bias.detach().numpy())
    set_circular(ours, True)
    expected = ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    assert_close(ours(mx.array(x.transpose(0, 2, 3, 1))), expected, 2e-5, f"circular conv {H}x{W} k{k} s{stride}")
    set_circular(ours, False)
    ref.padding_mode = "zeros"
    expected = ref(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    assert_close(ours(mx.array(x.transpose(0, 2, 3, 1))), expected, 2e-5, "zero padding again")


def _circular(pipe):
    for model in (pipe.unet, pipe.vae):
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.padding_mode = "circular"
    return pipe


@pytest.mark.parametrize("width,height", [(64, 64), (96, 64)])
def test_tiling_txt2img_matches_diffusers_with_circular_convs(sd1, width, height):
    parts, ours = sd1
    pipe = _circular(diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler"))
    expected = pipe(PROMPT, width=width, height=height, num_inference_steps=4, guidance_scale=6.0,
                    generator=generators(3, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, width=width, height=height, steps=4, guidance=6.0, seed=3,
                           sampler="EulerDiscreteScheduler", tiling=True)  # fmt: skip
    assert psnr(as_array(result.images), expected, data_range=1.0) >= MIN_PSNR
    assert "Tiling: True" in result.infotexts[0]
    plain = ours.generate(prompt=PROMPT, width=width, height=height, steps=4, guidance=6.0, seed=3,
                          sampler="EulerDiscreteScheduler")  # fmt: skip
    assert not np.array_equal(as_array(plain.images), as_array(result.images))  # the next request pads with zeros


def test_tiling_img2img_matches_diffusers_and_refuses_tiled_vae(sd1):
    parts, ours = sd1
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    pipe = _circular(diffusers_pipe("StableDiffusionImg2ImgPipeline", parts, "EulerDiscreteScheduler"))
    expected = pipe(PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=6.0,
                    generator=generators(4, 1), output_type="np").images  # fmt: skip
    result = ours.generate(prompt=PROMPT, init_image=init, strength=0.6, steps=5, guidance=6.0, seed=4,
                           sampler="EulerDiscreteScheduler", tiling=True)  # fmt: skip
    assert psnr(as_array(result.images), expected, data_range=1.0) >= MIN_PSNR
    with pytest.raises(ValueError, match="tiled_vae"):
        ours.generate(prompt=PROMPT, width=64, height=64, steps=1, tiling=True, tiled_vae=True)
