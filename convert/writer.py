"""Writing one converted component, tensor by tensor: a streaming safetensors writer, dtype casts, quantization.

safetensors is a u64 (little-endian) header length, a JSON header naming each tensor's dtype, shape and byte
range, then the raw bytes. Every entry is known before any tensor is read (shapes come from the key map and the
target dtype), so the header is written first and each tensor's bytes follow as soon as it is converted: the
converter never holds more than one tensor, however large the model. The header is deterministic (sorted keys,
no timestamps), so converting the same source twice gives the same bytes. MLX (`mx.load`) and the `safetensors`
library read these files; the tests check both.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from math import prod
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.components import WEIGHTS_FILE, build, kind_of, write_config
from mlx_sd.quantization import QUANTIZED_KINDS, QuantizationConfig, quantized_layers

from .keymap import ComponentPlan, ConversionError, Mapped

FLOAT_DTYPES = ("float16", "bfloat16", "float32")
# dtype name -> (safetensors name, numpy dtype of the bytes written); bfloat16 is written as its uint16 bits.
_FORMATS = {
    "float16": ("F16", np.dtype("<f2")),
    "bfloat16": ("BF16", np.dtype("<u2")),
    "float32": ("F32", np.dtype("<f4")),
    "uint32": ("U32", np.dtype("<u4")),
    "int64": ("I64", np.dtype("<i8")),
}
_HEADER_ALIGNMENT = 8  # the safetensors library pads its header to 8 bytes so the data is aligned; so do we


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # "float16", "bfloat16", "float32", "uint32" (quantized weights) or "int64"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * _FORMATS[self.dtype][1].itemsize


def _write_bytes(file, data) -> None:
    """The one place bytes reach the disk (tests replace it to simulate a full disk)."""
    file.write(data)


class SafetensorsWriter:
    """Write a safetensors file whose entries are all known up front; tensors then arrive one at a time, in order.

    Use as a context manager; `write` each entry in the order given. Leaving the block early (an error) leaves a
    partial file for the caller to delete; the converter writes into a temporary folder, so it never is visible.
    """

    def __init__(self, path: Path, entries: list[Entry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._entries = entries
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = metadata
        offset = 0
        for entry in entries:
            header[entry.name] = {
                "dtype": _FORMATS[entry.dtype][0],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
        text += b" " * (-(8 + len(text)) % _HEADER_ALIGNMENT)
        self.nbytes = 8 + len(text) + offset
        self._file = open(self.path, "wb")
        _write_bytes(self._file, struct.pack("<Q", len(text)) + text)

    def write(self, name: str, array: np.ndarray) -> None:
        entry = self._entries[self._next]
        expected = _FORMATS[entry.dtype][1]
        if name != entry.name or array.dtype != expected or tuple(array.shape) != entry.shape:
            raise AssertionError(  # a bug in the converter, not in the user's file
                f"{self.path}: got {name} {array.dtype} {array.shape}, expected {entry.name} {expected} {entry.shape}"
            )
        _write_bytes(self._file, memoryview(np.ascontiguousarray(array)).cast("B"))
        self._next += 1

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            if error_type is None:
                if self._next != len(self._entries):
                    raise AssertionError(f"{self.path}: {len(self._entries) - self._next} tensors were not written")
                self._file.flush()
                os.fsync(self._file.fileno())  # on disk before the folder is renamed into place
        finally:
            self._file.close()


# --- casts ------------------------------------------------------------------------------------------------


def cast(value: np.ndarray, dtype: str, name: str) -> np.ndarray:
    """A floating-point parameter in `dtype`, contiguous and little-endian (bfloat16 as its uint16 bits)."""
    if not np.issubdtype(value.dtype, np.floating):
        raise ConversionError(f"{name}: the checkpoint stores it as {value.dtype}; a floating-point tensor is expected")
    if dtype == "bfloat16":  # numpy has no bfloat16: MLX rounds (to nearest even, as torch does)
        return np.array(mx.array(value).astype(mx.bfloat16).view(mx.uint16))
    out = np.ascontiguousarray(value, dtype=_FORMATS[dtype][1])
    if dtype == "float16" and not np.isfinite(out).all() and np.isfinite(value).all():
        peak = float(np.abs(value.astype(np.float32)).max())
        raise ConversionError(
            f"{name}: values up to {peak:.4g} do not fit float16 (max 65504); convert with dtype bfloat16 or float32"
        )
    return out


def _quantize(value: np.ndarray, dtype: str, config: QuantizationConfig, name: str) -> Iterator[np.ndarray]:
    """weight (uint32), scales, biases, as MLX's QuantizedLinear stores them; from the source's precision."""
    weight, scales, biases = mx.quantize(
        mx.array(np.ascontiguousarray(value, dtype=np.float32)), group_size=config.group_size, bits=config.bits
    )
    yield np.array(weight)
    yield cast(np.array(scales), dtype, name)
    yield cast(np.array(biases), dtype, name)


# --- one component ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentWrite:
    """A component checked and laid out, before any tensor is read: what `write_component` will write."""

    folder: str  # the component folder in the model folder, e.g. "unet"
    plan: ComponentPlan
    mapping: dict[str, Mapped]
    dtype: str
    quantization: QuantizationConfig | None  # None: floating-point weights
    quantized: frozenset[str]  # parameter names stored quantized (".weight" of the selected layers)
    entries: list[Entry]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def plan_write(folder: str, plan: ComponentPlan, dtype: str, quantization: QuantizationConfig | None) -> ComponentWrite:
    """Check a component's key map (strict, from shapes; nothing read) and lay out its weights file.

    Args:
        folder: the component folder's name.
        plan: the component's config, source and key map.
        dtype: "float16", "bfloat16" or "float32" for every floating-point parameter.
        quantization: quantize the selected Linear layers (`mlx_sd.quantization`); ignored for components that
            are never quantized (the VAE).
    Raises:
        ConversionError from the key map.
    """
    mapping = plan.keymap()
    kind = kind_of(plan.config)
    if kind not in QUANTIZED_KINDS:
        quantization = None
    quantized = frozenset()
    if quantization is not None:
        quantized = frozenset(f"{path}.weight" for path in quantized_layers(kind, build(plan.config), quantization))
    entries = []
    for name in sorted(mapping):
        shape = mapping[name].shape
        if name in quantized:
            base = name.removesuffix(".weight")
            out_features, in_features = shape
            groups = (out_features, in_features // quantization.group_size)
            entries += [
                Entry(name, "uint32", (out_features, in_features * quantization.bits // 32)),
                Entry(f"{base}.scales", dtype, groups),
                Entry(f"{base}.biases", dtype, groups),
            ]
        else:
            entries.append(Entry(name, dtype, shape))
    return ComponentWrite(folder, plan, mapping, dtype, quantization, quantized, entries)


def write_component(destination: Path, job: ComponentWrite, advance: Callable[[int, str], None]) -> None:
    """Write config.json and weights.safetensors into `destination`, reading one source tensor at a time.

    `advance(nbytes, name)` is called after each parameter is written.
    """
    destination.mkdir(parents=True)
    write_config(destination, job.plan.config, job.quantization)
    entries = iter(job.entries)
    with SafetensorsWriter(destination / WEIGHTS_FILE, job.entries, {"format": "mlx"}) as writer:
        for name in sorted(job.mapping):
            value = job.plan.read(job.mapping[name])
            label = f"{job.folder}: {name}"
            if name in job.quantized:
                arrays = list(_quantize(value, job.dtype, job.quantization, label))
            else:
                arrays = [cast(value, job.dtype, label)]
            del value  # drop the source view (and its memory map) before the next tensor is read
            for array in arrays:
                entry = next(entries)
                writer.write(entry.name, array)
                advance(entry.nbytes, label)
