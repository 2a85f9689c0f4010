"""Tiled VAE decode/encode against diffusers' `enable_tiling()` on a tiny random VAE."""

import mlx.core as mx
import pytest
import torch

from mlx_sd.tiling import tiled_decode, tiled_encode
from mlx_sd_convert.diffusers import convert_weights, vae_config
from oracles import assert_close, load_ours, nchw_to_nhwc, randomize, state_dict_numpy

TILE = 32  # pixels; the tiny VAE downsamples by 4, so 8 latents


@pytest.fixture(scope="module")
def vaes():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = randomize(
        AutoencoderKL(
            block_out_channels=(32, 64, 64),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            layers_per_block=1,
            norm_num_groups=32,
        )
    )
    ref.enable_tiling()
    ref.tile_sample_min_size = TILE
    ref.tile_latent_min_size = TILE // 4
    cfg = vae_config(dict(ref.config))
    return ref, load_ours(cfg, convert_weights("vae", cfg, state_dict_numpy(ref)))


@pytest.mark.parametrize("size", [(20, 13), (8, 8), (9, 24)])
def test_tiled_decode_matches_diffusers(vaes, size):
    ref, ours = vaes
    z = torch.randn(1, 4, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = nchw_to_nhwc(ref.decode(z).sample)
    got = tiled_decode(ours, nchw_to_nhwc(z), tile=TILE)
    assert_close(got, expected, 1e-4, f"tiled decode {size}")


def test_tiled_encode_matches_diffusers(vaes):
    ref, ours = vaes
    image = torch.rand(2, 3, 72, 44, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
    got = tiled_encode(ours, nchw_to_nhwc(image), tile=TILE)
    assert_close(got.mean, nchw_to_nhwc(dist.mean), 1e-4, "tiled encode mean")
    assert_close(got.logvar, nchw_to_nhwc(dist.logvar), 1e-4, "tiled encode logvar")
    assert isinstance(got.mean, mx.array)
