"""Hires-fix upscalers: latent modes against torch's interpolate, image modes against A1111's PIL resizes."""

import mlx_sd  # noqa: F401  (first: loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from a1111_upscale import resize_image as a1111_resize_image
from PIL import Image

from mlx_sd.upscale import (
    HIRES_UPSCALERS,
    IMAGE_UPSCALERS,
    LATENT_UPSCALERS,
    is_latent_upscaler,
    upscale_image,
    upscale_latents,
)

RESIZES = [  # (h, w) -> (height, width)
    ((5, 7), (10, 14)),  # exactly 2x
    ((5, 7), (13, 9)),  # non-integer, different per axis
    ((5, 7), (8, 11)),
    ((5, 7), (3, 4)),  # smaller: antialiasing widens the kernel
    ((5, 7), (9, 4)),  # larger on one axis, smaller on the other
    ((64, 64), (96, 96)),  # 512 -> 768 pixels
    ((64, 64), (128, 128)),  # 512 -> 1024 pixels
    ((64, 64), (82, 83)),  # nearest indices that a float64 position would pick differently
    ((64, 64), (40, 48)),
]
MODEL_UPSCALERS = ("R-ESRGAN 4x+", "ESRGAN_4x", "SwinIR 4x", "LDSR", "ScuNET")


def torch_interpolate(latents: np.ndarray, height: int, width: int, name: str) -> np.ndarray:
    mode, antialias = LATENT_UPSCALERS[name]
    x = torch.from_numpy(latents).permute(0, 3, 1, 2)  # NHWC -> NCHW, as A1111 holds latents
    return F.interpolate(x, size=(height, width), mode=mode, antialias=antialias).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", LATENT_UPSCALERS)
@pytest.mark.parametrize(("size", "target"), RESIZES)
def test_latent_upscalers_match_torch_interpolate(name, size, target):
    latents = np.random.default_rng(0).standard_normal((2, *size, 4)).astype(np.float32)
    expected = torch_interpolate(latents, *target, name)
    out = upscale_latents(mx.array(latents), *target, name)
    assert out.shape == expected.shape and out.dtype == mx.float32
    assert np.abs(np.array(out) - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("name", LATENT_UPSCALERS)
def test_float16_latents_stay_float16(name):
    latents = mx.array(np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float16))
    out = upscale_latents(latents, 12, 16, name)
    assert out.dtype == mx.float16 and out.shape == (1, 12, 16, 4)
    expected = upscale_latents(latents.astype(mx.float32), 12, 16, name)
    assert np.allclose(np.array(out), np.array(expected), atol=1e-2)


def test_unknown_latent_upscaler_lists_the_names():
    with pytest.raises(ValueError, match=r"'Latent \(bilinear\)' is not one of: Latent, Latent \(antialiased\)"):
        upscale_latents(mx.zeros((1, 8, 8, 4)), 16, 16, "Latent (bilinear)")


def random_image(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("upscaler", IMAGE_UPSCALERS)
@pytest.mark.parametrize(
    "target",
    [(128, 96), (96, 72), (83, 62), (100, 50), (66, 49), (32, 24)],  # 2x, 1.5x, off the 8 grid, reshaped, +2 px, half
)
def test_image_upscalers_match_a1111(upscaler, target):
    image = random_image(64, 48)
    out = upscale_image(image, *target, upscaler)
    assert out.size == target
    assert np.array_equal(np.asarray(out), np.asarray(a1111_resize_image(image, *target, upscaler)))


def test_lanczos_passes_through_a_multiple_of_8():
    # A1111's Upscaler.upscale lands on size * scale rounded down to a multiple of 8 before the final resize
    image = random_image(64, 48)
    steps = image.resize((83, 62), resample=Image.LANCZOS)
    steps = steps.resize((80, 56), resample=Image.LANCZOS).resize((83, 62), resample=Image.LANCZOS)
    assert np.array_equal(np.asarray(upscale_image(image, 83, 62, "Lanczos")), np.asarray(steps))


@pytest.mark.parametrize("upscaler", MODEL_UPSCALERS)
def test_model_upscalers_by_name_are_refused_with_the_alternatives(upscaler):
    with pytest.raises(ValueError, match="model upscaler that was not loaded.*--upscaler-dir") as error:
        upscale_image(random_image(8, 8), 16, 16, upscaler)
    assert all(name in str(error.value) for name in HIRES_UPSCALERS)


def test_latent_upscaler_names_are_not_image_upscalers():
    with pytest.raises(ValueError, match="resizes latents, not images: use upscale_latents"):
        upscale_image(random_image(8, 8), 16, 16, "Latent")


def test_hires_upscaler_names():
    assert HIRES_UPSCALERS == (*LATENT_UPSCALERS, "None", "Lanczos", "Nearest")
    assert all(is_latent_upscaler(name) for name in LATENT_UPSCALERS)
    assert not any(is_latent_upscaler(name) for name in (*IMAGE_UPSCALERS, *MODEL_UPSCALERS))
