"""Noise sources against their definitions.

`TorchCPUNoise` must reproduce `torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)` on
CPU bit for bit (compared as integer bit patterns, so -0.0 vs +0.0 counts), and `PerImageNoise` diffusers'
`randn_tensor` with a list of generators. `MLXNoise` has no reference: its tests pin the properties it promises.
"""

import os
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from mlx_sd.rng import MLXNoise, NoiseSource, PerImageNoise, TorchCPUNoise, make_noise
from mlx_sd.torch_randn import _fma

SEEDS = [0, 1, 42, 2**32 - 1, 2**63 + 2**40 + 12345, -7]
SHAPES = [
    (1,),  # torch's scalar double path (< 16 elements), cached second value unused
    (7,),  # odd: the cached value is used inside the call and one is left over
    (15,),
    (16,),  # exactly one Box-Muller chunk
    (20,),  # not a multiple of 16: the last 16 are recomputed from fresh uniforms
    (2, 3, 5, 7),
    (1, 4, 64, 64),
    (2, 4, 96, 64),
]
DTYPES = {"float32": (mx.float32, torch.float32), "float16": (mx.float16, torch.float16),
          "bfloat16": (mx.bfloat16, torch.bfloat16)}  # fmt: skip


def bits(x) -> np.ndarray:
    """Bit patterns of an mx.array or torch.Tensor, so that equality means bit-identical."""
    if isinstance(x, torch.Tensor):
        as_int = torch.int32 if x.dtype == torch.float32 else torch.int16
        return x.view(as_int).numpy().astype(np.int64)
    as_int = mx.int32 if x.dtype == mx.float32 else mx.int16
    return np.array(x.view(as_int)).astype(np.int64)


def assert_bit_identical(ours: mx.array, ref: torch.Tensor):
    assert tuple(ours.shape) == tuple(ref.shape)
    differ = int((bits(ours) != bits(ref)).sum())
    assert differ == 0, f"{differ} of {ref.numel()} values differ from torch"


# --- TorchCPUNoise vs torch.randn ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("seed", SEEDS)
def test_torch_cpu_noise_equals_torch_randn(seed, shape, dtype):
    mx_dtype, torch_dtype = DTYPES[dtype]
    ref = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch_dtype)
    assert_bit_identical(TorchCPUNoise(seed).normal(shape, mx_dtype), ref)


@pytest.mark.parametrize("seed", [0, 2**63 + 2**40 + 12345])
def test_successive_draws_of_mixed_shapes_and_dtypes(seed):
    # Small draws leave a cached Box-Muller value that the >= 16 path neither uses nor clears, and float32 and
    # half draws consume the stream differently: the sequence must follow torch's generator through all of it.
    draws = [((3,), "float32"), ((16,), "float32"), ((1,), "float32"), ((2, 4, 8, 8), "float32"), ((5,), "float16"),
             ((17,), "float32"), ((1, 4, 64, 64), "float16"), ((2,), "bfloat16"), ((33,), "bfloat16"),
             ((1,), "float32"), ((1, 4, 30, 30), "float32"), ((4,), "float32")]  # fmt: skip
    ours, g = TorchCPUNoise(seed), torch.Generator().manual_seed(seed)
    for shape, dtype in draws:
        mx_dtype, torch_dtype = DTYPES[dtype]
        assert_bit_identical(ours.normal(shape, mx_dtype), torch.randn(shape, generator=g, dtype=torch_dtype))


def test_exact_zero_uniform_gives_positive_zero():
    # Seed 6931 draws a uniform of exactly 0 at element 4787: radius sqrt(-2 log 1) = -0.0, and torch's final
    # fma(n, std, mean) turns the -0.0 products into +0.0.
    ref = torch.randn(8192, generator=torch.Generator().manual_seed(6931))
    assert ref[4787] == 0 and ref[4795] == 0
    assert_bit_identical(TorchCPUNoise(6931).normal((8192,)), ref)


def test_empty_and_0d_draws():
    ours, g = TorchCPUNoise(3), torch.Generator().manual_seed(3)
    assert_bit_identical(ours.normal((2, 0, 4)), torch.randn((2, 0, 4), generator=g))
    assert_bit_identical(ours.normal(()), torch.randn((), generator=g))  # a 0-d draw is one element
    assert_bit_identical(ours.normal((5,)), torch.randn(5, generator=g))


def test_seed_range_follows_torch():
    assert TorchCPUNoise(-1).seed == torch.Generator().manual_seed(-1).initial_seed() == 2**64 - 1
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError, match="outside"):
            TorchCPUNoise(bad)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_ten_million_values(dtype):
    mx_dtype, torch_dtype = DTYPES[dtype]
    ref = torch.randn((10_000_003,), generator=torch.Generator().manual_seed(12345), dtype=torch_dtype)
    assert_bit_identical(TorchCPUNoise(12345).normal((10_000_003,), mx_dtype), ref)


def test_fma_emulation_rounds_once():
    # The AVX2 kernel's FMAs round a * b + c once; float64 arithmetic rounds twice, which goes wrong when the float64
    # sum lands exactly halfway between two float32 values. Here a * b = -+2**-24 +- 2**-54 and c = 1 + 2**-23:
    # the exact sums lie 2**-54 off the float32 midpoints 1 + 2**-23 -+ 2**-24 and both round to 1 + 2**-23.
    a, b, c = np.float32(2**-24 * (1 + 2**-15)), np.float32(1 - 2**-15), np.float32(1 + 2**-23)
    for product_sign in (1, -1):
        x = np.full(3, product_sign * a)
        naive = (x.astype(np.float64) * b + c).astype(np.float32)
        assert (naive != c).all()  # double rounding lands on the wrong neighbour
        np.testing.assert_array_equal(_fma(x, b, c), np.full(3, c))


