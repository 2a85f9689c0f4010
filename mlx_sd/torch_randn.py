"""torch's CPU `randn` reproduced in numpy, bit for bit: the generator behind `rng.TorchCPUNoise`.

`torch.Generator().manual_seed(seed)` followed by `torch.randn(shape, generator=g, dtype=...)` calls on CPU draws:

- 32-bit words from an mt19937 engine seeded by Knuth's recurrence with `seed mod 2**32`
  (ATen/core/MT19937RNGEngine.h, CPUGeneratorImpl.cpp);
- for tensors of 16 or more elements (ATen/native/cpu/DistributionTemplates.h, `normal_fill`): float uniforms
  `(word & 0xFFFFFF) * 2**-24`, transformed 16 at a time by Box-Muller (elements j and j + 8 of a chunk share a
  pair), and when the size is not a multiple of 16, 16 fresh uniforms recompute the last 16 elements. float32
  tensors draw one uniform per element first and then the 16 for the tail; float16/bfloat16 tensors draw only
  16 per whole chunk and 16 for the tail (they fill a 16-float buffer), so their streams differ after the first
  partial chunk;
- for tensors of fewer than 16 elements: one double-precision Box-Muller pair per two values, from 53-bit
  uniforms of two words each, the second value of a pair cached in the generator for the next call (a cache the
  >= 16 path neither uses nor clears).

Only the 16-wide Box-Muller depends on the build (`KERNELS`):

- "avx2": x86-64 torch (also on AVX-512 CPUs: `normal_stub` is never dispatched to AVX-512) computes log and
  sincos with the Cephes polynomials of ATen/native/cpu/avx_mathfun.h, which GCC compiles with multiply-adds fused
  into FMAs. `_log_avx2` and `_sincos_avx2` replay that machine code (`NormalFill16<float, true>` in the Linux
  x86-64 libtorch_cpu.so of torch 2.13) in float32 numpy, rounding each FMA once: bit-identical.
- "libm": torch builds without AVX2 (ARM: Apple Silicon and aarch64 Linux; x86 under ATEN_CPU_CAPABILITY=default)
  call the C library's logf and sincosf per element. They differ from the AVX2 kernel in ~38% of values (by up to
  2e-6), and the C libraries differ in their last bits, so this kernel uses correctly rounded log/sin/cos (float64
  rounded to float32): against glibc's torch about 1.5% of values differ, by at most a few ulp.
"""

from __future__ import annotations

import math

import numpy as np

MT_STATE_SIZE = 624
FLOAT_MANTISSA_BITS = 24  # torch's float uniforms keep the low 24 bits of a word
DOUBLE_MANTISSA_BITS = 53  # and its double uniforms the low 53 bits of two words
CHUNK = 16  # normal_fill transforms 16 uniforms at a time: 8 Box-Muller pairs (j, j + 8)
PAIRS = CHUNK // 2
TWO_PI_F32 = np.float32(2.0 * math.pi)

# avx_mathfun.h constants (Cephes), as float32.
SQRT_HALF = np.float32(0.707106781186547524)
LOG_POLY = [np.float32(c) for c in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                                    1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                                    3.3333331174e-1)]  # fmt: skip
LOG_Q1, LOG_Q2 = np.float32(-2.12194440e-4), np.float32(0.693359375)  # ln 2 = Q2 - Q1, split for precision
FOUR_OVER_PI = np.float32(1.27323954473516)
PI_OVER_4_PARTS = [np.float32(c) for c in (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8)]
COS_POLY = [np.float32(c) for c in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)]
SIN_POLY = [np.float32(c) for c in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)]

