"""Noise sources: where every random draw of a generation comes from.

The pipeline draws all its noise (initial latents, the VAE's sampling noise for img2img, the noise stochastic
samplers inject at each step) from one `NoiseSource`, in a fixed order, so choosing the source chooses what "seed S"
means for every draw:

- `MLXNoise(seed)` ("mlx", the default): MLX's explicit keys, split once per draw. Fast on every device; the same
  seed gives the same images with the same mlx-sd and MLX versions on the same kind of device.
- `TorchCPUNoise(seed)` ("torch-cpu"): the values of `torch.Generator().manual_seed(seed)` followed by
  `torch.randn(shape, generator=g, dtype=dtype)` on CPU, which is what diffusers draws when handed that generator:
  bit for bit as x86-64 torch computes them (`torch_randn` explains how). Computed in numpy on the CPU: 5 to 10 ms
  per 64K values (an SDXL latent).
- `TorchCPUNoise(seed, kernel="libm")` ("torch-cpu-arm"): the same stream with the Box-Muller of torch's ARM builds
  (Apple Silicon), whose C library log/sin/cos differ from x86-64 torch's by up to 2e-6 in ~38% of values. This
  mode matches such torch up to the C library's last bits (~1.5% of values differ by a few ulp against glibc).
- `PerImageNoise(sources)`: one source per image of the batch, each draw of shape (B, ...) made of one (1, ...) draw
  per source, exactly as diffusers' `randn_tensor(shape, generator=[g0, g1, ...])` does. With sources seeded
  seed, seed + 1, ... (A1111's convention, `make_noise(..., per_image=True)`), image i of a batch equals the image
  generated alone with seed + i.

Shapes are torch's: an image-shaped draw is (B, C, H, W) in NCHW element order, and the caller transposes to NHWC,
so the two modes differ only in the values. Every source is safe to share between threads (draws are serialised),
but the order of draws defines the images, so one generation should own its source.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import mlx.core as mx
import numpy as np

from .torch_randn import TorchCPUGenerator, torch_seed

NOISE_MODES = ("mlx", "torch-cpu", "torch-cpu-arm")
_HALF_DTYPES = (mx.float16, mx.bfloat16)


@runtime_checkable
class NoiseSource(Protocol):
    """Anything that yields successive standard-normal draws."""

    def normal(self, shape: Sequence[int], dtype: mx.Dtype = mx.float32) -> mx.array:
        """The next draw: an array of `shape` (NCHW for image-shaped draws) and `dtype`."""
        ...


def _checked_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"noise shape {shape} has a negative dimension")
    return shape


def _checked_dtype(dtype: mx.Dtype) -> mx.Dtype:
    if dtype not in (mx.float32, *_HALF_DTYPES):
        raise ValueError(f"noise dtype {dtype} is not supported; ask for float32, float16 or bfloat16")
    return dtype


class MLXNoise:
    """MLX explicit-key noise: draw i uses the i-th key split off `mx.random.key(seed)`; no global state.

    Each draw is made in float32 and rounded to the requested dtype, so a float16 draw is the float32 draw
    rounded (drawing in float16 would quantise the uniforms that feed the normal transform). Reproducible for a
    given seed, MLX version and device kind; not equal to torch's values (use `TorchCPUNoise` for that).

    Args:
        seed: any integer in [-2**63, 2**64); negatives wrap as in torch.
    """

    def __init__(self, seed: int):
        self.seed = torch_seed(seed)
        self._key = mx.random.key(self.seed)
        self._lock = threading.Lock()

    def normal(self, shape: Sequence[int], dtype: mx.Dtype = mx.float32) -> mx.array:
        shape, dtype = _checked_shape(shape), _checked_dtype(dtype)
        with self._lock:
            self._key, key = mx.random.split(self._key)
            # Materialise the carried key: a lazy one would tie the next draw to this thread's MLX stream, which
            # another thread cannot evaluate ("There is no Stream(cpu, 1) in current thread").
            mx.eval(self._key)
        return mx.random.normal(shape, dtype=mx.float32, key=key).astype(dtype)

    def reseeded(self, seed: int) -> MLXNoise:
        """A new source of this kind seeded with `seed` (Brownian trees draw from many seeds)."""
        return MLXNoise(seed)


class TorchCPUNoise:
    """torch's CPU generator: draw i equals the i-th `torch.randn(shape, generator=g, dtype=dtype)` after
    `g = torch.Generator().manual_seed(seed)`.

    With the default kernel, bit-identical to x86-64 torch (Linux wheels) for float32, float16 and bfloat16, any
    shape, any sequence of draws (small draws included, whose cached second Box-Muller value carries over between
    calls as in torch). Torch on ARM (Apple Silicon) computes the Box-Muller's log/sin/cos with its C library
    instead: `kernel="libm"` follows it up to the last bits.

    Args:
        seed: as for `torch.Generator.manual_seed`: [-2**63, 2**64), negatives wrap; only the low 32 bits reach
            the mt19937 engine, as in torch.
        kernel: "avx2" (x86-64 torch) or "libm" (torch on ARM).
    """

    def __init__(self, seed: int, kernel: str = "avx2"):
        self._generator = TorchCPUGenerator(seed, kernel)
        self.seed = self._generator.seed
        self._lock = threading.Lock()

    def normal(self, shape: Sequence[int], dtype: mx.Dtype = mx.float32) -> mx.array:
        shape, dtype = _checked_shape(shape), _checked_dtype(dtype)
        with self._lock:
            values = self._generator.randn(int(np.prod(shape)), half_precision=dtype in _HALF_DTYPES)
        # torch rounds its float32 values to half precision to nearest-even, as astype does.
        return mx.array(values.reshape(shape)).astype(dtype)

    def reseeded(self, seed: int) -> TorchCPUNoise:
        """A new source of this kind seeded with `seed` (A1111's `randn_local(seed, shape)` for Brownian trees)."""
        return TorchCPUNoise(seed, self._generator.kernel)


class PerImageNoise:
    """One noise source per image of the batch, like diffusers' list of generators.

    A draw of shape (B, ...) concatenates one (1, ...) draw from each of the B sources, in order. A single source
    draws the whole batch itself, as diffusers treats a one-element generator list like a lone generator.

    Args:
        sources: one `NoiseSource` per image.
    """

    def __init__(self, sources: Sequence[NoiseSource]):
        if not sources:
            raise ValueError("PerImageNoise needs at least one source")
        self.sources = list(sources)
        self._lock = threading.Lock()  # one batch draw takes the same draw index from every source

    def normal(self, shape: Sequence[int], dtype: mx.Dtype = mx.float32) -> mx.array:
        shape = _checked_shape(shape)
        if len(self.sources) == 1:
            return self.sources[0].normal(shape, dtype)
        if not shape or shape[0] != len(self.sources):
            raise ValueError(
                f"noise of shape {shape} asked from {len(self.sources)} per-image sources; the first dimension "
                f"must be the batch size {len(self.sources)}"
            )
        with self._lock:
            draws = [source.normal((1, *shape[1:]), dtype) for source in self.sources]
        return mx.concatenate(draws, axis=0)


def make_noise(mode: str, seed: int, batch_size: int = 1, per_image: bool = False) -> NoiseSource:
    """The noise source for a generation.

    Args:
        mode: "mlx" (`MLXNoise`), "torch-cpu" (`TorchCPUNoise`, x86-64 torch) or "torch-cpu-arm"
            (`TorchCPUNoise(kernel="libm")`, torch on Apple Silicon).
        seed: the generation's seed.
        batch_size: images per batch (used with `per_image`).
        per_image: give image i its own source seeded `seed + i` (A1111's convention; diffusers with
            `generator=[torch.Generator().manual_seed(seed + i) for i in range(batch_size)]`). Otherwise one
            source draws the whole batch (diffusers with a single generator).

    Returns:
        A `NoiseSource`.
    """
    kinds = {
        "mlx": MLXNoise,
        "torch-cpu": TorchCPUNoise,
        "torch-cpu-arm": lambda seed: TorchCPUNoise(seed, kernel="libm"),
    }
    if mode not in kinds:
        raise ValueError(f"unknown noise mode {mode!r}; choose one of {', '.join(NOISE_MODES)}")
    if not per_image:
        return kinds[mode](seed)
    return PerImageNoise([kinds[mode](seed + i) for i in range(batch_size)])
