"""Time per draw of each noise source at latent sizes (SD1 512px, SDXL 1024px, a batch of 4).

    python benchmarks/rng.py

"torch-cpu" runs numpy on the CPU whatever the device; "mlx" runs on MLX's default device.
"""

from __future__ import annotations

import time

# isort: off
import mlx_sd  # noqa: F401  (before mlx.core: BLAS preload)
import mlx.core as mx
from mlx_sd.rng import NOISE_MODES, make_noise

# isort: on

SHAPES = [(1, 4, 64, 64), (1, 4, 128, 128), (4, 4, 128, 128)]


def ms_per_draw(mode: str, shape: tuple[int, ...], dtype: mx.Dtype, reps: int = 10) -> float:
    """Best of `reps` evaluated draws (the minimum is the least disturbed by other processes)."""
    noise = make_noise(mode, seed=0)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mx.eval(noise.normal(shape, dtype))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


if __name__ == "__main__":
    for mode in NOISE_MODES:
        for shape in SHAPES:
            for dtype in (mx.float32, mx.float16):
                print(f"{mode:14s} {str(shape):18s} {str(dtype):16s} {ms_per_draw(mode, shape, dtype):7.2f} ms")
