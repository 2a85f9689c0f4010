"""Which BLAS the CPU runs: the library MLX's CPU backend calls, and the products our own CPU kernels make.

MLX's Linux CPU wheel links the reference BLAS (~6 GFLOP/s sgemm on a 2-core x86 machine). A faster BLAS loaded
with RTLD_GLOBAL *before* `mlx.core` is first imported interposes `cblas_sgemm` and the LAPACK symbols libmlx binds
lazily; after `mlx.core` is loaded the binding is fixed, which is why `mlx_sd/__init__.py` imports `backend` (which
calls `preload`) before anything else. MLX_SD_BLAS chooses: "mkl", "openblas", "mlx" (MLX's own), or unset for the
best one installed:

- Intel's MKL, from the `mkl` wheel (an install requirement on x86-64 Linux). It runs the skinny products of SD's
  attention (41 or 65 wide) ~1.4x and SD's Linear layers ~1.2x faster than OpenBLAS here. Its threads are GNU
  OpenMP's, told not to spin after a call (`_load_gomp_without_spinning`): a spinning thread takes a core from the
  numpy workers that run right after MLX's products (Intel's OpenMP, used where libgomp is missing, spins 200 ms
  unless KMP_BLOCKTIME=0; GNU's ~7 ms unless GOMP_SPINCOUNT=0).
- the system OpenBLAS (Debian/Ubuntu `libopenblas0-pthread`). A distribution's OpenBLAS picks its kernels by CPU
  model and falls back to its oldest x86-64 kernels ("Prescott", SSE3) on models newer than itself: Debian 12's
  0.3.21 on a 5th-generation Xeon ran sgemm at 43 GFLOP/s instead of 300. Such a load is redone with the newest
  kernel family the CPU's flags allow (`_reload_with_known_core`); OPENBLAS_CORETYPE set by the user is left alone.

Nothing is loaded on macOS (MLX calls Accelerate) and nothing changes when MLX runs on a GPU.

`sgemm` is the product the CPU attention kernel calls from its worker threads, on the calling thread alone: MKL's
through ctypes (which releases the GIL) when MKL is loaded, else numpy's (whose bundled OpenBLAS is held to one
thread inside `numpy_blas_single_threaded`).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import glob
import os
import re
import sys
import threading
import warnings

import numpy as np

BLAS_ENV = "MLX_SD_BLAS"
CHOICES = ("mkl", "openblas", "mlx")
# Where Debian/Ubuntu (libopenblas0-pthread) and Fedora put it, tried after the loader cache.
_OPENBLAS_CANDIDATES = (
    "libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)
# MKL's C API constants (mkl_service.h, mkl_cblas.h).
_MKL_THREADING_INTEL, _MKL_THREADING_GNU = 0, 3
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112

_mkl = None  # the loaded libmkl_rt, once chosen


def preload() -> str:
    """Load the chosen BLAS for MLX; returns what MLX's CPU backend will call ("mkl (2026.2)",
    "openblas (SkylakeX)", "accelerate" or "mlx")."""
    if sys.platform == "darwin":
        return "accelerate"
    choice = os.environ.get(BLAS_ENV, "").lower() or "auto"
    if choice not in (*CHOICES, "auto"):
        raise ValueError(f"{BLAS_ENV}={choice!r}: expected one of {', '.join(CHOICES)} (or unset for the best found)")
    if choice == "mlx":
        return "mlx"
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx_sd was imported after mlx.core, so MLX keeps its slow reference BLAS on this CPU; "
            f"import mlx_sd first (or set {BLAS_ENV}=mlx to silence this)",
            RuntimeWarning,
            stacklevel=4,
        )
        return "mlx"
    if choice in ("auto", "mkl"):
        found = _load_mkl()
        if found:
            return found
        if choice == "mkl":
            warnings.warn(
                f"{BLAS_ENV}=mkl but MKL's libmkl_rt was not found: install it with pip install mkl; "
                "using OpenBLAS meanwhile",
                RuntimeWarning,
                stacklevel=4,
            )
    for name in filter(None, [ctypes.util.find_library("openblas"), *_OPENBLAS_CANDIDATES]):
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return f"openblas ({_reload_with_known_core(lib, name)})"
    return "mlx"


def _load_mkl() -> str | None:
    """libmkl_rt from the `mkl` wheel (installed under sys.prefix/lib) or the loader's path, set to GNU OpenMP."""
    global _mkl
    names = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    names.append(ctypes.util.find_library("mkl_rt"))
    for name in filter(None, names):
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        try:
            _load_gomp_without_spinning()
            lib.MKL_Set_Threading_Layer(_MKL_THREADING_GNU)  # before MKL's first call, or it is fixed
        except OSError:  # no GNU OpenMP runtime: Intel's (from the intel-openmp wheel), told not to spin
            os.environ.setdefault("KMP_BLOCKTIME", "0")
            lib.MKL_Set_Threading_Layer(_MKL_THREADING_INTEL)
        lib.cblas_sgemm.restype = None
        int_, float_, ptr = ctypes.c_int, ctypes.c_float, ctypes.c_void_p  # (layout, transposes, m, n, k, alpha, ...)
        lib.cblas_sgemm.argtypes = [int_] * 6 + [float_, ptr, int_, ptr, int_, float_, ptr, int_]
        # (..., alpha, a, lda, stride between a's, b, ldb, stride, beta, c, ldc, stride, batch size)
        strided = [float_, ptr, int_, int_, ptr, int_, int_, float_, ptr, int_, int_, int_]
        lib.cblas_sgemm_batch_strided.restype = None
        lib.cblas_sgemm_batch_strided.argtypes = [int_] * 6 + strided
        # (layout, then one array entry per group: transposes, m, n, k, alpha, a pointers, lda, b pointers, ldb, beta,
        # c pointers, ldc; the group count, group sizes). MKL_INT is 32-bit (libmkl_rt's default LP64 interface).
        lib.cblas_sgemm_batch.restype = None
        lib.cblas_sgemm_batch.argtypes = [int_] + [ptr] * 13 + [int_, ptr]
        version = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(version, len(version))
        _mkl = lib
        number = re.search(r"Version ([\d.]+)", version.value.decode(errors="replace"))
        return f"mkl ({number[1] if number else 'unknown'})"
    return None


