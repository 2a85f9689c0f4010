"""Full-size parity (opt-in: `python -m pytest --slow -m slow -s`): SD1.5 and SD2.1 components at 512x512.

The same harness as tests/test_models.py, with the configs the published diffusers folders carry and random weights.
Each case holds a torch and an MLX copy of one component (up to ~8 GB for a UNet) and runs for a minute or two.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd_convert.diffusers import clip_config, convert_weights, unet_config, vae_config
from mlx_sd_convert.families import family_config
from oracles import assert_close, load_ours, nchw_to_nhwc, randomize, state_dict_numpy, token_batch

pytestmark = pytest.mark.slow
FP32_TOL = 1e-4
LATENT = 64  # 512 x 512 pixels


def _reference(cls, config, seed=0):
    torch.manual_seed(seed)
    return randomize(cls(**config) if not hasattr(cls, "config_class") else cls(cls.config_class(**config)), seed)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_unet(family):
    from diffusers import UNet2DConditionModel

    ref = _reference(UNet2DConditionModel, family_config(family, "unet"))
    cfg = unet_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("unet", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LATENT, LATENT, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    t = torch.tensor([981.0, 1.0])
    with torch.no_grad():
        expected = nchw_to_nhwc(ref(x, t, encoder_hidden_states=context).sample)
    del ref
    got = ours(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()))
    print(f"\n{family} unet 64x64 latents, batch 2: rel err {assert_close(got, expected, FP32_TOL, 'unet'):.2e}")


def test_full_vae():
    from diffusers import AutoencoderKL

    ref = _reference(AutoencoderKL, family_config("sd1", "vae"))
    cfg = vae_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("vae", cfg, state_dict_numpy(ref)))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, LATENT, LATENT, generator=g)
    image = torch.rand(1, 3, 8 * LATENT, 8 * LATENT, generator=g) * 2 - 1
    with torch.no_grad():
        decoded = nchw_to_nhwc(ref.decode(latents).sample)
        dist = ref.encode(image).latent_dist
    e_dec = assert_close(ours.decode(nchw_to_nhwc(latents)), decoded, FP32_TOL, "vae decode")
    ours_dist = ours.encode(nchw_to_nhwc(image))
    e_mean = assert_close(ours_dist.mean, nchw_to_nhwc(dist.mean), FP32_TOL, "vae mean")
    e_logvar = assert_close(ours_dist.logvar, nchw_to_nhwc(dist.logvar), FP32_TOL, "vae logvar")
    print(f"\nvae 512x512: decode {e_dec:.2e}, encode mean {e_mean:.2e}, logvar {e_logvar:.2e}")


@pytest.mark.parametrize("family,pad", [("sd1", 49407), ("sd2", 0)])
def test_full_text_encoder(family, pad):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = family_config(family, "text_encoder")
    torch.manual_seed(0)
    ref = randomize(CLIPTextModel(CLIPTextConfig(**config)))
    cfg = clip_config(config, with_projection=False)
    ours = load_ours(cfg, convert_weights("text_encoder", cfg, state_dict_numpy(ref)))
    ids = token_batch(pad, lengths=(8, 75))
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = ours(mx.array(ids))
    e_last = assert_close(got.last_hidden_state, out.last_hidden_state, FP32_TOL, "last hidden state")
    e_pen = assert_close(got.hidden_states[-2], out.hidden_states[-2], FP32_TOL, "penultimate")
    e_pool = assert_close(got.pooled, out.pooler_output, FP32_TOL, "pooled")
    print(f"\n{family} text encoder: last {e_last:.2e}, penultimate {e_pen:.2e}, pooled {e_pool:.2e}")
    assert np.isfinite(np.array(got.last_hidden_state)).all()
