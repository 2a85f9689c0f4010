"""The output folder: written beside OUT under a temporary name, then renamed into place, so OUT is either the
complete converted model or untouched (on errors, a full disk, Ctrl-C). Also the hashing of source files.

Converting again into an existing OUT compares the new folder with it byte for byte: identical -> OUT is left
as it is; different -> refused unless `overwrite` (a folder that is not an mlx-sd model folder is never replaced).
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlx_sd.model import MANIFEST

from .keymap import ConversionError

_CHUNK = 16 * 2**20  # bytes hashed per read: large enough to be fast, small enough to stay out of the memory peak
_SPACE_MARGIN = 64 * 2**20  # tokenizer files, configs, filesystem overhead
_STAGING = re.compile(r"\.(?P<name>.+)\.(?:partial|replaced)-(?P<pid>\d+)-[0-9a-f]+")


def sha256_file(path: Path, advance: Callable[[int], None] = lambda n: None) -> str:
    """The file's sha256 (hex), read in chunks (the page cache holds the file, not this process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            advance(len(chunk))
    return digest.hexdigest()


def check_destination(out: Path, overwrite: bool, manifest: dict | None = None) -> None:
    """Refuse early what `staged_output` would refuse at the end: OUT is a file, a folder that is not an mlx-sd
    model folder, or (without `overwrite`) a model folder whose manifest differs from `manifest`."""
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConversionError(f"{out} exists and is not a folder; choose another output path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    existing = out / MANIFEST
    if not existing.is_file():
        raise ConversionError(
            f"{out} exists and is not an mlx-sd model folder (no {MANIFEST}); choose another output path "
            "(mlx-sd only ever replaces folders it wrote)"
        )
    if manifest is not None and not overwrite:
        try:
            theirs = json.loads(existing.read_text())
        except (OSError, ValueError):
            theirs = {}
        differing = sorted(k for k in set(manifest) | set(theirs) if manifest.get(k) != theirs.get(k))
        if differing:
            raise ConversionError(
                f"{out} already holds a different conversion ({', '.join(differing)} differ); "
                "pass overwrite=True (--overwrite) to replace it, or choose another output path"
            )


def _clean_stale(out: Path) -> None:
    """Remove staging folders left beside OUT by conversions that were killed (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.*-*-*"):
        match = _STAGING.fullmatch(path.name)
        if match and match["name"] == out.name and not _alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identical(a: Path, b: Path) -> bool:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return files_a == files_b and all(filecmp.cmp(a / f, b / f, shallow=False) for f in files_a)


def _no_space(out: Path, needed: int, error: OSError | None = None) -> ConversionError:
    free = shutil.disk_usage(out.parent).free
    cause = f" ({error.strerror})" if error is not None else ""
    return ConversionError(
        f"not enough disk space for {out}{cause}: the converted model needs about {needed / 2**30:.2f} GiB, "
        f"{free / 2**30:.2f} GiB are free on that disk; free some space or choose another output folder"
    )


@dataclass
class Staging:
    path: Path  # the temporary folder to write into
    result: str = ""  # once the block succeeded: "created", "replaced" or "unchanged"


@contextmanager
def staged_output(out: Path, needed: int, overwrite: bool) -> Iterator[Staging]:
    """Yield an empty temporary folder beside `out`; when the block succeeds, make it `out`.

    Args:
        out: the final folder.
        needed: bytes the block will write (checked against the free space first).
        overwrite: replace an existing, different mlx-sd model folder.
    Yields:
        a `Staging`: write into `.path`; `.result` says what happened to `out` after the block.
    Raises:
        ConversionError for a full disk or an existing different folder; anything the block raises, after the
        temporary folder is removed (KeyboardInterrupt included). `out` is never left half-written.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    check_destination(out, overwrite)
    _clean_stale(out)
    if shutil.disk_usage(out.parent).free < needed + _SPACE_MARGIN:
        raise _no_space(out, needed + _SPACE_MARGIN)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    staging = out.parent / f".{out.name}.partial-{token}"
    staging.mkdir()
    stage = Staging(staging)
    try:
        try:
            yield stage
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(out, needed, error) from None
            raise
        stage.result = _commit(staging, out, overwrite, token)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, out: Path, overwrite: bool, token: str) -> str:
    if out.is_dir() and any(out.iterdir()):
        if _identical(staging, out):
            return "unchanged"  # converting again changed nothing: OUT keeps its files (and their times)
        if not overwrite:
            raise ConversionError(
                f"{out} already exists with different contents; pass overwrite=True (--overwrite) to replace it"
            )
        replaced = out.parent / f".{out.name}.replaced-{token}"
        out.rename(replaced)
        try:
            staging.rename(out)
        except BaseException:
            replaced.rename(out)
            raise
        shutil.rmtree(replaced, ignore_errors=True)
        _fsync_folder(out.parent)
        return "replaced"
    if out.is_dir():
        out.rmdir()  # an empty folder the user made for the output
    staging.rename(out)
    _fsync_folder(out.parent)
    return "created"


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX: the directory entry lives in the parent folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
