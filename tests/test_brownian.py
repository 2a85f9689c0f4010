"""A1111's Brownian-tree noise (DPM++ SDE, 2M SDE, 3M SDE) against torchsde and k-diffusion.

torchsde's `_randn` is what A1111 replaces with `randn_local(seed, shape)`; on a CPU torch (and with A1111's "CPU"
random number source) that is the torch CPU generator our `TorchCPUNoise` reproduces, so the trees must agree
bit for bit, and k-diffusion's samplers fed A1111's `BrownianTreeNoiseSampler` must agree with ours step by step.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torchsde
from sampling_refs import SD_CONFIG, nchw, run_k_diffusion, run_ours

from mlx_sd.rng import MLXNoise, PerImageNoise, TorchCPUNoise, make_noise
from mlx_sd.samplers import SAMPLERS, plan_sampling
from mlx_sd.samplers.brownian import BrownianNoise, BrownianTree, brownian_noise
from mlx_sd.schedules import NoiseSchedule
from oracles import assert_close, k_diffusion_sampling

# torchsde warns when a float32 sigma lies just outside its tree, whose ends are rounded to 6 decimals (it clamps)
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
FLOAT32_ULPS = 2.5e-7  # two units in the last place of a float32
# A1111's DPM++ SDE queries the tree at sigma_fn(s), computed with torch's exp/log, whose float32 kernels differ by an
# ulp between CPUs (correctly rounded on an AVX-512 Xeon, where every step agrees within 1e-5; 1 ulp off on an AVX2
# EPYC: exp(-t) at 20 steps' 6th sigma is 3.4647553 there, 3.4647555 rounded correctly). A query point one ulp away can
# round (to the tree's 1e-6 tolerance) to the neighbouring point: the same Brownian motion 1e-6 away, so that step
# differs by ~2e-4 relative, the others by <= 1e-6. A wrong tree differs at O(1).
TREE_QUERY_TOL = 1e-3
BROWNIAN = {"DPM++ SDE": "sample_dpmpp_sde", "DPM++ 2M SDE": "sample_dpmpp_2m_sde",
            "DPM++ 2M SDE Heun": "sample_dpmpp_2m_sde", "DPM++ 3M SDE": "sample_dpmpp_3m_sde"}  # fmt: skip


def _torch_draw(seed, shape):
    return np.asarray(TorchCPUNoise(seed).normal(shape))


def _queries(sigmas):
    """A sampler's queries over a decreasing schedule: whole steps, DPM++ SDE's nested half steps, and a few
    intervals spanning several steps and out of order."""
    out = []
    for hi, lo in zip(sigmas, sigmas[1:]):
        mid = float(np.float32(np.sqrt(hi * lo)))
        out += [(mid, hi), (lo, hi)]
    return out + [(sigmas[-1], sigmas[0]), (sigmas[3], sigmas[1]), (sigmas[-2], sigmas[2])]


@pytest.mark.parametrize("shape", [(4, 5, 7), (4, 16, 16), (3,)])
@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**32 - 1])
def test_tree_equals_torchsde_bit_for_bit(seed, shape):
    sigmas = [float(s) for s in np.float32([14.614642, 9.7, 6.3, 4.05, 2.5, 1.41, 0.77, 0.3, 0.0291675])]
    ref = torchsde.BrownianTree(torch.tensor(sigmas[-1]), torch.zeros(shape), torch.tensor(sigmas[0]), entropy=seed)
    ours = BrownianTree(sigmas[-1], sigmas[0], shape, seed, _torch_draw)
    for lo, hi in _queries(sigmas):
        np.testing.assert_array_equal(ours(lo, hi), ref(torch.tensor(lo), torch.tensor(hi)).numpy(), f"[{lo}, {hi}]")


def test_noise_sampler_equals_k_diffusion_batched_and_single():
    """Per-image trees (A1111's list of seeds) and one tree for the batch (an int seed), both signs of interval."""
    sampling = k_diffusion_sampling()
    x = torch.zeros(2, 4, 6, 5)
    lo, hi = np.float32(0.0291675), np.float32(14.614642)
    steps = [(np.float32(a), np.float32(b)) for a, b in [(14.614642, 9.7), (9.7, 3.1), (3.1, 0.0291675), (0.5, 2.0)]]
    cases = [([7, 8], PerImageNoise([TorchCPUNoise(7), TorchCPUNoise(8)])), (7, TorchCPUNoise(7))]
    for seed, source in cases:
        ref = sampling.BrownianTreeNoiseSampler(x, torch.tensor(lo), torch.tensor(hi), seed=seed)
        ours = brownian_noise(source, (2, 6, 5, 4), float(lo), float(hi))
        for a, b in steps:
            lo_, hi_ = min(a, b), max(a, b)
            trees = torch.stack([t(torch.tensor(lo_), torch.tensor(hi_)) for t in ref.tree.trees]).numpy()
            np.testing.assert_array_equal(np.stack([t(float(lo_), float(hi_)) for t in ours.trees]), trees)
            expected = ref(torch.tensor(a), torch.tensor(b)).numpy()
            # the increment divides by sqrt(|b - a|): torch's float32 sqrt is 1 ulp off on some CPUs (AVX2 kernels on
            # an AMD EPYC), ours is correctly rounded, so increments agree to float32 rounding, the trees exactly
            got = nchw(ours.increment(mx.zeros((2, 6, 5, 4)), float(a), float(b)))
            np.testing.assert_allclose(got, expected, rtol=FLOAT32_ULPS, atol=0)


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("steps", [2, 7, 20])
@pytest.mark.parametrize("name", list(BROWNIAN))
def test_a1111_sde_samplers_with_the_tree_match_k_diffusion(name, steps, strength):
    """k-diffusion's function with A1111's noise sampler (trees seeded 11 and 12 over the whole schedule, img2img
    too) against plan.sample with per-image torch-cpu sources, every step."""
    if strength * steps < 2 and name != "DPM++ SDE":
        pytest.skip("k-diffusion 0.1.1's 2M/3M SDE raise for a single step (test_samplers._SINGLE_STEP_BROKEN)")
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    plan = plan_sampling(name, schedule, steps, strength=strength)
    whole = plan_sampling(name, schedule, steps).sigmas
    lo, hi = np.float32(min(s for s in whole if s > 0)), np.float32(max(whole))
    assert plan.noise_interval == (min(s for s in whole if s > 0), max(whole))
    x = np.random.default_rng(3).standard_normal((2, 4, 5, 7)).astype(np.float32) * np.float32(plan.sigmas[0])
    noise = PerImageNoise([TorchCPUNoise(11), TorchCPUNoise(12)])
    ours = run_ours(plan, mx.array(x.transpose(0, 2, 3, 1)), noise)
    tree = k_diffusion_sampling().BrownianTreeNoiseSampler(torch.from_numpy(x), torch.tensor(lo), torch.tensor(hi),
                                                           seed=[11, 12])  # fmt: skip
    options = {"solver_type": "heun"} if name.endswith("Heun") else {}
    ref = run_k_diffusion(BROWNIAN[name], "epsilon", schedule.alphas_cumprod, plan.sigmas, x, tree, **options)
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, TREE_QUERY_TOL, f"{name} {steps} steps strength {strength}, step {i}")


