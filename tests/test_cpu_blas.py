"""The CPU BLAS choice (mlx_sd/cpu_blas.py): each library MLX can be given, checked in a fresh process (the preload
must precede mlx.core), and the single-threaded products the blocked attention calls, against numpy in float64."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_sd import backend, cpu_blas

pytestmark = pytest.mark.skipif(sys.platform == "darwin", reason="macOS: MLX calls Accelerate, nothing is preloaded")

# In a fresh process: which BLAS MLX got, and an MLX product (through that BLAS) against float64.
_PROBE = r"""
import json, warnings
warnings.simplefilter("ignore")
import mlx_sd, mlx.core as mx, numpy as np
from mlx_sd import backend
rng = np.random.default_rng(0)
a, b = rng.standard_normal((300, 200), np.float32), rng.standard_normal((200, 100), np.float32)
got = np.array(mx.array(a) @ mx.array(b))
ref = a.astype(np.float64) @ b.astype(np.float64)
print(json.dumps({"blas": backend.blas, "err": float(np.abs(got - ref).max() / np.abs(ref).max())}))
"""


def _probe(choice: str) -> dict:
    env = {**os.environ, cpu_blas.BLAS_ENV: choice}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _have_mkl() -> bool:
    return _probe("mkl")["blas"].startswith("mkl (")


def test_mlx_keeps_its_own_blas():
    r = _probe("mlx")
    assert r["blas"] == "mlx" and r["err"] < 1e-5


def test_openblas_is_preloaded_with_the_cpus_kernel_family():
    """A system OpenBLAS older than the CPU falls back to SSE3 kernels ("Prescott", 6x slower sgemm): mlx_sd
    reloads it with the kernel family the CPU's flags allow (cpu_blas._reload_with_known_core)."""
    assert cpu_blas._best_core({"avx2", "fma", *cpu_blas._AVX512_FLAGS}) == "SkylakeX"
    assert cpu_blas._best_core({"avx2", "fma", "avx512f"}) == "Haswell"  # AVX-512 without BW/VL: no SkylakeX kernels
    assert cpu_blas._best_core({"sse4_2"}) is None
    r = _probe("openblas")
    if not r["blas"].startswith("openblas ("):
        pytest.skip(f"no system OpenBLAS here (MLX uses {r['blas']})")
    assert r["err"] < 1e-5
    core = r["blas"].removeprefix("openblas (").removesuffix(")")
    if cpu_blas._best_core(cpu_blas._cpu_flags()) is not None:
        assert core not in cpu_blas._PRE_AVX2_CORES, f"OpenBLAS runs its {core} kernels on an AVX2 CPU"


def test_mkl_is_preloaded_when_installed():
    r = _probe("mkl")
    if not r["blas"].startswith("mkl ("):
        pytest.skip(f"MKL is not installed (pip install mkl); MLX uses {r['blas']}")
    assert r["err"] < 1e-5
    assert _probe("")["blas"] == r["blas"], "unset MLX_SD_BLAS should prefer an installed MKL"


@pytest.mark.parametrize("user_env", [{}, {"GOMP_SPINCOUNT": "5000"}, {"OMP_WAIT_POLICY": "active"}])
def test_mkl_openmp_threads_do_not_spin_unless_the_user_says(user_env):
    """GNU OpenMP (libgomp) reports the spin count it loaded with under OMP_DISPLAY_ENV=verbose: 0 for MKL's threads
    (a spinning thread took a core from the workers after each product), the user's where set; the variable is not
    left in the environment for child processes."""
    code = "import os, mlx_sd; print(mlx_sd.backend.blas, os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update({cpu_blas.BLAS_ENV: "mkl", "OMP_DISPLAY_ENV": "verbose", **user_env})
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    blas, left = out.stdout.split()[0], out.stdout.split()[-1]
    if not blas.startswith("mkl") or "GOMP_SPINCOUNT = " not in out.stderr:
        pytest.skip(f"MKL on GNU OpenMP is not available here (MLX uses {blas})")
    spins = out.stderr.split("GOMP_SPINCOUNT = ")[1].split()[0].strip("'")
    if not user_env:
        assert spins == "0" and left == "None"
    elif "GOMP_SPINCOUNT" in user_env:
        assert spins == "5000" and left == "5000"
    else:
        assert spins != "0", "OMP_WAIT_POLICY=active was overridden"