_NO_AVX2_TORCH = r"""
import sys, numpy as np, torch
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
g = torch.Generator().manual_seed(42)
np.savez(sys.argv[1], f32=torch.randn(100_003, generator=g).numpy(),
         f16=torch.randn((1, 4, 64, 64), generator=g, dtype=torch.float16).numpy())
"""


def test_libm_kernel_follows_torch_without_avx2(tmp_path):
    # ATEN_CPU_CAPABILITY=default makes x86 torch run the generic kernel that ARM builds (Apple Silicon) run:
    # logf/sincosf from the C library per element. Ours rounds exact log/sin/cos; glibc is not always correctly
    # rounded, so ~1.5% of float32 values differ, by at most 3 ulp (measured on 2M values).
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", _NO_AVX2_TORCH, tmp_path / "ref.npz"], env=env, check=True)
    ref = np.load(tmp_path / "ref.npz")
    ours = TorchCPUNoise(42, kernel="libm")
    f32, f16 = ours.normal((100_003,)), ours.normal((1, 4, 64, 64), mx.float16)
    ulps = np.abs(bits(f32) - ref["f32"].view(np.int32))
    assert ulps.max() <= 4 and (ulps != 0).mean() < 0.03, (ulps.max(), (ulps != 0).mean())
    assert np.abs(bits(f16) - ref["f16"].view(np.int16)).max() <= 1


# --- per-image sources vs diffusers' randn_tensor with a generator list ------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_per_image_sources_equal_randn_tensor_with_generator_list(dtype):
    mx_dtype, torch_dtype = DTYPES[dtype]
    seed, batch = 1000, 3
    ours = make_noise("torch-cpu", seed, batch_size=batch, per_image=True)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    for shape in [(batch, 4, 16, 12), (batch, 4, 16, 12), (batch, 1, 2, 3)]:  # latents, then sampler noise
        ref = randn_tensor(shape, generator=generators, dtype=torch_dtype)
        assert_bit_identical(ours.normal(shape, mx_dtype), ref)


def test_one_source_list_draws_the_whole_batch_like_diffusers():
    ours = PerImageNoise([TorchCPUNoise(9)])
    ref = randn_tensor((2, 4, 8, 8), generator=[torch.Generator().manual_seed(9)])
    assert_bit_identical(ours.normal((2, 4, 8, 8)), ref)


def test_per_image_batch_mismatch_is_an_error():
    with pytest.raises(ValueError, match="batch size 2"):
        make_noise("torch-cpu", 0, batch_size=2, per_image=True).normal((3, 4, 8, 8))


# --- MLXNoise -------------------------------------------------------------------------------------------------


def draws(source, shapes, dtype=mx.float32):
    return [np.array(source.normal(shape, dtype).astype(mx.float32)) for shape in shapes]


def test_mlx_noise_is_a_deterministic_stream():
    shapes = [(1, 4, 8, 8), (3,), (1, 4, 8, 8)]
    first, again = draws(MLXNoise(5), shapes), draws(MLXNoise(5), shapes)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], first[2])  # successive draws are new draws
    assert not np.array_equal(first[0], draws(MLXNoise(6), shapes[:1])[0])
    big = np.array(MLXNoise(5).normal((1, 4, 128, 128)))
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02


def test_mlx_noise_instances_are_independent_of_each_other_and_of_global_state():
    a, b = MLXNoise(11), MLXNoise(11)
    a_first = np.array(a.normal((4, 4)))
    mx.random.seed(123)  # the global seed must not matter
    mx.random.normal((10,))
    np.testing.assert_array_equal(np.array(b.normal((4, 4))), a_first)  # a's draw did not advance b
    np.testing.assert_array_equal(np.array(a.normal((4, 4))), np.array(b.normal((4, 4))))


def test_mlx_noise_half_precision_is_the_rounded_float32_draw():
    half = MLXNoise(2).normal((2, 4, 8, 8), mx.float16)
    assert half.dtype == mx.float16
    np.testing.assert_array_equal(np.array(half), np.array(MLXNoise(2).normal((2, 4, 8, 8)).astype(mx.float16)))


def test_mlx_per_image_noise_equals_each_image_alone():
    batch = make_noise("mlx", 40, batch_size=3, per_image=True).normal((3, 4, 8, 8))
    for i in range(3):
        np.testing.assert_array_equal(np.array(batch[i : i + 1]), np.array(MLXNoise(40 + i).normal((1, 4, 8, 8))))


@pytest.mark.parametrize("make", [MLXNoise, TorchCPUNoise], ids=["mlx", "torch-cpu"])
def test_a_shared_source_serialises_draws_across_threads(make):
    shape, n = (1, 4, 16, 16), 8
    expected = {arr.tobytes() for arr in draws(make(77), [shape] * n)}
    shared, got, lock = make(77), [], threading.Lock()

    def worker():
        for _ in range(n // 4):
            value = np.array(shared.normal(shape))
            with lock:
                got.append(value.tobytes())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(got) == expected  # each of the stream's draws exactly once, in whatever order threads took them


# --- the surface ----------------------------------------------------------------------------------------------


def test_sources_satisfy_the_protocol_and_reject_bad_requests():
    for source in (MLXNoise(0), TorchCPUNoise(0), PerImageNoise([MLXNoise(0), MLXNoise(1)])):
        assert isinstance(source, NoiseSource)
    with pytest.raises(ValueError, match="unknown noise mode"):
        make_noise("cuda", 0)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        TorchCPUNoise(0).normal((4,), mx.int32)


def test_rng_does_not_import_torch():
    code = "import sys, mlx_sd.rng; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