_DROPPED_BITS = 52 - 23  # float64 mantissa bits below float32 precision
_DROPPED_MASK = np.uint64((1 << _DROPPED_BITS) - 1)
_HALFWAY = np.uint64(1 << (_DROPPED_BITS - 1))


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c rounded once, as the FMA instruction does.

    The product of two float32 is exact in float64; the float64 sum is rounded once more, which can only go wrong
    when it lands exactly halfway between two float32 values: there the sum's rounding error (TwoSum) says which
    way the exact value lies, and a one-ulp nudge of the float64 sum makes the float32 rounding correct. Rare
    (never in the 300M FMAs of 30M normal values measured), but cheap to get right.
    """
    s = np.multiply(a, b, dtype=np.float64)
    s += c
    halfway = np.flatnonzero((s.view(np.uint64) & _DROPPED_MASK) == _HALFWAY)
    if halfway.size:
        p = (np.broadcast_to(a, s.shape).ravel()[halfway].astype(np.float64)
             * np.broadcast_to(b, s.shape).ravel()[halfway])  # fmt: skip
        c_ = np.broadcast_to(c, s.shape).ravel()[halfway].astype(np.float64)
        t = s.ravel()[halfway]
        err = (p - (t - (t - p))) + (c_ - (t - p))
        s.ravel()[halfway] = np.where(err != 0, np.nextafter(t, np.copysign(np.inf, err)), t)
    return s.astype(np.float32)


def _log_avx2(x: np.ndarray) -> np.ndarray:
    """log256_ps for float32 x in (0, 1], as compiled: x = m * 2**e, then a polynomial in m - 1."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(np.float32) + np.float32(1)
    m = ((bits & 0x007FFFFF) | np.float32(0.5).view(np.int32)).view(np.float32)  # mantissa in [0.5, 1)
    small = m < SQRT_HALF
    m = (m - np.float32(1)) + np.where(small, m, np.float32(0))
    e = e - np.where(small, np.float32(1), np.float32(0))
    z = m * m
    y = np.full_like(m, LOG_POLY[0])
    for c in LOG_POLY[1:]:
        y = _fma(y, m, c)
    y = _fma(y * m, z, e * LOG_Q1)
    y = _fma(-z, np.float32(0.5), y)
    return _fma(e, LOG_Q2, m + y)


