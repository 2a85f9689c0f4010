"""Full-size SDXL parity (opt-in: `python -m pytest --slow -m slow -s tests/test_sdxl_full.py`), random weights.

Prints max|ours - ref| / max|ref| per component at the published SDXL 1.0 sizes (convert/families.py):
- the base and refiner UNets at 64x64 latents (512x512 pixels, SDXL-Turbo's size), batch 2 as with guidance. The
  128x128 latents of a 1024x1024 image cost ~9 TFLOP per call, minutes per side on a 2-core CPU; the weights,
  depth and attention layout are the same, only the token count grows.
- the bigG text tower with its projection: penultimate hidden states and the projected pooled output.
- the VAE decoding 128x128 latents to 1024x1024 pixels (the pipeline decodes 1024x1024 without tiles).

Memory: each case holds a torch and an MLX copy of one component. The UNets are moved over parameter by parameter,
freeing each torch tensor as it is copied, so the peak is one UNet (~10 GB in float32) plus activations.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_sd.components import build, parameter_shapes
from mlx_sd_convert.diffusers import RULES, clip_config, convert_weights, unet_config, vae_config
from mlx_sd_convert.families import family_config
from mlx_sd_convert.keymap import map_keys, read_mapped
from oracles import assert_close, load_ours, nchw_to_nhwc, randomize, state_dict_numpy, token_batch

pytestmark = pytest.mark.slow
FP32_TOL = 1e-4
LATENT = 64


def _move_unet(ref, cfg):
    """Our UNet with `ref`'s weights, copied one parameter at a time while the torch copy is freed."""
    tensors = dict(ref.named_parameters())
    source = {k: v.detach().numpy() for k, v in tensors.items()}
    mapping = map_keys("unet", {k: v.shape for k, v in source.items()}, RULES["unet"], parameter_shapes(build(cfg)))
    weights = []
    for name, mapped in mapping.items():
        weights.append((name, mx.array(read_mapped(source, mapped))))
        mx.eval(weights[-1][1])
        del source[mapped.key]
        tensors[mapped.key].data = torch.empty(0)
    ours = build(cfg)
    ours.load_weights(weights, strict=True)
    return ours.eval()


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_full_sdxl_unet(family):
    from diffusers import UNet2DConditionModel

    config = family_config(family, "unet")
    torch.manual_seed(0)
    ref = randomize(UNet2DConditionModel(**config), 0)
    cfg = unet_config(dict(ref.config))
    numbers = 5 if family == "sdxl-refiner" else 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LATENT, LATENT, generator=g)
    context = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(2, 1280, generator=g)
    time_ids = torch.tensor(
        [[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0][:numbers], [512.0, 768, 16, 8, 6.0, 512][:numbers]]
    )
    t = torch.tensor([981.0, 17.5])
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": time_ids}
        expected = nchw_to_nhwc(ref(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample)
    ours = _move_unet(ref, cfg)
    del ref
    got = ours(nchw_to_nhwc(x), mx.array(t.numpy()), mx.array(context.numpy()), mx.array(pooled.numpy()),
               mx.array(time_ids.numpy()))  # fmt: skip
    err = assert_close(got, expected, FP32_TOL, f"{family} unet")
    print(f"\n{family} unet, {LATENT}x{LATENT} latents, batch 2: rel err {err:.2e}")


def test_full_big_g_text_tower():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = family_config("sdxl", "text_encoder_2")
    torch.manual_seed(0)
    ref = randomize(CLIPTextModelWithProjection(CLIPTextConfig(**config)), 0)
    cfg = clip_config(config, with_projection=True)
    ours = load_ours(cfg, convert_weights("text_encoder_2", cfg, state_dict_numpy(ref)))
    ids = token_batch(0, lengths=(8, 75))
    with torch.no_grad():
        out = ref(torch.from_numpy(ids), output_hidden_states=True)
    got = ours(mx.array(ids))
    e_pen = assert_close(got.hidden_states[-2], out.hidden_states[-2], FP32_TOL, "bigG penultimate")
    e_proj = assert_close(got.text_embeds, out.text_embeds, FP32_TOL, "bigG projected pooled")
    print(f"\nbigG (32 layers, 1280 wide, projection 1280): penultimate {e_pen:.2e}, projected pooled {e_proj:.2e}")
    assert np.isfinite(np.array(got.text_embeds)).all()


def test_full_sdxl_vae_decode_at_1024():
    from diffusers import AutoencoderKL

    config = family_config("sdxl", "vae")
    torch.manual_seed(0)
    ref = randomize(AutoencoderKL(**config), 0)
    cfg = vae_config(dict(ref.config))
    ours = load_ours(cfg, convert_weights("vae", cfg, state_dict_numpy(ref)))
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = nchw_to_nhwc(ref.decode(latents).sample)
    del ref
    err = assert_close(ours.decode(nchw_to_nhwc(latents)), expected, FP32_TOL, "vae decode 1024")
    print(f"\nsdxl vae decode 128x128 -> 1024x1024: rel err {err:.2e}")
