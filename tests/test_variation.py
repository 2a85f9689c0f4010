"""Variation seeds and seed resize against A1111's `ImageRNG.first`, and a pipeline fed that noise in diffusers.

A1111 is not a library, so its 40 lines that make the first noise (modules/rng.py: `slerp`, `ImageRNG.first`, with
the "CPU" random number source) are transcribed below in torch, as the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pipeline import MIN_PSNR, PROMPT, as_array, diffusers_pipe

from mlx_sd.params import GenerationRequest
from mlx_sd.rng import make_noise
from mlx_sd.variation import vary_noise
from oracles import psnr


def a1111_slerp(val, low, high):
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def a1111_first(shape, seeds, subseeds, strength, resize_h, resize_w):
    """A1111's `ImageRNG.first()` with randn_source "CPU"."""

    def randn(seed, shape, generator=None):
        return torch.randn(shape, generator=generator or torch.Generator().manual_seed(int(seed)))

    noise_shape = shape if resize_h <= 0 or resize_w <= 0 else (shape[0], resize_h // 8, resize_w // 8)
    xs = []
    for i, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        subnoise = randn(subseeds[i], noise_shape) if subseeds is not None and strength != 0 else None
        noise = randn(seed, noise_shape) if noise_shape != shape else randn(seed, shape, generator)
        if subnoise is not None:
            noise = a1111_slerp(strength, noise, subnoise)
        if noise_shape != shape:
            x = randn(seed, shape, generator)
            dx, dy = (shape[2] - noise_shape[2]) // 2, (shape[1] - noise_shape[1]) // 2
            w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
            h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
            tx, ty, dx, dy = (0 if dx < 0 else dx), (0 if dy < 0 else dy), max(-dx, 0), max(-dy, 0)
            x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
            noise = x
        xs.append(noise)
    return torch.stack(xs).numpy()


CASES = [  # subseed strength, seed resize (h, w)
    (0.3, (0, 0)), (1.0, (0, 0)), (0.05, (0, 0)), (0.0, (96, 48)), (0.0, (32, 136)), (0.6, (128, 128)),
]  # fmt: skip


@pytest.mark.parametrize("strength,resize", CASES)
def test_first_noise_equals_a1111(strength, resize):
    shape, seeds, subseeds = (4, 8, 10), [100, 101], [7, 8]
    draw = make_noise("torch-cpu", seeds[0], 2, per_image=True).normal((2, *shape))
    ours = np.array(vary_noise(draw, "torch-cpu", seeds, subseeds, strength, resize))
    ref = a1111_first(shape, seeds, subseeds, strength, *resize)
    np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_parallel_draws_blend_linearly_with_a1111s_weights():
    """A variation seed equal to the seed: cosine 1, A1111's linear fallback (strength weights the seed's noise)."""
    shape, seeds = (4, 6, 6), [5]
    draw = make_noise("torch-cpu", 5).normal((1, *shape))
    ours = np.array(vary_noise(draw, "torch-cpu", seeds, [5], 0.25))
    np.testing.assert_allclose(ours, a1111_first(shape, seeds, [5], 0.25, 0, 0), atol=1e-6)


def test_pipeline_starts_from_a1111s_varied_noise(sd1):
    """diffusers' txt2img given A1111's first noise as `latents` (Euler) equals our image with the same variation
    settings; the infotext records them per image, and a random variation seed is reported."""
    parts, ours = sd1
    seed, subseed, strength, resize = 40, 900, 0.4, (48, 80)
    latents = torch.from_numpy(a1111_first((4, 8, 8), [seed, seed + 1], [subseed, subseed + 1], strength, *resize))
    pipe = diffusers_pipe("StableDiffusionPipeline", parts, "EulerDiscreteScheduler")
    expected = pipe([PROMPT] * 2, width=64, height=64, num_inference_steps=4, guidance_scale=5.0, latents=latents,
                    output_type="np").images  # fmt: skip
    result = ours.generate(GenerationRequest(
        prompt=PROMPT, width=64, height=64, steps=4, guidance=5.0, sampler="EulerDiscreteScheduler", seed=seed,
        batch_size=2, subseed=subseed, subseed_strength=strength, seed_resize_from_h=resize[0],
        seed_resize_from_w=resize[1],
    ))  # fmt: skip
    assert psnr(as_array(result.images), expected, data_range=1.0) >= MIN_PSNR
    assert "Variation seed: 901, Variation seed strength: 0.4, Seed resize from: 80x48" in result.infotexts[1]
    drawn = ours.generate(prompt=PROMPT, width=64, height=64, steps=1, seed=1, subseed_strength=0.5)
    assert drawn.request.subseed is not None and f"Variation seed: {drawn.request.subseed}," in drawn.infotexts[0]
    with pytest.raises(ValueError, match="subseed_strength"):
        ours.generate(prompt=PROMPT, width=64, height=64, steps=1, subseed_strength=1.5)
