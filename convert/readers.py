"""Open any published SD checkpoint file as a lazy, read-only mapping of tensors, safely.

`open_checkpoint(path)` recognises the format by content (never by extension): `.safetensors`, PyTorch zip
files (`.ckpt`, `.pt`, `.pth`, diffusers `.bin`), legacy pre-1.6 PyTorch files. It reads only the index
(the safetensors header or the pickle) and returns a `Checkpoint`: key -> numpy array, each array read when
asked for and memory-mapped from the file, so a converter streaming a 7 GB file holds about one tensor.

Safety: pickles are read by the restricted unpickler in `torch_pickle.py` (its docstring gives the policy:
torch's tensor rebuilders and a few inert values, every other global refused by name, nothing executed).
Robustness: anything that is not a readable checkpoint (empty, truncated, corrupt, an HTML page or a Git LFS
pointer saved under a checkpoint's name) raises one `ConversionError` naming the file and the problem.

Values are numpy arrays in the file's own dtype, read-only, with the file's strides. numpy has no bfloat16 or
float8: `checkpoint[key]` returns those tensors as float32 (exact, the upcast loses nothing) and
`checkpoint.raw(key)` returns their bits as uint16 / uint8; `checkpoint.info(key).dtype` says "bfloat16",
"float8_e4m3fn" or "float8_e5m2" either way.

Scaled fp8 (ComfyUI's `*_fp8_scaled.safetensors`: each float8 `X.weight` stored divided by a per-tensor or per-row
`X.scale_weight`, marked by a `scaled_fp8` tensor; or its later `X.weight_scale` layout): `checkpoint["X.weight"]`
is the weight times its scale (in float32), as ComfyUI computes it; the scale, input-scale and marker tensors are
not in the mapping (`checkpoint.scaled` counts the weights rescaled).
"""

from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .keymap import ConversionError
from .storage import (
    DTYPES,
    StorageRef,
    TensorRef,
    bfloat16_to_float32,
    contiguous_strides,
    float8_to_float32,
    read_array,
)
from .torch_pickle import ClassReference, UnsafeCheckpointError, load_torch_legacy, load_torch_zip

__all__ = ["Checkpoint", "ConversionError", "TensorInfo", "UnsafeCheckpointError", "open_checkpoint"]

# Keys under which training code nests the state dict: PyTorch Lightning ("state_dict"), plain training
# loops ("model"), DeepSpeed / DDP wrappers ("module"), A1111 textual-inversion embeddings ("string_to_param"),
# BasicSR's upscalers (Real-ESRGAN: "params_ema", the averaged weights its inference loads, before "params").
# Tried in this order while a level holds no tensors.
NESTING_KEYS = ("state_dict", "model", "module", "string_to_param", "params_ema", "params")
_MAX_NESTING = 4
_SAFETENSORS_DTYPES = {d.safetensors: d for d in DTYPES}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str  # torch's name: "float16", "bfloat16", "float32", "int64", ...
    nbytes: int


