"""PyTorch checkpoints (.ckpt, .pt, .pth, diffusers .bin) read without torch and without running pickle code.

A torch file is a pickle plus raw storages. Unpickling is a small stack machine whose only ways to run code
are the callables that `find_class` hands it (for GLOBAL, STACK_GLOBAL and INST) and the objects
`persistent_load` returns. `_RestrictedUnpickler` never imports anything: `find_class` answers from a fixed
table of our own functions and inert marker objects, keyed by the global's name, and refuses every other
name with `UnsafeCheckpointError`. So the machine can build only plain data (dicts, lists, numbers, strings)
and our `TensorRef`s; refusing happens before anything the name points to exists, so nothing ran.

What the table holds, and why each entry is safe:
- torch's tensor rebuilders (`torch._utils._rebuild_tensor`, `_v2`, `_v3`, `_rebuild_parameter`,
  `_rebuild_parameter_with_state`) -> functions here that type-check their arguments and return a
  `TensorRef` (bounds-checked against its storage); `torch.*Storage` classes and `torch.<dtype>` objects
  -> markers naming a dtype; `collections.OrderedDict` -> a plain dict. This is everything a state dict needs.
- Known-inert values that published SD checkpoints carry outside the state dict (PyTorch Lightning saves
  them): numpy scalars (`numpy.core.multiarray.scalar`, `numpy.dtype`, and `_codecs.encode` for their
  bytes), rebuilt here by `np.frombuffer` for numeric dtypes only; and Lightning's `ModelCheckpoint` class,
  which appears as a dict *key* in `callbacks`, replaced by a `ClassReference` that names the class and
  raises if the pickle tries to call it. We never import Lightning.
Everything else (`os.system`, `builtins.eval`, `subprocess.Popen`, `builtins.getattr`, another library's
class) is refused by name, wherever it sits in the file: the refusal names the global and tells how to
re-save a trusted file. Lenient alternatives (replacing unknown globals with placeholders) were rejected: a
checkpoint needs none of them, and a name we do not know is exactly what a crafted file would contain.

Archive formats: the zip format (torch >= 1.6; `<root>/data.pkl` and `<root>/data/<key>` stored
uncompressed, so each storage is memory-mapped in place) and the legacy format (torch < 1.6: pickled magic
number, protocol, system info, the object, the storage keys, then each storage as an 8-byte element count
and raw bytes). Every pickle in either format goes through the restricted unpickler, the small header
pickles too. The pre-0.4 tar format and TorchScript archives are refused with the fix.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .keymap import ConversionError
from .storage import DTYPES, UINT8, DType, StorageRef, TensorRef

# torch/serialization.py: the legacy format opens with these two pickled integers.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

_STORAGE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # zip: "0", "1", ...; legacy: a pointer value


class UnsafeCheckpointError(ConversionError):
    """The checkpoint's pickle names a global that could run code; nothing was executed."""

    def __init__(self, path, global_name: str):
        if not global_name.isprintable() or len(global_name) > 200:  # STACK_GLOBAL names are arbitrary strings
            global_name = ascii(global_name[:200])
        self.global_name = global_name
        super().__init__(
            f"{path}: refused to unpickle `{global_name}`. mlx-sd reads pickled checkpoints without "
            "running pickle code and accepts only what a state dict needs (torch's tensor rebuild functions, "
            "storage types, OrderedDict) and a few inert values; a file naming anything else could run code "
            "when loaded with torch.load. Nothing was executed. If you trust this file, load it with PyTorch "
            "and save only its weights: python -c \"import torch; ck = torch.load('IN', weights_only=False); "
            "torch.save(ck.get('state_dict', ck), 'OUT.ckpt')\""
        )


# --- what a pickle may name -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DTypeMarker:
    """Stands for a torch storage class (torch.FloatStorage) or dtype object (torch.float16)."""

    dtype: DType

    def __setstate__(self, state):
        raise ConversionError("a pickle tried to modify a dtype")


@dataclass(frozen=True)
class ClassReference:
    """An inert stand-in for a class a checkpoint mentions (e.g. as a dict key) but must never create."""

    name: str

    def __call__(self, *args, **kwargs):
        raise ConversionError(f"the pickle tries to create a `{self.name}` object; refused")

    def __setstate__(self, state):
        raise ConversionError(f"the pickle tries to modify `{self.name}`; refused")