def test_registry_marks_a1111s_brownian_samplers():
    assert {s.name for s in SAMPLERS.values() if s.brownian} == set(BROWNIAN)
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    assert plan_sampling("DPM++ 2M SDE", schedule, 10, follow="diffusers").noise_interval is None
    assert plan_sampling("Euler a", schedule, 10).noise_interval is None


def test_mlx_trees_are_one_brownian_motion_whatever_the_queries():
    """With MLX noise the tree is the same construction: an increment equals the sum of its parts, queried in any
    order, and a seed gives the same motion every time (so the noise of a stretch of schedule does not depend on
    the step count)."""
    shape = (1, 8, 8, 4)
    one = brownian_noise(MLXNoise(5), shape, 0.03, 14.6)
    other = brownian_noise(MLXNoise(5), shape, 0.03, 14.6)
    w = one.trees[0]
    parts = [w(0.03, 0.7), w(0.7, 2.2), w(2.2, 14.6)]
    whole = other.trees[0](0.03, 14.6)
    np.testing.assert_allclose(sum(parts), whole, atol=1e-5)
    np.testing.assert_array_equal(other.trees[0](0.7, 2.2), parts[1])
    assert whole.std() == pytest.approx(np.sqrt(14.6 - 0.03), rel=0.2)
    assert not np.array_equal(brownian_noise(MLXNoise(6), shape, 0.03, 14.6).trees[0](0.7, 2.2), parts[1])


def test_steps_change_an_sde_image_gradually():
    """What the tree is for: DPM++ 2M SDE at 15 and 45 steps ends close together with tree noise, far apart with
    one draw per step (whose k-th draw lands at unrelated noise levels). The model is the ideal denoiser of
    unit-normal data around 0.5, so the result is a sample of that distribution drawn along the noise's path."""
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32)

    def ideal(x_in, t):
        sigma = float(schedule.t_to_sigma(t))
        latent = x_in * math.sqrt(sigma**2 + 1)
        x0 = (latent + sigma**2 * 0.5) / (1 + sigma**2)
        return (latent - x0) / sigma  # epsilon

    def final(steps, rng):
        plan = plan_sampling("DPM++ 2M SDE", schedule, steps)
        return run_ours(plan, mx.array(x * plan.sigmas[0]), rng, model=ideal)[-1]

    def gap(wrap):
        return np.abs(final(15, wrap(make_noise("torch-cpu", 42))) - final(45, wrap(make_noise("torch-cpu", 42))))

    tree, iid = gap(lambda rng: rng).mean(), gap(_Unseeded).mean()
    print(f"mean |15 steps - 45 steps|: tree {tree:.3f}, per-step draws {iid:.3f}")
    assert tree < 0.3 * iid, (tree, iid)


class _Unseeded:
    """A noise source without seeds: the samplers fall back to one draw per step."""

    def __init__(self, source):
        self.source = source

    def normal(self, shape, dtype=mx.float32):
        return self.source.normal(shape, dtype)


def test_a_source_without_seeds_keeps_per_step_draws():
    shape = (1, 4, 4, 4)
    assert brownian_noise(_Unseeded(MLXNoise(0)), shape, 0.1, 1.0) is None
    assert isinstance(brownian_noise(make_noise("mlx", 0, 1, per_image=True), shape, 0.1, 1.0), BrownianNoise)
    with pytest.raises(ValueError, match="3 noise sources for a batch of 2"):
        BrownianNoise((2, 4, 4, 4), 0.1, 1.0, [MLXNoise(i) for i in range(3)])
    with pytest.raises(ValueError, match="t0 < t1"):
        BrownianTree(1.0, 1.0, (2,), 0, _torch_draw)
