"""sgemm, conv and attention-product throughput for each CPU BLAS choice (MLX_SD_BLAS), each in a fresh process.

    python benchmarks/blas.py            # MLX's own BLAS, the system OpenBLAS, and MKL where installed

The preload must happen before mlx.core loads, so each measurement runs in its own interpreter. "attention" is the
blocked attention's two products for one 256-row block of 4,096-token SD1.5 self-attention (41 wide: d = 40 plus
the folded shift / row-sum column), through cpu_blas.sgemm on one thread per worker, all workers at once, as they run
inside a step; reported per worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = r"""
import json, time
import mlx_sd, mlx.core as mx, numpy as np
from mlx_sd import backend, cpu_blas
def rate(fn, flops, reps=3, sync=mx.eval):
    sync(fn())
    t = time.perf_counter()
    for _ in range(reps):
        sync(fn())
    return flops * reps / (time.perf_counter() - t) / 1e9
n = 2048
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
x, w = mx.random.normal((2, 64, 64, 320)), mx.random.normal((320, 3, 3, 320))
mx.eval(a, b, x, w)
rng = np.random.default_rng(0)
q, k = rng.standard_normal((256, 41), np.float32), rng.standard_normal((4096, 41), np.float32)
workers = backend.cpu_threads()
scores = [np.empty((256, 4096), np.float32) for _ in range(workers)]
def products(s):
    for _ in range(20):
        cpu_blas.sgemm(q, k.T, out=s)
        cpu_blas.sgemm(s, k)
def all_workers():
    backend.cpu_map(products, scores) if workers > 1 else products(scores[0])
with cpu_blas.numpy_blas_single_threaded():
    attention = rate(all_workers, 20 * 2 * 2 * 256 * 4096 * 41) / workers
print(json.dumps({
    "blas": mlx_sd.backend.blas,
    "sgemm_gflops": rate(lambda: a @ b, 2 * n**3),
    "conv3x3_gflops": rate(lambda: mx.conv2d(x, w, padding=1), 2 * 2 * 64 * 64 * 320 * 320 * 9),
    "attention_gflops": attention,
}))
"""


def measure(choice: str) -> dict:
    env = {**os.environ, "MLX_SD_BLAS": choice}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _PROBE], env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout)


if __name__ == "__main__":
    results = [measure("mlx"), measure("openblas")]
    mkl = measure("mkl")
    if mkl["blas"].startswith("mkl"):
        results.append(mkl)
    else:
        print("MKL is not installed (pip install mkl); measured MLX's BLAS and OpenBLAS")
    for r in results:
        print(
            f"{r['blas']:>20}: sgemm {r['sgemm_gflops']:6.1f} GFLOP/s, conv 3x3 {r['conv3x3_gflops']:6.1f}, "
            f"attention products {r['attention_gflops']:5.1f} per worker"
        )
