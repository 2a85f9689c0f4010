"""Per-backend decisions, in one place: which BLAS the CPU uses, how CPU memory is allocated, which dtype models
run in, which attention kernel runs.

Which BLAS MLX's CPU backend calls is chosen in `cpu_blas` (MKL or the system OpenBLAS on Linux, loaded before
`mlx.core`, which is why `mlx_sd/__init__.py` imports this module before anything else).

MLX's CPU allocator takes every buffer from malloc and frees it right after use, and glibc serves blocks above
128 KiB-32 MiB with a fresh mmap: every large activation then costs one page fault per 4 KiB page as the kernel
zeroes it (~2.5 ns per float32 element here, more than the arithmetic of a multiply). Keeping such blocks in
malloc's heap for reuse (`_keep_freed_memory`) makes elementwise ops 3-5x faster; the price is that the process keeps
its peak heap until `release_cpu_memory()` is called. Set MLX_SD_MALLOC=0 to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import sys
import warnings

from . import cpu_blas

MALLOC_ENV = "MLX_SD_MALLOC"
THREADS_ENV = "MLX_SD_CPU_THREADS"
WINOGRAD_ENV = "MLX_SD_WINOGRAD"
NUMBA_ENV = "MLX_SD_NUMBA"


def _off(env: str) -> bool:
    return os.environ.get(env, "1").lower() in ("0", "false", "no", "off")


_libc = None


def _keep_freed_memory() -> bool:
    """Serve large allocations from glibc's heap instead of fresh mmaps (see the module docstring)."""
    global _libc
    if not sys.platform.startswith("linux") or _off(MALLOC_ENV):
        return False
    try:
        _libc = ctypes.CDLL("libc.so.6")
        # mallopt parameters from <malloc.h>: M_TRIM_THRESHOLD = -1, M_MMAP_MAX = -4 (0: never mmap).
        return bool(_libc.mallopt(-4, 0)) and bool(_libc.mallopt(-1, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


def release_cpu_memory() -> None:
    """Hand freed CPU memory back to the system (after a generation, in a long-running server)."""
    mx.clear_cache()
    if _libc is not None:
        _libc.malloc_trim(0)


blas = cpu_blas.preload()  # which BLAS MLX's CPU backend calls
malloc_tuned = _keep_freed_memory()

import mlx.core as mx  # noqa: E402  (must follow the preload above)


def on_gpu() -> bool:
    """True when MLX's default device is a GPU (Metal on Apple Silicon, or CUDA)."""
    return mx.default_device().type == mx.DeviceType.gpu


def default_dtype() -> mx.Dtype:
    """The dtype models run in unless the caller asks otherwise.

    float16 on GPUs. float32 on CPU: half-precision matmuls have no BLAS path there (~5 GFLOP/s).
    """
    return mx.float16 if on_gpu() else mx.float32


# At most this much memory on the device (a 16 GB Mac) and generation runs in low-memory mode unless asked otherwise.
SMALL_MEMORY_BYTES = 16 * 2**30


def device_memory() -> int | None:
    """Bytes of memory the default device can use: Metal's unified memory, the machine's RAM on CPU, None on CUDA."""
    if mx.metal.is_available() and on_gpu():
        return int(mx.metal.device_info()["memory_size"])
    if on_gpu():
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def small_memory() -> bool:
    """True on devices with at most 16 GiB: the pipeline then frees stages it no longer needs by default."""
    memory = device_memory()
    return memory is not None and memory <= SMALL_MEMORY_BYTES


_cpu_streams: list = []


def cpu_streams() -> list:
    """One MLX CPU stream per core (created once), for independent work such as casting weights at load."""
    if not _cpu_streams:
        _cpu_streams.extend(mx.new_stream(mx.cpu) for _ in range(cpu_threads()))
    return _cpu_streams


def row_block_streams() -> list:
    """CPU streams to spread row-wise elementwise work over (LayerNorm, GEGLU), or [] where that does not pay.

    MLX runs each CPU operation on one thread (only its BLAS calls use every core); a GPU runs them in parallel.
    """
    if on_gpu() or cpu_threads() < 2:
        return []
    return cpu_streams()


def cpu_threads() -> int:
    """Threads for CPU work done outside MLX (numpy's exp in the blocked attention): the cores we may run on."""
    if os.environ.get(THREADS_ENV):
        return max(1, int(os.environ[THREADS_ENV]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def attention_kernel(dtype: mx.Dtype) -> str:
    """ "fused" (MLX's scaled_dot_product_attention) or "blocked" (BLAS products + numpy's exp per head; see
    attention.py).

    MLX's fused kernel everywhere except float32 on a Linux CPU: there MLX's softmax runs a scalar exp (~15 ns per
    element on x86, numpy's vectorised one ~1.5 ns), which made self-attention over 4,096 tokens dominate a UNet
    step. The blocked path needs products that run on one thread inside its workers (`cpu_blas.sgemm`: MKL's, or
    numpy's OpenBLAS held to one thread); where neither is at hand it is used only when there is one core to run on.
    """
    if on_gpu() or dtype != mx.float32 or sys.platform == "darwin":
        return "fused"
    if cpu_threads() > 1 and not cpu_blas.has_single_threaded_sgemm():
        return "fused"
    return "blocked"


def conv3x3_kernel(dtype: mx.Dtype) -> str:
    """How large 3x3 convolutions run (models/layers.py): "mlx" (MLX's conv) on GPUs, which convolve directly; on
    CPU, where MLX unfolds the input into a 9x buffer with one thread, "winograd" in float32 (F(4x4, 3x3): a quarter
    of the products, 3-7x a direct convolution's rounding error; MLX_SD_WINOGRAD=0 turns it off) and "taps" (nine
    per-tap products) otherwise."""
    if on_gpu():
        return "mlx"
    return "winograd" if dtype == mx.float32 and not _off(WINOGRAD_ENV) else "taps"


def activations() -> str:
    """How SiLU and GELU are evaluated (models/layers.py): "builtin" uses MLX's own (GPUs, macOS: fast there);
    "cpu" (Linux CPU) uses compiled rational forms, and numpy's vectorised exp across cores for the SiLU after a
    GroupNorm, where MLX's scalar exp/erf cost 15-45 ns per element."""
    return "builtin" if on_gpu() or sys.platform == "darwin" else "cpu"


def row_kernels(dtype: mx.Dtype) -> str:
    """How LayerNorm, the GEGLU gate, GroupNorm and the Linear layers' biases run: "numba" (cpu_kernels: vectorised
    passes, rows across cores) for float32 on a Linux CPU where numba is installed and imports (MLX_SD_NUMBA=0 turns
    it off), else "mlx" (MLX's ops; on CPU, LayerNorm and GEGLU in row blocks across streams, `layers.rowwise`)."""
    if on_gpu() or sys.platform == "darwin" or dtype != mx.float32 or _off(NUMBA_ENV):
        return "mlx"
    return "numba" if _numba_installed() else "mlx"


@functools.cache
def _numba_installed() -> bool:
    """numba is installed and imports (it refuses numpy versions newer than it knows, with an ImportError)."""
    if importlib.util.find_spec("numba") is None:
        return False
    try:
        import numba  # noqa: F401
    except Exception as e:  # noqa: BLE001  (anything numba raises at import leaves MLX's ops to run)
        warnings.warn(
            f"numba is installed but does not import ({e}); LayerNorm, GEGLU and GroupNorm run on MLX's slower CPU "
            f"ops. Fix: pip install -U numba (or set {NUMBA_ENV}=0 to silence this)",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


_pool = None


def cpu_map_inplace(fn, x) -> None:
    """Apply `fn` (which works in place and releases the GIL, as numpy ufuncs do) to `x` split across the cores."""
    global _pool
    workers = cpu_threads()
    if workers < 2 or x.size < 2**16:
        fn(x)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(workers, thread_name_prefix="mlx_sd_cpu")
    for f in [_pool.submit(fn, part) for part in _split(x, workers)]:
        f.result()


def cpu_map(fn, tasks) -> None:
    """Run fn(task) for every task on the CPU worker threads (one per core)."""
    global _pool
    if cpu_threads() < 2 or len(tasks) < 2:
        for t in tasks:
            fn(t)
        return
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(cpu_threads(), thread_name_prefix="mlx_sd_cpu")
    list(_pool.map(fn, tasks))


def _split(x, n: int) -> list:
    bounds = [len(x) * i // n for i in range(n + 1)]
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def describe() -> dict:
    """What this process runs on, for benchmark records and `mlx-sd --version`."""
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "cpu_blas": blas,
        "cpu_malloc_tuned": malloc_tuned,
        "cpu_threads": cpu_threads(),
        "dtype": str(default_dtype()),
        "attention": attention_kernel(default_dtype()),
        "activations": activations(),
        "row_kernels": row_kernels(default_dtype()),
        "conv3x3": conv3x3_kernel(default_dtype()),
    }