def _load_gomp_without_spinning() -> None:
    """Load GNU OpenMP (libgomp) with its idle threads sleeping at once instead of spinning.

    libgomp's threads spin 300,000 `pause`s after each parallel region, ~7 ms of a core on CPUs since Skylake (PAUSE
    takes ~140 cycles there). MLX's products are followed by our attention and row kernels on both cores, which
    that spinning thread halved: an SDXL 512x512 step took 15.0 / 16.2 / 15.7 s with it and 11.9 / 14.5 / 13.4 s
    without, in alternating processes (SD1.5 level; waking a sleeping thread costs microseconds per product).
    libgomp reads GOMP_SPINCOUNT when it loads, so it is set for this load only: child processes (the torch side of
    the benchmarks) and a later torch, with a libgomp of its own, keep their defaults. A user's OMP_WAIT_POLICY or
    GOMP_SPINCOUNT wins; a libgomp already loaded by something else keeps the settings it loaded with."""
    user_set = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if not user_set:
        os.environ["GOMP_SPINCOUNT"] = "0"
    try:
        ctypes.CDLL("libgomp.so.1")
    finally:
        if not user_set:
            del os.environ["GOMP_SPINCOUNT"]


# OpenBLAS kernel families without AVX2/FMA; "Prescott" is also where DYNAMIC_ARCH builds land on unknown CPU models.
_PRE_AVX2_CORES = {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom", "Sandybridge"}
_AVX512_FLAGS = {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"}


def _reload_with_known_core(lib: ctypes.CDLL, name: str) -> str:
    """The kernel family OpenBLAS chose, after reloading it with a better one where it fell back below the CPU."""
    core = _corename(lib)
    best = _best_core(_cpu_flags())
    if core not in _PRE_AVX2_CORES or best is None or "OPENBLAS_CORETYPE" in os.environ:
        return core
    import _ctypes

    _ctypes.dlclose(lib._handle)  # nothing else holds it yet, so the next load runs OpenBLAS's set-up again
    os.environ["OPENBLAS_CORETYPE"] = best  # read once, by that set-up; numpy's own OpenBLAS must not see it
    try:
        lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    finally:
        del os.environ["OPENBLAS_CORETYPE"]
    return _corename(lib)


def _corename(lib: ctypes.CDLL) -> str:
    try:
        lib.openblas_get_corename.restype = ctypes.c_char_p
        return lib.openblas_get_corename().decode()
    except AttributeError:  # not a DYNAMIC_ARCH build: its kernels were chosen when it was compiled
        return "unknown"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _best_core(flags: set[str]) -> str | None:
    """The OpenBLAS kernel family (OPENBLAS_CORETYPE) for an x86-64 CPU with these /proc/cpuinfo flags."""
    if _AVX512_FLAGS <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


# --- products on the calling thread ------------------------------------------------------------------------------


def _operand(x: np.ndarray) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a 2-D float32 view that BLAS can read in place, else None."""
    if x.dtype != np.float32 or x.ndim != 2 or x.strides[0] % 4 or x.strides[1] % 4:
        return None
    rows, cols = x.shape
    if x.strides[1] == 4 and x.strides[0] >= 4 * max(cols, 1):
        return _NO_TRANS, x.strides[0] // 4
    if x.strides[0] == 4 and x.strides[1] >= 4 * max(rows, 1):
        return _TRANS, x.strides[1] // 4
    return None


def has_single_threaded_sgemm() -> bool:
    """Whether `sgemm` can run on the calling thread alone (MKL loaded, or numpy's OpenBLAS found)."""
    return _mkl is not None or numpy_blas_threads() is not None


def sgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, alpha: float = 1.0) -> np.ndarray:
    """alpha * a @ b for 2-D float32 arrays (strided views taken as they are) on the calling thread only."""
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), np.float32)
    ops = _mkl_operands(a, b, out)
    if ops is None:
        return _scaled(np.matmul(a, b, out=out), alpha)
    (ta, lda), (tb, ldb), (_, ldc) = ops
    (m, k), n = a.shape, b.shape[1]
    with _one_mkl_thread():
        _mkl.cblas_sgemm(_ROW_MAJOR, ta, tb, m, n, k, alpha, a.ctypes.data, lda, b.ctypes.data, ldb, 0.0,
                         out.ctypes.data, ldc)  # fmt: skip
    return out