def test_mkl_asked_for_but_missing_warns_with_the_fix():
    """MKL is looked for under sys.prefix/lib (where the `mkl` wheel puts it) and on the loader's path."""
    code = "import sys; sys.prefix = '/nonexistent'; import mlx_sd; print(mlx_sd.backend.blas)"
    env = {**os.environ, cpu_blas.BLAS_ENV: "mkl"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("mkl ("):
        pytest.skip("libmkl_rt is on the system loader's path here")
    assert "MLX_SD_BLAS=mkl but MKL's libmkl_rt was not found: install it with pip install mkl" in out.stderr
    assert not out.stdout.startswith("mkl")


def test_unknown_choice_names_the_choices():
    env = {**os.environ, cpu_blas.BLAS_ENV: "atlas"}
    out = subprocess.run([sys.executable, "-c", "import mlx_sd"], env=env, capture_output=True, text=True)
    assert out.returncode != 0
    assert "MLX_SD_BLAS='atlas': expected one of mkl, openblas, mlx" in out.stderr


@pytest.mark.parametrize("path", ["mkl", "numpy"])
@pytest.mark.parametrize(
    "a_shape,b_shape,a_view,b_view",
    [
        ((256, 41), (41, 4096), "rows", "transposed"),  # the attention's q k^T, k read transposed in place
        ((256, 4096), (4096, 41), "rows", "rows"),  # its p v
        ((64, 40), (40, 256), "rows", "column slice transposed"),  # the shift sample's logits
        ((40, 64), (64, 10), "transposed", "rows"),
        ((1, 7), (7, 1), "rows", "rows"),
    ],
)
def test_sgemm_views(monkeypatch, path, a_shape, b_shape, a_view, b_view):
    if path == "mkl" and cpu_blas._mkl is None:
        pytest.skip(f"MKL is not loaded here (MLX's BLAS: {backend.blas})")
    if path == "numpy":
        monkeypatch.setattr(cpu_blas, "_mkl", None)
    rng = np.random.default_rng(0)

    def view(shape, how):
        if how == "rows":
            return rng.standard_normal(shape, np.float32)
        if how == "transposed":
            return rng.standard_normal(shape[::-1], np.float32).T
        return rng.standard_normal((shape[1], shape[0] + 1), np.float32)[:, : shape[0]].T

    a = view(a_shape, a_view)
    b = view(b_shape, b_view)
    out = np.full((a.shape[0] + 3, b.shape[1]), np.nan, np.float32)
    with cpu_blas.numpy_blas_single_threaded():
        got = cpu_blas.sgemm(a, b, out=out[: a.shape[0]])
        fresh = cpu_blas.sgemm(a, b)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert np.shares_memory(got, out)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(fresh, got)
    assert np.isnan(out[a.shape[0] :]).all(), "wrote outside the output view"


@pytest.mark.parametrize("path", ["mkl", "numpy"])
def test_sgemm_batch_of_strided_heads(monkeypatch, path):
    """Heads as the small-heads attention passes them: token-major (n, heads, e) arrays viewed as (heads, n, e)
    stacks, transposed views, a sliced sample of rows; against float64."""
    if path == "mkl" and cpu_blas._mkl is None:
        pytest.skip(f"MKL is not loaded here (MLX's BLAS: {backend.blas})")
    if path == "numpy":
        monkeypatch.setattr(cpu_blas, "_mkl", None)
    rng = np.random.default_rng(1)
    heads, N, M, e = 5, 48, 30, 9
    q = rng.standard_normal((N, heads, e), np.float32).transpose(1, 0, 2)  # (heads, N, e), interleaved rows
    k = rng.standard_normal((M, heads, e), np.float32).transpose(1, 0, 2)
    cases = [(q, k.transpose(0, 2, 1)), (k[:, ::7, :], q.transpose(0, 2, 1)), (q[:, :, :4], q[:, :4, :])]
    with cpu_blas.numpy_blas_single_threaded():
        for a, b in cases:
            out = np.empty((heads, a.shape[1], b.shape[2]), np.float32)
            got = cpu_blas.sgemm_batch(a, b, out)
            ref = a.astype(np.float64) @ b.astype(np.float64)
            assert got is out
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        # token-major output (heads interleaved row by row), which MKL's strided batch refuses: its pointer batch
        # runs it; with alpha, which numpy's path applies afterwards
        out = np.full((N, heads, M), np.nan, np.float32).transpose(1, 0, 2)
        got = cpu_blas.sgemm_batch(q, k.transpose(0, 2, 1), out, alpha=0.25)
        ref = 0.25 * q.astype(np.float64) @ k.transpose(0, 2, 1).astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
        got = cpu_blas.sgemm(q[1], k[1].T, alpha=-2.0)
        np.testing.assert_allclose(got, -2 * ref[1] / 0.25, rtol=0, atol=1e-5 * np.abs(ref).max() * 8)