class Checkpoint(Mapping):
    """A checkpoint's tensors: key -> read-only numpy array, read from the file on each access.

    Attributes:
        path: the file.
        format: "safetensors", "torch-zip" or "torch-legacy".
        nesting: the keys leading from the file's top-level object to the state dict, e.g. ("state_dict",);
            () when the file is the state dict itself.
        skipped: entries of the state dict that are not tensors (key -> description); they are not in the
            mapping.
        extras: the file's other top-level entries (key -> description), e.g. "global_step": "int 470000".
        metadata: the safetensors `__metadata__` strings ({} for pickles).
        global_step: the top level's `global_step` (Lightning training checkpoints), else None.
    """

    def __init__(
        self,
        path: Path,
        format: str,
        tensors: dict[str, TensorRef],
        *,
        verify: bool = True,
        nesting: tuple[str, ...] = (),
        skipped: dict[str, str] | None = None,
        extras: dict[str, str] | None = None,
        metadata: dict[str, str] | None = None,
        global_step: int | None = None,
    ):
        self.path = path
        self.format = format
        self._tensors = tensors
        self._verify = verify
        self.nesting = nesting
        self.skipped = skipped or {}
        self.extras = extras or {}
        self.metadata = metadata or {}
        self.global_step = global_step
        self._scales = _fp8_scales(path, tensors)
        if any(ref.dtype.name.startswith("float8") for ref in tensors.values()):  # scales and markers: not weights
            self._tensors = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in _NOT_WEIGHTS}
        self.scaled = len(self._scales)

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __contains__(self, key) -> bool:
        return key in self._tensors

    def info(self, key: str) -> TensorInfo:
        """Shape, dtype and size of a tensor, without reading it."""
        ref = self._tensors[key]
        return TensorInfo(ref.shape, ref.dtype.name, ref.nbytes)

    def raw(self, key: str) -> np.ndarray:
        """The tensor as stored (bfloat16 / float8 as their uint16 / uint8 bits); a read-only view of the file where
        possible.

        Raises:
            ConversionError if the storage fails its CRC check (zip files) or cannot be read.
        """
        tensor = self._tensors[key]
        try:
            return read_array(self.path, tensor, self._verify)
        except ConversionError as error:
            raise ConversionError(f"{error} (reading tensor {key})") from None
        except (OSError, ValueError) as error:  # e.g. the file shrank since it was opened
            raise ConversionError(f"{self.path}: cannot read tensor {key} ({error})") from None

    def __getitem__(self, key: str) -> np.ndarray:
        """The tensor as a numpy array; bfloat16 and float8 are returned as float32 (exact)."""
        array = self.raw(key)
        name = self._tensors[key].dtype.name
        if name == "bfloat16" or name.startswith("float8"):
            array = bfloat16_to_float32(array) if name == "bfloat16" else float8_to_float32(array, name)
            if key in self._scales:
                array *= self._read_scale(key, array.shape)
            array.flags.writeable = False  # one contract for every value: read-only
        return array

    def _read_scale(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The scale of a scaled-fp8 weight, shaped to multiply it: one value, or one per output row."""
        ref = self._scales[key]
        scale = read_array(self.path, ref, self._verify)
        scale = bfloat16_to_float32(scale) if ref.dtype.name == "bfloat16" else scale.astype(np.float32)
        return scale.reshape(() if scale.size == 1 else (shape[0],) + (1,) * (len(shape) - 1))

    def __repr__(self) -> str:
        where = "/".join(self.nesting) or "top level"
        return f"Checkpoint({str(self.path)!r}, {self.format}, {len(self)} tensors at {where})"


def open_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """Open a checkpoint file lazily; only its index is read.

    Args:
        path: a `.safetensors`, PyTorch (`.ckpt`, `.pt`, `.pth`, `.bin`) or legacy PyTorch file.
        verify: check each zip storage's CRC-32 the first time it is read (a pass over its bytes).
    Returns:
        a `Checkpoint` mapping the state dict's keys to tensors.
    Raises:
        UnsafeCheckpointError (a `ConversionError`) if a pickle names anything outside the allow-list;
        ConversionError for anything else that is not a readable checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise ConversionError(f"{path}: is a folder; open_checkpoint reads one checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as error:
        raise ConversionError(f"{path}: cannot open ({error.strerror or error})") from None

    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _from_pickle(path, "torch-zip", load_torch_zip(path), verify)
    if head[8:9] == b"{":  # before the pickle test: a header length of 128 + 256k also starts with 0x80
        return _open_safetensors(path)
    if head[:1] == b"\x80" and head[1:2] and head[1] <= pickle.HIGHEST_PROTOCOL:
        return _from_pickle(path, "torch-legacy", load_torch_legacy(path), verify)
    raise ConversionError(f"{path}: {_what_else(head)}")


def _what_else(head: bytes) -> str:
    """Name what a file that is no checkpoint most likely is."""
    if not head:
        return "the file is empty (an interrupted download?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights: fetch the real file (git lfs pull)"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page, not weights (a login or error page saved by a failed download)"
    if head[257:262] == b"ustar":
        return (
            "a PyTorch file from before version 0.4 (tar format), which cannot be read safely; "
            "load it with an old PyTorch and save it again with a current torch.save"
        )
    return f"not a checkpoint (starts with {head[:16]!r}); expected .safetensors or a PyTorch .ckpt/.pt/.pth/.bin"


# --- scaled fp8 -------------------------------------------------------------------------------------------

# Scale tensors beside a float8 `X.weight`: ComfyUI's scaled_fp8 layout, then its comfy_quant layout.
_SCALE_NAMES = ("scale_weight", "weight_scale")
# Their tensors that are no weights (last key part): the scales, input scales (for fp8 matmuls), format markers.
_NOT_WEIGHTS = (*_SCALE_NAMES, "scale_input", "input_scale", "comfy_quant", "scaled_fp8")


def _fp8_scales(path: Path, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """float8 weight key -> its scale tensor, for the scaled-fp8 layouts (see the module docstring); {} for files
    without float8 tensors (whose keys are left alone)."""
    scales = {}
    if not any(ref.dtype.name.startswith("float8") for ref in tensors.values()):
        return scales
    for key, ref in tensors.items():
        base, _, last = key.rpartition(".")
        if last not in _SCALE_NAMES:
            continue
        weight = tensors.get(f"{base}.weight")
        if weight is None or not weight.dtype.name.startswith("float8"):
            raise ConversionError(
                f"{path}: {key} scales {base}.weight, which is {'missing' if weight is None else weight.dtype.name}, "
                "not float8; the file is not in a scaled-fp8 layout mlx-sd reads: convert the fp16/bf16 file"
            )
        if prod(ref.shape) != 1 and not (weight.shape and prod(ref.shape) == weight.shape[0]):
            raise ConversionError(
                f"{path}: {key} is an fp8 scale of shape {ref.shape}, neither per tensor nor per row of "
                f"{base}.weight {weight.shape}; block-scaled formats (mxfp8, nvfp4) are not supported: convert the "
                "fp16/bf16 file"
            )
        scales[f"{base}.weight"] = ref
    return scales


# --- safetensors ------------------------------------------------------------------------------------------


def _open_safetensors(path: Path) -> Checkpoint:
    try:  # the format's own library validates the header: offsets, coverage, sizes
        with safe_open(path, framework="numpy"):
            pass
    except SafetensorError as error:
        raise ConversionError(
            f"{path}: not a valid safetensors file ({error}); the file is corrupt or truncated"
        ) from None
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for key, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ConversionError(f"{path}: tensor {key} has dtype {entry['dtype']}, which mlx-sd cannot convert")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        storage = StorageRef(key, end - begin, offset=8 + length + begin)
        tensors[key] = TensorRef(storage, dtype, shape, contiguous_strides(shape))
    return Checkpoint(path, "safetensors", tensors, metadata=dict(metadata))


# --- pickled checkpoints: find the state dict -------------------------------------------------------------


def _from_pickle(path: Path, format: str, top: object, verify: bool) -> Checkpoint:
    _describe = _Describer()
    if not isinstance(top, dict):
        raise ConversionError(f"{path}: holds a {_describe(top)}, not a state dict")
    nesting: list[str] = []
    extras: dict[str, str] = {}
    state = top
    while not any(isinstance(v, TensorRef) for v in state.values()) and len(nesting) < _MAX_NESTING:
        inner = next((k for k in NESTING_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        prefix = "/".join(nesting + [""])
        extras.update({f"{prefix}{k}": _describe(v) for k, v in state.items() if k != inner})
        nesting.append(inner)
        state = state[inner]
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, TensorRef)}
    groups = {k: v for k, v in state.items() if isinstance(k, str) and isinstance(v, dict)}
    if not tensors and groups and len(groups) == len(state):
        # state dicts of parts, e.g. an IP-Adapter's {"image_proj": {...}, "ip_adapter": {...}}: keyed as the
        # .safetensors files of the same model are ("image_proj.proj.weight")
        tensors = {f"{g}.{k}": v for g, part in groups.items() for k, v in part.items() if isinstance(v, TensorRef)}
        state = {}
    if not tensors:
        keys = ", ".join(repr(k)[:40] for k in list(top)[:12])
        raise ConversionError(f"{path}: no tensors found (top-level keys: {keys}); this is not a model state dict")
    skipped = {str(k): _describe(v) for k, v in state.items() if not (isinstance(k, str) and isinstance(v, TensorRef))}
    step = top.get("global_step")
    return Checkpoint(
        path,
        format,
        tensors,
        verify=verify,
        nesting=tuple(nesting),
        skipped=skipped,
        extras=extras,
        global_step=int(step) if isinstance(step, int | np.integer) and not isinstance(step, bool) else None,
    )


class _Describer:
    """One-line descriptions of non-state-dict values, for reports.

    A pickle can share one container many times over (a small file, an exponential walk), so the walk that
    counts tensors visits each container once and stops after a fixed budget for the whole file.
    """

    def __init__(self, budget: int = 1_000_000):
        self._budget = budget
        self._seen: set[int] = set()

    def _count_tensors(self, value) -> int:
        count, stack = 0, [value]
        while stack and self._budget > 0:
            item = stack.pop()
            self._budget -= 1
            if isinstance(item, TensorRef):
                count += 1
            elif isinstance(item, dict | list | tuple) and id(item) not in self._seen:
                self._seen.add(id(item))
                stack.extend(item.values() if isinstance(item, dict) else item)
        return count

    def __call__(self, value) -> str:
        if isinstance(value, TensorRef):
            return f"tensor {value.dtype.name} {value.shape}"
        if isinstance(value, ClassReference):
            return f"class reference {value.name}"
        if isinstance(value, np.generic):
            return f"numpy {value.dtype} {value.item()!r}"
        if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
            return f"int of {value.bit_length()} bits"
        if isinstance(value, bool | int | float | str | bytes) or value is None:
            text = repr(value[:60] if isinstance(value, str | bytes) else value)
            return f"{type(value).__name__} {text}{'...' if len(text) > 60 else ''}"
        if isinstance(value, dict | list | tuple):
            kind = "dict" if isinstance(value, dict) else type(value).__name__
            tensors = self._count_tensors(value)
            return f"{kind} of {len(value)} entries" + (f" holding {tensors} tensors" if tensors else "")
        return type(value).__name__
