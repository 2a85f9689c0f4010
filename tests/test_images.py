"""Image conversions against diffusers' VaeImageProcessor; resize modes, masks and crops by their definitions."""

import numpy as np
import pytest
import torch
from PIL import Image

from mlx_sd.images import (
    CropRegion,
    latent_preview,
    mask_crop_region,
    paste_back,
    prepare_mask,
    resize,
    to_array,
    to_pil,
)


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_conversions_match_diffusers_image_processor():
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=8)
    image = random_image(40, 24)
    expected = proc.preprocess(image).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(np.array(to_array(image)), expected)
    x = torch.rand(2, 3, 16, 8) * 2.4 - 1.2  # out of range values are clipped
    expected_pil = proc.postprocess(x, output_type="pil")
    got = to_pil(__import__("mlx.core").core.array(x.permute(0, 2, 3, 1).numpy()))
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(got, expected_pil))


@pytest.mark.parametrize("mode", ["resize", "crop", "fill"])
@pytest.mark.parametrize("src", [(300, 200), (200, 300), (256, 256)])
def test_resize_modes_hit_target(mode, src):
    out = resize(random_image(*src), 128, 96, mode)
    assert out.size == (128, 96) and out.mode == "RGB"


def test_fill_stretches_edges_and_crop_keeps_centre():
    # A wide red/green/blue striped image into a square: fill bands copy the outer rows.
    image = Image.new("RGB", (200, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 200, 10))  # top rows red
    image.paste((0, 255, 0), (0, 90, 200, 100))  # bottom rows green
    filled = np.array(resize(image, 100, 100, "fill")).astype(int)
    assert np.abs(filled[:25] - [255, 0, 0]).max() <= 2  # the band above repeats the top row
    assert np.abs(filled[-25:] - [0, 255, 0]).max() <= 2
    cropped = np.array(resize(Image.new("RGB", (300, 100), (9, 9, 9)), 100, 100, "crop"))
    assert (cropped == 9).all()  # covering scale: no empty band


def test_mask_crop_region_grows_to_aspect_ratio():
    # A1111's example: a mask in a 128x32 region processed at 512x512 becomes a 128x128 region.
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (100, 200, 228, 232))
    region = mask_crop_region(mask, padding=0, width=512, height=512)
    assert region.size == (128, 128) and region.left == 100
    # Near the border the box shifts inside instead of shrinking.
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (0, 0, 64, 16))
    region = mask_crop_region(mask, padding=8, width=512, height=512)
    assert (region.left, region.top) == (0, 0) and region.size == (72, 72)
    assert mask_crop_region(Image.new("L", (64, 32)), 4, 64, 64) == CropRegion(0, 0, 64, 32)


def test_prepare_mask_and_paste_back():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    assert np.array(prepare_mask(mask, invert=True))[0, 0] == 255
    blurred = np.array(prepare_mask(mask, blur=4))
    assert 0 < blurred[8, 8] < 255
    original = Image.new("RGB", (32, 32), (10, 20, 30))
    generated = Image.new("RGB", (16, 16), (200, 100, 0))
    region = CropRegion(8, 8, 24, 24)
    out = np.array(paste_back(original, generated, mask, region))
    assert (out[0, 0] == [10, 20, 30]).all() and (out[16, 16] == [200, 100, 0]).all()


def test_latent_preview_shape():
    import mlx.core as mx

    previews = latent_preview(mx.zeros((2, 8, 12, 4)))
    assert len(previews) == 2 and previews[0].size == (12, 8)