def _sincos_avx2(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sincos256_ps for float32 theta >= 0, as compiled: reduce by multiples of pi/4, then two polynomials."""
    j = (theta * FOUR_OVER_PI).astype(np.int32)  # truncation, like cvttps2dq
    j = (j + 1) & ~1
    y = j.astype(np.float32)
    sin_negative = (j & 4) != 0
    cos_negative = (~(j - 2) & 4) != 0
    sin_poly_is_sin = (j & 2) == 0
    x = theta
    for part in PI_OVER_4_PARTS:  # x - y * pi/4 in three steps ("extended precision modular arithmetic")
        x = _fma(y, part, x)
    z = x * x
    yc = _fma(COS_POLY[0], z, COS_POLY[1])
    yc = _fma(yc, z, COS_POLY[2])
    yc = _fma(z, z * yc, -(z * np.float32(0.5))) + np.float32(1)
    ys = _fma(SIN_POLY[0], z, SIN_POLY[1])
    ys = _fma(ys, z, SIN_POLY[2])
    ys = _fma(x, z * ys, x)
    sin = np.where(sin_poly_is_sin, ys, yc)
    cos = np.where(sin_poly_is_sin, yc, ys)
    return np.where(sin_negative, -sin, sin), np.where(cos_negative, -cos, cos)


def _box_muller_avx2(u: np.ndarray) -> np.ndarray:
    """NormalFill16<float, true> on (k, 16) float32 uniforms: element j and j + 8 of each chunk form one pair."""
    radius = np.sqrt(_log_avx2(np.float32(1) - u[:, :PAIRS]) * np.float32(-2))  # 1 - u in (0, 1] for the log
    sin, cos = _sincos_avx2(TWO_PI_F32 * u[:, PAIRS:])
    # torch ends with fma(n, std, mean) = n * 1 + 0: exact, except that it turns -0.0 into +0.0, and so does + 0.
    return np.concatenate([radius * cos, radius * sin], axis=1) + np.float32(0)


def _box_muller_libm(u: np.ndarray) -> np.ndarray:
    """The generic NormalFill16 (float logf, sincosf per element), with correctly rounded log/sin/cos."""
    log = np.log((np.float32(1) - u[:, :PAIRS]).astype(np.float64)).astype(np.float32)
    radius = np.sqrt(np.float32(-2) * log)
    theta = (2.0 * math.pi * u[:, PAIRS:].astype(np.float64)).astype(np.float32)  # a double product in torch too
    cos = np.cos(theta.astype(np.float64)).astype(np.float32)
    sin = np.sin(theta.astype(np.float64)).astype(np.float32)
    return np.concatenate([radius * cos, radius * sin], axis=1) + np.float32(0)


KERNELS = {"avx2": _box_muller_avx2, "libm": _box_muller_libm}


def _mt19937_key(seed: int) -> np.ndarray:
    """The engine state after torch's `mt19937(seed)`: Knuth's recurrence from the low 32 bits of the seed."""
    key = [seed & 0xFFFFFFFF]
    for j in range(1, MT_STATE_SIZE):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)


def torch_seed(seed: int) -> int:
    """The uint64 torch stores for `manual_seed(seed)`: it accepts [-2**63, 2**64) and wraps negatives."""
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside [-2**63, 2**64), the range torch.Generator.manual_seed accepts")
    return seed % 2**64


class TorchCPUGenerator:
    """`torch.Generator().manual_seed(seed)` on CPU: the same words, the same normal draws, in numpy.

    Args:
        seed: as for `torch.Generator.manual_seed`.
        kernel: "avx2" (x86-64 torch, bit-identical) or "libm" (torch on ARM, see the module docstring).

    Not thread safe on its own; `rng.TorchCPUNoise` serialises calls.
    """

    def __init__(self, seed: int, kernel: str = "avx2"):
        if kernel not in KERNELS:
            raise ValueError(f"unknown torch CPU kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.seed = torch_seed(seed)
        self.kernel = kernel
        self._box_muller = KERNELS[kernel]
        self._engine = np.random.MT19937()
        # pos == 624: the first draw regenerates the whole state, as torch's engine does (left_ == 1).
        self._engine.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt19937_key(self.seed), "pos": MT_STATE_SIZE},
        }
        self._cached_normal: float | None = None  # CPUGeneratorImpl::next_double_normal_sample_

    def words(self, n: int) -> np.ndarray:
        """The next n 32-bit engine outputs (CPUGeneratorImpl::random)."""
        return self._engine.random_raw(n).astype(np.uint32)

    def _float_uniforms(self, n: int) -> np.ndarray:
        return (self.words(n) & ((1 << FLOAT_MANTISSA_BITS) - 1)).astype(np.float32) * np.float32(
            2.0**-FLOAT_MANTISSA_BITS
        )

    def _double_uniform(self) -> float:
        hi, lo = (int(w) for w in self.words(2))  # random64: first word is the high half
        return (((hi << 32) | lo) & ((1 << DOUBLE_MANTISSA_BITS) - 1)) * 2.0**-DOUBLE_MANTISSA_BITS

    def _scalar_normal(self) -> float:
        """at::normal_distribution<double>: Box-Muller in double, second value cached."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._double_uniform()
        u2 = self._double_uniform()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        # + 0.0: torch applies `value * std + mean`, which turns -0.0 (radius 0 times a negative cosine) into +0.0.
        self._cached_normal = radius * math.sin(theta) + 0.0
        return radius * math.cos(theta) + 0.0

    def randn(self, n: int, half_precision: bool = False) -> np.ndarray:
        """The values of `torch.randn(n, generator=g)`, as float32 before torch's final rounding to the dtype.

        Args:
            n: number of elements (torch draws any shape in its contiguous element order).
            half_precision: True for float16/bfloat16 requests, whose >= 16-element path consumes the stream
                differently (see the module docstring). Round the float32 result to that dtype to obtain torch's.

        Returns:
            (n,) float32.
        """
        if n < CHUNK:  # torch's scalar path rounds each double to float (then to half), never straight to half
            return np.array([self._scalar_normal() for _ in range(n)], dtype=np.float32)
        whole, tail = divmod(n, CHUNK)
        body = self._float_uniforms(whole * CHUNK)
        if not half_precision:
            self._float_uniforms(tail)  # float32 tensors are filled with uniforms first; the tail's get overwritten
        out = np.empty(n, dtype=np.float32)
        out[: whole * CHUNK] = self._box_muller(body.reshape(whole, CHUNK)).reshape(-1)
        if tail:
            out[n - CHUNK :] = self._box_muller(self._float_uniforms(CHUNK)[None])[0]
        return out
