"""Where a checkpoint's tensors lie in its file, and how one is read: memory-mapped, bounds-checked, on demand.

Both readers (safetensors and torch pickles) describe every tensor as a `TensorRef`: a dtype, a shape and
element strides into a `StorageRef`, which is a byte range of the file. Nothing is read until `read_array`
is called; it maps only that storage's bytes (`np.memmap`), so converting a 7 GB file tensor by tensor keeps
the resident memory near the largest tensor. Every offset, shape and stride comes from an untrusted file, so
each is checked against the storage before an array is made from it.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from .keymap import ConversionError

# Bytes hashed per step when a storage's CRC is verified (keeps the check itself out of the memory peak).
_CRC_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class DType:
    """One element type, under the names each format gives it."""

    name: str  # torch's name, used in messages and `TensorInfo.dtype`: "float16", "bfloat16", ...
    numpy: str  # how the bytes are viewed; numpy has no bfloat16 or float8, so their raw bits are uint16 / uint8
    safetensors: str  # the safetensors header's name
    torch_storage: str | None  # the legacy typed storage class (torch.HalfStorage); None for newer dtypes

    @property
    def itemsize(self) -> int:
        return np.dtype(self.numpy).itemsize


DTYPES = (
    DType("float16", "float16", "F16", "HalfStorage"),
    DType("bfloat16", "uint16", "BF16", "BFloat16Storage"),
    DType("float32", "float32", "F32", "FloatStorage"),
    DType("float64", "float64", "F64", "DoubleStorage"),
    DType("int64", "int64", "I64", "LongStorage"),
    DType("int32", "int32", "I32", "IntStorage"),
    DType("int16", "int16", "I16", "ShortStorage"),
    DType("int8", "int8", "I8", "CharStorage"),
    DType("uint8", "uint8", "U8", "ByteStorage"),
    DType("bool", "bool", "BOOL", "BoolStorage"),
    DType("uint16", "uint16", "U16", None),
    DType("uint32", "uint32", "U32", None),
    DType("uint64", "uint64", "U64", None),
    # float8 (fp8 checkpoints: t5xxl_fp8_e4m3fn.safetensors, sd3_medium_incl_clips_t5xxlfp8.safetensors); torch
    # writes them as untyped bytes plus a dtype (_rebuild_tensor_v3).
    DType("float8_e4m3fn", "uint8", "F8_E4M3", None),
    DType("float8_e5m2", "uint8", "F8_E5M2", None),
)
BY_NAME = {d.name: d for d in DTYPES}
UINT8 = BY_NAME["uint8"]


@dataclass(eq=False)
class StorageRef:
    """A run of bytes in the checkpoint file holding one storage (shared by every tensor that views it)."""

    name: str  # for messages: "archive/data/3", "storage 94456495098208", a safetensors key
    nbytes: int
    offset: int | None = None  # file offset of the first byte; None until known (legacy files: after the pickle)
    big_endian: bool = False
    crc: int | None = None  # zip CRC-32 of the bytes, checked on first read
    zip_member: str | None = None  # set when the zip member is compressed: read through zipfile, not mapped
    checked: bool = field(default=False, compare=False)

    def __setstate__(self, state):  # a pickle must never be able to rewrite a storage (see torch_pickle.py)
        raise ConversionError("a pickle tried to modify a tensor storage")


@dataclass(frozen=True, eq=False)
class TensorRef:
    """A tensor not yet read: `shape` and element `strides` into `storage`, starting `offset` elements in."""

    storage: StorageRef
    dtype: DType
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    offset: int = 0

    def __post_init__(self):
        """Refuse any view reaching outside its storage (the file is untrusted; numpy would read past it)."""
        ok = (
            len(self.shape) == len(self.strides)
            and all(type(n) is int and n >= 0 for n in (*self.shape, *self.strides, self.offset))
            and self.storage.nbytes % self.dtype.itemsize == 0
        )
        if ok and prod(self.shape) > 0:
            last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
            ok = (last + 1) * self.dtype.itemsize <= self.storage.nbytes
        if not ok:
            raise ConversionError(
                f"a {self.dtype.name} tensor of shape {self.shape}, strides {self.strides} and offset {self.offset} "
                f"does not fit its storage {self.storage.name} of {self.storage.nbytes} bytes; the file is corrupt"
            )

    def __setstate__(self, state):
        raise ConversionError("a pickle tried to modify a tensor")

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _storage_bytes(path: Path, storage: StorageRef, verify: bool):
    """The storage's bytes as a read-only uint8 array: a memory map, or (compressed zip members) a copy."""
    if storage.zip_member is not None:
        with zipfile.ZipFile(path) as archive:  # zipfile checks the CRC while inflating
            data = archive.read(storage.zip_member)
        return np.frombuffer(data, np.uint8)
    if storage.offset is None:
        raise ConversionError(f"{path}: storage {storage.name} has no data in the file")
    if storage.nbytes == 0:
        return np.zeros(0, np.uint8)
    data = np.memmap(path, np.uint8, mode="r", offset=storage.offset, shape=(storage.nbytes,))
    if verify and storage.crc is not None and not storage.checked:
        crc = 0
        for start in range(0, storage.nbytes, _CRC_CHUNK):
            crc = zlib.crc32(data[start : start + _CRC_CHUNK], crc)
        if crc != storage.crc:
            raise ConversionError(
                f"{path}: the bytes of {storage.name} fail their CRC-32 check; the file is corrupt "
                "(a damaged download?): download it again"
            )
        storage.checked = True
    return data


def read_array(path: Path, tensor: TensorRef, verify: bool = True) -> np.ndarray:
    """Read one tensor: a read-only view of the file where possible, in native byte order.

    bfloat16 comes back as its raw bits (uint16); see `bfloat16_to_float32`.
    """
    data = _storage_bytes(path, tensor.storage, verify)
    dtype = np.dtype(tensor.dtype.numpy)
    if tensor.storage.big_endian:
        dtype = dtype.newbyteorder(">")
    itemsize = dtype.itemsize
    # np.ndarray re-checks that the view stays inside the buffer.
    array = np.ndarray(
        tensor.shape,
        dtype,
        buffer=data,
        offset=tensor.offset * itemsize if prod(tensor.shape) else 0,
        strides=tuple(s * itemsize for s in tensor.strides),
    )
    if tensor.storage.big_endian:
        array = array.astype(dtype.newbyteorder("="))
    array.flags.writeable = False
    return array


def _e4m3fn_table() -> np.ndarray:
    """float8_e4m3fn's 256 values: 1 sign, 4 exponent (bias 7) and 3 mantissa bits; exponent 0 is subnormal, and
    S.1111.111 is NaN (the "fn" variant has no infinities: S.1111.xxx are finite, up to 448)."""
    bits = np.arange(256)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    magnitude = np.where((bits & 0x7F) == 0x7F, np.nan, magnitude)
    return np.where(bits & 0x80, -magnitude, magnitude).astype(np.float32)


_E4M3FN = _e4m3fn_table()


def float8_to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Exact: every float8 value is a float32. float8_e5m2 is the upper byte of the float16 of the same value."""
    if dtype == "float8_e5m2":
        return (bits.astype(np.uint16) << 8).view(np.float16).astype(np.float32)
    return _E4M3FN[bits]


def bfloat16_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bfloat16 is the upper half of the float32 with the same value."""
    wide = bits.astype(np.uint32)
    wide <<= 16  # in place: the upcast costs one float32 copy, no more
    return wide.view(np.float32)