def sgemm_batch(a: np.ndarray, b: np.ndarray, out: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """out[i] = alpha * a[i] @ b[i] for 3-D float32 stacks of strided views, one stride between matrices (inputs may
    interleave: SD's heads side by side in a token-major array), on the calling thread only: MKL's
    `cblas_sgemm_batch_strided` (one call; MKL rejects outputs that interleave) where MKL is loaded, else numpy's
    matmul (its BLAS per matrix, looped in C)."""
    ops = _mkl_operands(a[0], b[0], out[0]) if len(a) else None
    if ops is None or any(x.strides[0] % 4 for x in (a, b, out)):
        return _scaled(np.matmul(a, b, out=out), alpha)
    (ta, lda), (tb, ldb), (_, ldc) = ops
    (batch, m, k), n = a.shape, b.shape[2]
    with _one_mkl_thread():
        if out.strides[0] >= 4 * ldc * m:
            _mkl.cblas_sgemm_batch_strided(_ROW_MAJOR, ta, tb, m, n, k, alpha, a.ctypes.data, lda,
                                           a.strides[0] // 4, b.ctypes.data, ldb, b.strides[0] // 4, 0.0,
                                           out.ctypes.data, ldc, out.strides[0] // 4, batch)  # fmt: skip
        else:  # interleaved outputs, which the strided call refuses (printing an error): one pointer per matrix
            pointers = [x.ctypes.data + x.strides[0] * np.arange(batch, dtype=np.int64) for x in (a, b, out)]
            ints = [np.array([v], np.int32) for v in (ta, tb, m, n, k, lda, ldb, ldc, batch)]
            scalars = np.array([alpha, 0.0], np.float32)
            _mkl.cblas_sgemm_batch(_ROW_MAJOR, *(x.ctypes.data for x in ints[:5]), scalars.ctypes.data,
                                   pointers[0].ctypes.data, ints[5].ctypes.data, pointers[1].ctypes.data,
                                   ints[6].ctypes.data, scalars.ctypes.data + 4, pointers[2].ctypes.data,
                                   ints[7].ctypes.data, 1, ints[8].ctypes.data)  # fmt: skip
    return out


def _scaled(out: np.ndarray, alpha: float) -> np.ndarray:
    if alpha != 1.0:
        out *= np.float32(alpha)
    return out


def _mkl_operands(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> list | None:
    """(transpose flag, leading dimension) of a, b and out for MKL, or None where numpy must do the product."""
    if _mkl is None or 0 in a.shape or 0 in b.shape:
        return None
    ops = [_operand(x) for x in (a, b, out)]
    return None if None in ops or ops[2][0] != _NO_TRANS else ops


@contextlib.contextmanager
def _one_mkl_thread():
    previous = _mkl.MKL_Set_Num_Threads_Local(1)  # this thread only; the others keep theirs
    try:
        yield
    finally:
        _mkl.MKL_Set_Num_Threads_Local(previous)


# --- numpy's own BLAS -------------------------------------------------------------------------------------------

_NUMPY_BLAS_SYMBOLS = (  # (get, set) pairs of the OpenBLAS builds numpy wheels bundle
    ("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),  # numpy >= 2
    ("openblas_get_num_threads64_", "openblas_set_num_threads64_"),  # numpy 1.2x
    ("openblas_get_num_threads", "openblas_set_num_threads"),
)
_numpy_blas: tuple | None | bool = False  # False: not looked up yet
_numpy_blas_lock = threading.Lock()
_numpy_blas_users = 0
_numpy_blas_saved = 1


def numpy_blas_threads():
    """(get, set) thread-count functions of the OpenBLAS numpy uses, or None (found via /proc/self/maps)."""
    global _numpy_blas
    if _numpy_blas is not False:
        return _numpy_blas
    _numpy_blas = None
    try:
        root = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy.libs, scipy_openblas*
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line and root in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for get, set_ in _NUMPY_BLAS_SYMBOLS:
                if hasattr(lib, get) and hasattr(lib, set_):
                    _numpy_blas = (getattr(lib, get), getattr(lib, set_))
                    return _numpy_blas
    except OSError:
        pass
    return _numpy_blas


@contextlib.contextmanager
def numpy_blas_single_threaded():
    """numpy's BLAS on one thread while inside (re-entrant across threads; the first count is restored at exit)."""
    global _numpy_blas_users, _numpy_blas_saved
    fns = numpy_blas_threads()
    if fns is None:
        yield
        return
    get, set_ = fns
    with _numpy_blas_lock:
        if _numpy_blas_users == 0:
            _numpy_blas_saved = get()
            set_(1)
        _numpy_blas_users += 1
    try:
        yield
    finally:
        with _numpy_blas_lock:
            _numpy_blas_users -= 1
            if _numpy_blas_users == 0:
                set_(_numpy_blas_saved)
