"""sgemm and conv throughput with and without the system OpenBLAS preload, each in a fresh process.

    python benchmarks/blas.py            # prints GFLOP/s for MLX's own BLAS and for OpenBLAS

The preload must happen before mlx.core loads, so each measurement runs in its own interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = r"""
import json, time
import mlx_sd, mlx.core as mx
def rate(fn, flops, reps=3):
    mx.eval(fn())
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(fn())
    return flops * reps / (time.perf_counter() - t) / 1e9
n = 2048
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
x, w = mx.random.normal((2, 64, 64, 320)), mx.random.normal((320, 3, 3, 320))
mx.eval(a, b, x, w)
print(json.dumps({
    "blas": mlx_sd.backend.blas,
    "sgemm_gflops": rate(lambda: a @ b, 2 * n**3),
    "conv3x3_gflops": rate(lambda: mx.conv2d(x, w, padding=1), 2 * 2 * 64 * 64 * 320 * 320 * 9),
}))
"""


def measure(openblas: bool) -> dict:
    env = {**os.environ, "MLX_SD_OPENBLAS": "1" if openblas else "0"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


if __name__ == "__main__":
    base, fast = measure(False), measure(True)
    for r in (base, fast):
        print(f"{r['blas']:>20}: sgemm {r['sgemm_gflops']:7.1f} GFLOP/s, conv 3x3 {r['conv3x3_gflops']:7.1f} GFLOP/s")
    if fast["blas"].startswith("openblas"):
        print(
            f"speed-up: sgemm {fast['sgemm_gflops'] / base['sgemm_gflops']:.0f}x, "
            f"conv {fast['conv3x3_gflops'] / base['conv3x3_gflops']:.0f}x"
        )