class _PickledDict(dict):
    """What `collections.OrderedDict` becomes. torch pickles a state dict's `_metadata` (per-module versions)
    as its instance state; it is dropped."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise ConversionError("malformed OrderedDict state in the pickle")


def _ordered_dict(*args) -> _PickledDict:
    if len(args) > 1:
        raise ConversionError("malformed OrderedDict in the pickle")
    return _PickledDict(*args)


def _rebuild_tensor(storage, storage_offset, size, stride) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise ConversionError(f"a tensor is rebuilt from {type(storage).__name__}, not a storage")
    return storage.view(storage.dtype, storage_offset, size, stride)


def _check_metadata(metadata):
    """torch records a tensor's conj/neg view bits here; the values would need negating, so refuse them."""
    if metadata:
        raise ConversionError(f"a tensor carries view flags {str(metadata)[:60]} (a conj/neg view); not supported")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    _check_metadata(metadata)
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """torch >= 2.3 writes dtypes without a typed storage class (uint16, ...) as bytes plus a dtype."""
    if not isinstance(storage, _Storage) or not isinstance(dtype, _DTypeMarker):
        raise ConversionError("malformed _rebuild_tensor_v3 record in the pickle")
    _check_metadata(metadata)
    return storage.view(dtype.dtype, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise ConversionError(f"a Parameter is rebuilt from {type(data).__name__}, not a tensor")
    return data


@dataclass(frozen=True)
class _NumpyDType:
    """numpy.dtype(code, align, copy) of a numeric scalar; numpy then sets the byte order through BUILD."""

    code: str
    order: str = "<"

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise ConversionError("malformed numpy dtype state in the pickle")
        object.__setattr__(self, "order", state[1])


def _numpy_dtype(code, align=False, copy=False) -> _NumpyDType:
    try:
        ok = isinstance(code, str) and np.dtype(code).kind in "biufc" and not np.dtype(code).fields
    except TypeError:
        ok = False
    if not ok:
        raise ConversionError(f"the pickle asks for numpy dtype {code!r}; only numeric scalars are read")
    return _NumpyDType(code)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, _NumpyDType) or not isinstance(data, bytes):
        raise ConversionError("malformed numpy scalar in the pickle")
    order = "=" if dtype.order == "|" else dtype.order
    np_dtype = np.dtype(dtype.code).newbyteorder(order)
    if len(data) != np_dtype.itemsize:
        raise ConversionError("malformed numpy scalar in the pickle")
    return np.frombuffer(data, np_dtype)[0]


def _codecs_encode(text, encoding="utf-8"):
    """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ConversionError("malformed bytes in the pickle")
    return text.encode("latin1")


def _allowed_globals() -> dict[str, object]:
    table: dict[str, object] = {
        "torch._utils._rebuild_tensor": _rebuild_tensor,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "collections.OrderedDict": _ordered_dict,
        "torch.storage.UntypedStorage": _DTypeMarker(UINT8),  # bytes, for _rebuild_tensor_v3
        # Inert values outside the state dict of Lightning-trained checkpoints (SD 1.x .ckpt).
        "numpy.core.multiarray.scalar": _numpy_scalar,
        "numpy._core.multiarray.scalar": _numpy_scalar,  # numpy >= 2
        "numpy.dtype": _numpy_dtype,
        "_codecs.encode": _codecs_encode,
    }
    for dtype in DTYPES:
        table[f"torch.{dtype.name}"] = _DTypeMarker(dtype)
        if dtype.torch_storage:
            table[f"torch.{dtype.torch_storage}"] = _DTypeMarker(dtype)
            table[f"torch.cuda.{dtype.torch_storage}"] = _DTypeMarker(dtype)  # legacy files saved from a GPU
    for module in ("pytorch_lightning", "lightning.pytorch"):
        name = f"{module}.callbacks.model_checkpoint.ModelCheckpoint"
        table[name] = ClassReference(name)
    return table


ALLOWED_GLOBALS = _allowed_globals()


def _canonical(module: str, name: str) -> str:
    """The Python 3 spelling of a global, as pickle's fix_imports would give it (`__builtin__` -> `builtins`)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


