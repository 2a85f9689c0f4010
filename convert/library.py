"""Folders of LoRAs, embeddings and ControlNets (A1111's --lora-dir / --embeddings-dir / ControlNet models folder):
listing, name lookup, caches.

`LoraLibrary(folder)` is the resolver a `Pipeline` takes for `<lora:name:weight>`: it finds the file by name (file
name without extension) or alias (kohya's `ss_output_name` metadata), reads and maps it once per model layout and
keeps the mapped LoRA in a small cache, so switching LoRAs between requests never re-reads a file. `listing()`
gives what the HTTP API's `GET /sdapi/v1/loras` returns. `EmbeddingLibrary(folder)` reads every embedding of a
folder and sorts them into those that fit a model and those skipped (`GET /sdapi/v1/embeddings`).
`ControlNetLibrary(folder)` is a `Pipeline`'s ControlNet resolver: files and diffusers folders by name or by A1111's
title ("name [hash]"), the last few read kept loaded. `UpscalerLibrary(folder)` resolves model upscalers (ESRGAN,
Real-ESRGAN, ...) by the names A1111 lists them under.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from mlx_sd.infotext import a1111_title
from mlx_sd.lora import LoRA, LoRATargets
from mlx_sd.textual_inversion import Embedding, check_embedding

from .controlnet import CONTROLNET_EXTENSIONS, a1111_hash, is_control_config, read_controlnet
from .embeddings import EMBEDDING_EXTENSIONS, read_embedding
from .keymap import ConversionError
from .lora import LORA_EXTENSIONS, read_lora
from .readers import open_checkpoint
from .upscaler import UPSCALER_EXTENSIONS, read_upscaler, upscaler_listing, upscaler_name

DEFAULT_CACHE = 8  # mapped LoRAs kept in memory (an SDXL LoRA is ~50-400 MB)
CONTROLNET_CACHE = 2  # loaded ControlNets kept (SD 1.5: 1.4 GB in float32, SDXL: 5 GB)
UPSCALER_CACHE = 2  # loaded upscalers kept (ESRGAN 4x: 67 MB)
TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")  # "control_v11p_sd15_canny [d14c016b]"


def _files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    if not folder.is_dir():
        raise ConversionError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and p.is_file())


def read_metadata(path: Path) -> dict:
    """A safetensors file's metadata as A1111 shows it (values that are JSON objects parsed); {} for pickles."""
    if path.suffix.lower() != ".safetensors":
        return {}
    metadata = {}
    for key, value in open_checkpoint(path).metadata.items():
        if isinstance(value, str) and value.startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        metadata[key] = value
    return metadata


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of a folder: `name` (file name without extension), `alias` (kohya's ss_output_name, else the
    name), `path`, `metadata` (the safetensors metadata)."""

    name: str
    alias: str
    path: Path
    metadata: dict = field(default_factory=dict, repr=False)

    def to_api(self) -> dict:
        """An entry of A1111's `GET /sdapi/v1/loras`."""
        return {"name": self.name, "alias": self.alias, "path": str(self.path), "metadata": self.metadata}


class LoraLibrary:
    """A folder of LoRA files, searched recursively; callable as a `Pipeline` LoRA resolver.

    Args:
        folder: the LoRA folder.
        cache_size: mapped LoRAs kept in memory.
    """

    def __init__(self, folder: str | Path, cache_size: int = DEFAULT_CACHE):
        self.folder = Path(folder).expanduser()
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, LoRA] = OrderedDict()
        self._lock = threading.Lock()

    def listing(self) -> list[LoraFile]:
        """Every LoRA file in the folder (rescanned on each call)."""
        files = []
        for path in _files(self.folder, LORA_EXTENSIONS):
            try:
                metadata = read_metadata(path)
            except ConversionError:
                metadata = {}  # listed anyway; loading it reports what is wrong
            alias = metadata.get("ss_output_name") or path.stem
            files.append(LoraFile(path.stem, str(alias), path, metadata))
        return files

    def find(self, name: str) -> LoraFile:
        """The file named `name` (or with that alias). Raises ConversionError naming the folder and close names."""
        files = self.listing()
        found = [f for f in files if f.name == name] or [f for f in files if f.alias == name]
        if len(found) == 1:
            return found[0]
        if found:
            paths = ", ".join(str(f.path) for f in found)
            raise ConversionError(f"LoRA {name!r} is ambiguous in {self.folder}: {paths}; rename one")
        known = ", ".join(sorted({f.name for f in files})[:20]) or "none"
        raise ConversionError(f"LoRA {name!r} not found in {self.folder} (available: {known})")

    def __call__(self, name: str, targets: LoRATargets) -> LoRA:
        """Resolve a prompt's `<lora:name:...>`: the named LoRA mapped for `targets` (cached)."""
        return self.load(self.find(name).path, targets)

    def load(self, path: str | Path, targets: LoRATargets) -> LoRA:
        """Read and map a LoRA file, or return the cached mapping (same file, size, mtime and model layout)."""
        path = Path(path)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, _layout(targets))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        lora = read_lora(path, targets)
        with self._lock:
            self._cache[key] = lora
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return lora


def _layout(targets: LoRATargets) -> tuple:
    return targets.family, targets.unet_config, tuple(sorted((c, len(s)) for c, s in targets.shapes.items()))


