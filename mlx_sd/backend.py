"""Per-backend decisions, in one place: which BLAS the CPU uses, which dtype models run in.

MLX's Linux CPU wheel links the reference BLAS (~6 GFLOP/s sgemm on a 2-core x86 machine). The system OpenBLAS,
loaded with RTLD_GLOBAL *before* `mlx.core` is first imported, interposes `cblas_sgemm` and the LAPACK symbols
libmlx binds lazily and runs ~30x faster. After `mlx.core` is loaded the binding is fixed, which is why
`mlx_sd/__init__.py` imports this module before anything else. Set MLX_SD_OPENBLAS=0 to keep MLX's own BLAS.
Nothing changes on macOS (Accelerate) or when MLX runs on a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

OPENBLAS_ENV = "MLX_SD_OPENBLAS"
# Where Debian/Ubuntu (libopenblas0-pthread) and Fedora put it, tried after the loader cache.
_OPENBLAS_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

blas = "mlx"  # which BLAS MLX's CPU backend calls: "openblas" once preloaded, "accelerate" on macOS


def _preload_openblas() -> str:
    if sys.platform == "darwin":
        return "accelerate"
    if os.environ.get(OPENBLAS_ENV, "1").lower() in ("0", "false", "no", "off"):
        return "mlx"
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx_sd was imported after mlx.core, so MLX keeps its slow reference BLAS on this CPU; "
            "import mlx_sd first (or set MLX_SD_OPENBLAS=0 to silence this)",
            RuntimeWarning,
            stacklevel=3,
        )
        return "mlx"
    names = [ctypes.util.find_library("openblas"), *_OPENBLAS_CANDIDATES]
    for name in filter(None, names):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return "openblas"
        except OSError:
            continue
    return "mlx"


blas = _preload_openblas()

import mlx.core as mx  # noqa: E402  (must follow the preload above)


def on_gpu() -> bool:
    """True when MLX's default device is a GPU (Metal on Apple Silicon, or CUDA)."""
    return mx.default_device().type == mx.DeviceType.gpu


def default_dtype() -> mx.Dtype:
    """The dtype models run in unless the caller asks otherwise.

    float16 on GPUs. float32 on CPU: half-precision matmuls have no BLAS path there (~5 GFLOP/s).
    """
    return mx.float16 if on_gpu() else mx.float32


def describe() -> dict:
    """What this process runs on, for benchmark records and `mlx-sd --version`."""
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "cpu_blas": blas,
        "dtype": str(default_dtype()),
    }
