"""Converted models cached by what they were converted from, for apps that take any model spec (`--model`).

A spec (a checkpoint file, a diffusers folder or a hub id) is converted once, with the converter's defaults, into
`$MLX_SD_CACHE` (default `~/.cache/mlx-sd/models`, or under `$XDG_CACHE_HOME`), in a folder named after the spec
and a short hash of what identifies it: for local sources the resolved path with every file's size and
modification time (a file changed in place gets a new conversion); for hub ids the id itself (a repo updated on the
hub is not re-converted: delete its folder, or convert it explicitly with `mlx-sd convert`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from mlx_sd.model import MANIFEST

from .converter import ConvertProgress, convert

CACHE_ENV = "MLX_SD_CACHE"


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mlx-sd" / "models"


def cache_folder(spec: str, **options) -> Path:
    """Where `spec`'s conversion with `options` (as for `convert`) is cached, whether or not it exists yet."""
    path = Path(spec).expanduser()
    if path.exists():
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        identity = "\n".join([str(path.resolve())] + [f"{p} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in files])
        name = path.stem if path.is_file() else path.resolve().name
    else:
        identity, name = spec, spec.replace("/", "--")
    if options:
        identity += "\n" + repr(sorted(options.items()))
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return cache_root() / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}-{digest}"


def converted(spec: str, progress: Callable[[ConvertProgress], None] | None = None, **options) -> Path:
    """The converted folder for `spec`, converting it on first use with `options` (keyword arguments of `convert`;
    raises ConversionError like `convert`)."""
    folder = cache_folder(spec, **options)
    if not (folder / MANIFEST).is_file():
        convert(spec, folder, progress=progress, **options)
    return folder


def load_pipeline(spec: str, progress: Callable[[ConvertProgress], None] | None = None, **options):
    """A `mlx_sd.pipeline.Pipeline` for any source the converter accepts, converted once and cached."""
    from mlx_sd.pipeline import Pipeline

    return Pipeline(converted(spec, progress=progress, **options))
