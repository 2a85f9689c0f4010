"""Full-size SD3 parity (opt-in: `python -m pytest --slow -m slow -s tests/test_sd3_full.py`): the SD3 medium MMDiT
and SD3's 16-channel VAE with the published configs and random weights, as tests/test_models_full.py does for SD1/2.

The MMDiT case holds a torch and an MLX copy of 2.0B parameters in float32 (~17 GB); SD3.5 large's (8B) and T5-XXL
(4.7B) do not fit next to their references on a 24 GB machine and are covered by the tiny layouts in
tests/test_mmdit.py and tests/test_t5.py.
"""

import mlx.core as mx
import pytest
import torch

from mlx_sd_convert.diffusers import convert_weights, mmdit_config, vae_config
from mlx_sd_convert.families import SD3_TRANSFORMERS, family_config
from oracles import assert_close, load_ours, nchw_to_nhwc, randomize, state_dict_numpy

pytestmark = pytest.mark.slow
FP32_TOL = 1e-4
LATENT = 64  # 512 x 512 pixels: 1024 image tokens beside 77 + 256 text tokens


def test_full_sd3_medium_mmdit():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    ref = randomize(SD3Transformer2DModel(**SD3_TRANSFORMERS["sd3-medium"]), 0)
    cfg = mmdit_config(dict(ref.config))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, LATENT, LATENT, generator=g)
    context = torch.randn(2, 77 + 256, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    t = torch.tensor([1000.0, 28.6])
    with torch.no_grad():
        expected = nchw_to_nhwc(ref(x, context, pooled, t).sample)
    ours = load_ours(cfg, convert_weights("transformer", cfg, state_dict_numpy(ref)))  # the torch copy's peak: ~16 GB
    del ref
    got = ours(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()), mx.array(pooled.numpy()))
    print(f"\nsd3 medium mmdit 64x64 latents, batch 2: rel err {assert_close(got, expected, FP32_TOL, 'mmdit'):.2e}")


def test_full_sd3_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = {k: v for k, v in family_config("sd3", "vae").items() if k != "force_upcast"}
    ref = randomize(AutoencoderKL(**config), 0)
    cfg = vae_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("vae", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, LATENT, LATENT, generator=g)
    image = torch.rand(1, 3, 8 * LATENT, 8 * LATENT, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = nchw_to_nhwc(ref.decode(latents).sample)
        mean = nchw_to_nhwc(ref.encode(image).latent_dist.mean)
    e_dec = assert_close(ours.decode(nchw_to_nhwc(latents)), decoded, FP32_TOL, "sd3 vae decode")
    e_mean = assert_close(ours.encode(nchw_to_nhwc(image)).mean, mean, FP32_TOL, "sd3 vae mean")
    print(f"\nsd3 vae 512x512: decode {e_dec:.2e}, encode mean {e_mean:.2e}")