class EmbeddingLibrary:
    """A folder of textual-inversion embeddings, searched recursively."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def read_all(self) -> tuple[list[Embedding], dict[Path, str]]:
        """(embeddings read, {path: error} for files that could not be read)."""
        embeddings, errors = [], {}
        for path in _files(self.folder, EMBEDDING_EXTENSIONS):
            try:
                embeddings.append(read_embedding(path))
            except ConversionError as error:
                errors[path] = str(error)
        return embeddings, errors

    def for_model(self, model) -> tuple[list[Embedding], dict[str, Embedding]]:
        """(embeddings that fit `model`, {name: embedding} skipped because they do not), as A1111 sorts them."""
        embeddings, _ = self.read_all()
        text = model.text_encoder()
        loaded, skipped = [], {}
        for embedding in embeddings:
            if check_embedding(embedding, model.info.family, text) is None:
                loaded.append(embedding)
            else:
                skipped[embedding.name] = embedding
        return loaded, skipped


def embeddings_api(loaded: list[Embedding], skipped: dict[str, Embedding] | list[Embedding]) -> dict:
    """A1111's `GET /sdapi/v1/embeddings` body: {"loaded": {name: info}, "skipped": {name: info}}."""

    def info(e: Embedding) -> dict:
        shape = next(iter(e.vectors.values())).shape
        return {"step": e.step, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": int(shape[-1]),
                "vectors": int(shape[0])}  # fmt: skip

    skipped = skipped.values() if isinstance(skipped, dict) else skipped
    return {"loaded": {e.name: info(e) for e in loaded}, "skipped": {e.name: info(e) for e in skipped}}


class NetworkFolder:
    """A folder of networks read at run time, in `dtype` (default: the backend's), with the last `cache_size` read
    kept loaded, keyed by path, size and modification time (a replaced file is read again); thread-safe."""

    default_cache = 1

    def __init__(self, folder: str | Path, dtype=None, cache_size: int | None = None):
        self.folder = Path(folder).expanduser()
        self.dtype = dtype
        self.cache_size = self.default_cache if cache_size is None else cache_size
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()

    def _loaded(self, path: Path, read):
        """`read(path)`, or its cached result."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        loaded = read(path)
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded


class ControlNetLibrary(NetworkFolder):
    """A folder of ControlNets (files and diffusers folders, searched recursively); callable as a `Pipeline`'s
    ControlNet resolver. Arguments as `NetworkFolder`'s."""

    default_cache = CONTROLNET_CACHE

    def listing(self) -> dict[str, Path]:
        """A1111 title ("name [hash]"; diffusers folders: the name) -> path, sorted by title (rescanned each call)."""
        folders = [c.parent for c in self.folder.rglob("config.json") if is_control_config(c)]
        found = {folder.name: folder for folder in folders}
        for path in _files(self.folder, CONTROLNET_EXTENSIONS):
            if path.parent not in folders:  # a diffusers folder's weights are listed as the folder
                found[a1111_title(path.stem, a1111_hash(path))] = path
        return dict(sorted(found.items()))

    def find(self, name: str) -> Path:
        """The ControlNet titled or named `name`. Raises ConversionError naming the folder and what it holds."""
        listing = self.listing()
        if name in listing:
            return listing[name]
        bare = TITLE_HASH.sub("", name)
        found = [path for title, path in listing.items() if TITLE_HASH.sub("", title) == bare]
        if len(found) == 1:
            return found[0]
        if found:
            raise ConversionError(f"ControlNet {name!r} is ambiguous in {self.folder}: {', '.join(map(str, found))}")
        known = ", ".join(list(listing)[:20]) or "none"
        raise ConversionError(f"ControlNet {name!r} not found in {self.folder} (available: {known})")

    def __call__(self, name: str):
        """The named ControlNet, loaded (cached by path, size and modification time)."""
        return self._loaded(self.find(name), lambda path: read_controlnet(path, self.dtype))


class UpscalerLibrary(NetworkFolder):
    """A folder of model upscalers (A1111's models/ESRGAN, RealESRGAN and SwinIR in one, searched recursively); callable
    as a `Pipeline`'s upscaler resolver. Arguments as `NetworkFolder`'s."""

    default_cache = UPSCALER_CACHE

    def listing(self) -> dict[str, Path]:
        """name -> path, sorted by name (rescanned each call): A1111's name for the releases it downloads itself
        ("R-ESRGAN 4x+", "SwinIR 4x"), else the file name without extension ("4x-UltraSharp")."""
        return dict(sorted((upscaler_name(path), path) for path in _files(self.folder, UPSCALER_EXTENSIONS)))

    def api_listing(self) -> list[dict]:
        """A1111's `GET /sdapi/v1/upscalers` entries of the folder's models (each file's scale read from its
        shapes; unreadable files are left out)."""
        entries = []
        for path in self.listing().values():
            try:
                entries.append(upscaler_listing(path))
            except ConversionError:
                continue
        return entries

    def find(self, name: str) -> Path:
        """The upscaler listed as `name` (or whose file is named so). Raises ConversionError naming what the folder
        holds."""
        listing = self.listing()
        if name in listing:
            return listing[name]
        found = [path for path in listing.values() if path.stem == name]
        if len(found) == 1:
            return found[0]
        known = ", ".join(list(listing)[:20]) or "none"
        raise ConversionError(f"upscaler {name!r} not found in {self.folder} (available: {known})")

    def __call__(self, name: str):
        """The named upscaler, loaded (cached by path, size and modification time)."""
        return self._loaded(self.find(name), lambda path: read_upscaler(path, self.dtype, upscaler_name(path)))