# --- storages and the unpickler ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Storage:
    """What persistent_load returns: a typed window (`offset`, `numel` elements) on a storage's bytes."""

    ref: StorageRef
    dtype: DType
    numel: int
    offset: int = 0  # legacy storage views only

    def view(self, dtype: DType, offset, size, stride) -> TensorRef:
        if not (type(offset) is int and isinstance(size, tuple) and isinstance(stride, tuple)):
            raise ConversionError("malformed tensor record in the pickle")
        if self.offset and dtype != self.dtype:  # a legacy view's offset counts elements of its own dtype
            raise ConversionError("malformed tensor record in the pickle")
        return TensorRef(self.ref, dtype, size, stride, self.offset + offset)

    def __setstate__(self, state):
        raise ConversionError("a pickle tried to modify a storage")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path, persistent=None):
        super().__init__(file, encoding="utf-8")  # as torch.load
        self._path = path
        self._persistent = persistent

    def find_class(self, module, name):
        full = _canonical(module, name)
        if full in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[full]
        raise UnsafeCheckpointError(self._path, full)

    def persistent_load(self, pid):
        if self._persistent is None:
            raise ConversionError("a persistent id appears where the format has none")
        return self._persistent(pid)


def _unpickle(file, path, persistent=None, what="the pickle"):
    try:
        return _RestrictedUnpickler(file, path, persistent).load()
    except ConversionError as error:
        if isinstance(error, UnsafeCheckpointError) or str(error).startswith(str(path)):
            raise
        raise ConversionError(f"{path}: {error}") from None
    except Exception as error:  # untrusted input: any failure of the pickle machine is one clear error
        raise ConversionError(
            f"{path}: {what} is malformed or truncated ({type(error).__name__}: {error}); the file is corrupt"
        ) from None


def _storage_record(pid, expected_length: int):
    """Validate ('storage', storage type, key, location, numel[, view]) and return (dtype, key, numel, rest)."""
    if not (isinstance(pid, tuple) and len(pid) == expected_length and pid[0] in ("storage", b"storage")):
        raise ConversionError(f"unexpected persistent id {str(pid)[:80]!r} in the pickle")
    _, marker, key, _location, numel = pid[:5]
    if not isinstance(marker, _DTypeMarker):
        raise ConversionError(f"a storage record names {type(marker).__name__}, not a storage type")
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if not (isinstance(key, str) and _STORAGE_KEY.fullmatch(key)) or not (type(numel) is int and numel >= 0):
        raise ConversionError(f"malformed storage record {str(pid)[:80]!r} in the pickle")
    return marker.dtype, key, numel, pid[5:]


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes start: after its local header's name and extra fields."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise ConversionError(f"{path}: the zip entry {info.filename} is damaged; the file is corrupt")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        if f.read(name_length) != info.filename.encode():
            raise ConversionError(f"{path}: the zip entry {info.filename} is damaged; the file is corrupt")
    return info.header_offset + 30 + name_length + extra_length


def load_torch_zip(path: Path) -> object:
    """The unpickled object of a zip-format torch file, with every tensor a `TensorRef` into the file."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ConversionError(
            f"{path}: starts like a PyTorch zip checkpoint but its zip directory is missing or damaged ({error}); "
            "the file is probably truncated (an incomplete download): download it again"
        ) from None
    with archive:
        members = {info.filename: info for info in archive.infolist()}
        if not members:
            raise ConversionError(f"{path}: an empty zip archive, not a checkpoint")
        root = next(iter(members)).split("/", 1)[0]  # torch takes the archive name from the first entry
        if f"{root}/constants.pkl" in members:
            raise ConversionError(
                f"{path}: a TorchScript archive (torch.jit.save), not a state dict; mlx-sd cannot convert it"
            )
        if f"{root}/data.pkl" not in members:
            raise ConversionError(f"{path}: a zip archive without {root}/data.pkl: not a PyTorch checkpoint")
        try:
            pickled = archive.read(f"{root}/data.pkl")
            order = archive.read(f"{root}/byteorder") if f"{root}/byteorder" in members else b"little"
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as error:
            raise ConversionError(
                f"{path}: cannot read the pickle in the archive ({error}); the file is corrupt"
            ) from None
        if order not in (b"little", b"big"):
            raise ConversionError(f"{path}: unknown byte order {order[:16]!r}; the file is corrupt")
        file_size = path.stat().st_size
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            dtype, key, numel, _ = _storage_record(pid, 5)
            if key in storages:
                storage = storages[key]
                if storage.dtype != dtype or storage.numel != numel:
                    raise ConversionError(f"storage {key} is described twice, differently")
                return storage
            name = f"{root}/data/{key}"
            info = members.get(name)
            if info is None:
                raise ConversionError(f"storage {name} is missing from the archive; the file is incomplete or corrupt")
            nbytes = numel * dtype.itemsize
            if info.file_size != nbytes:
                raise ConversionError(
                    f"storage {name} holds {info.file_size} bytes but the pickle expects {nbytes}; the file is corrupt"
                )
            if info.flag_bits & 0x1:
                raise ConversionError(f"storage {name} is encrypted; the file is not a plain checkpoint")
            ref = StorageRef(name, nbytes, big_endian=order == b"big", crc=info.CRC)
            if info.compress_type == zipfile.ZIP_STORED:
                ref.offset = _data_offset(path, info)
                if ref.offset + nbytes > file_size:
                    raise ConversionError(f"storage {name} runs past the end of the file; the file is truncated")
            else:  # a re-compressed archive: torch reads it, so do we (that storage is inflated into memory)
                ref.zip_member = name
            storages[key] = _Storage(ref, dtype, numel)
            return storages[key]

        return _unpickle(io.BytesIO(pickled), path, persistent_load)


def load_torch_legacy(path: Path) -> object:
    """The unpickled object of a legacy (torch < 1.6) file, with every tensor a `TensorRef` into the file."""
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        magic = _unpickle(f, path, what="the file's header")
        if magic != LEGACY_MAGIC:
            raise ConversionError(
                f"{path}: a pickle file, but not a PyTorch checkpoint (no torch magic number); cannot convert it"
            )
        protocol = _unpickle(f, path, what="the file's header")
        if protocol != LEGACY_PROTOCOL:
            raise ConversionError(f"{path}: legacy PyTorch format version {protocol!r} is not supported")
        sys_info = _unpickle(f, path, what="the file's header")
        if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
            raise ConversionError(
                f"{path}: a legacy PyTorch file written on a big-endian machine; load it with PyTorch there "
                "and save it again with a current torch.save"
            )

        storages: dict[str, _Storage] = {}
        views: dict[str, _Storage] = {}

        def persistent_load(pid):
            if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
                raise ConversionError("the file pickles a whole nn.Module, not a state dict; cannot convert it")
            dtype, key, numel, (view,) = _storage_record(pid, 6)
            if key not in storages:
                storages[key] = _Storage(StorageRef(f"storage {key}", numel * dtype.itemsize), dtype, numel)
            storage = storages[key]
            if storage.dtype != dtype or storage.numel != numel:
                raise ConversionError(f"storage {key} is described twice, differently")
            if view is None:
                return storage
            # (view key, offset, numel): a storage that is a slice of another; torch >= 1.0 never writes one.
            if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int and v >= 0 for v in view[1:])):
                raise ConversionError("malformed storage view record in the pickle")
            view_key, offset, view_numel = view
            if offset + view_numel > numel:
                raise ConversionError("a storage view reaches outside its storage")
            return views.setdefault(str(view_key), _Storage(storage.ref, dtype, view_numel, offset))

        result = _unpickle(f, path, persistent_load)
        keys = _unpickle(f, path, what="the storage list")
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)) or set(keys) != set(storages):
            raise ConversionError(f"{path}: the storage list does not match the pickle; the file is corrupt")
        position = f.tell()
        for key in keys:  # each storage: its element count (int64) then its bytes
            storage = storages[key]
            f.seek(position)
            header = f.read(8)
            if len(header) < 8 or int.from_bytes(header, "little") != storage.numel:
                raise ConversionError(f"{path}: the data of storage {key} is truncated or damaged")
            storage.ref.offset = position + 8
            position = storage.ref.offset + storage.ref.nbytes
            if position > file_size:
                raise ConversionError(f"{path}: the data of storage {key} runs past the end; the file is truncated")
    return result
