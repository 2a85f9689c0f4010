"""Model ids on the Hugging Face hub -> a folder or file in huggingface_hub's normal cache, fetching only what
the conversion reads.

SRC forms: `owner/name` (a diffusers repo: model_index.json and the components' configs, tokenizers and chosen
weights; or a VAE repo with config.json at its root, for --vae) and `owner/name/path/file.safetensors` (one file
of a repo, e.g. an original single-file checkpoint).

Never a hang: huggingface_hub waits without a time limit on a server that accepts a connection and never
answers, so the hub is first asked once with our own timeout (`HF_HUB_ETAG_TIMEOUT`, default 10 s). When it does
not answer in time, or `HF_HUB_OFFLINE` is set, only the local cache is used, and a model that is not cached is
one clear error naming why.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from .diffusers_folder import CONFIG, MODEL_INDEX, READ_AS_CONFIG, choose_weights
from .keymap import ConversionError

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_NAME = r"[A-Za-z0-9][\w.-]*"
_REPO = re.compile(rf"(?P<repo>{_NAME}/{_NAME})(?:/(?P<file>.+))?")
_DEFAULT_TIMEOUT = 10.0  # seconds, huggingface_hub's own default for metadata requests
_ON = {"1", "ON", "YES", "TRUE"}
# diffusers components whose weights are converted (the rest of a repo's weights, e.g. safety_checker, are not
# downloaded) and folders read as configs only.
_WEIGHT_FOLDERS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# What is read of the config folders: configs, CLIP vocabularies, T5's SentencePiece model (tokenizer_3).
_CONFIG_SUFFIXES = (".json", ".txt", ".model")


def parse_hub_id(src: str) -> tuple[str, str | None] | None:
    """(repo id, file in the repo or None) if `src` has the shape of a hub id, else None."""
    match = _REPO.fullmatch(src)
    if match is None or "\\" in src:
        return None
    repo, file = match["repo"], match["file"]
    if file is None and repo.lower().endswith(CHECKPOINT_SUFFIXES):
        return None  # "models/sd15.safetensors" is a local path that does not exist, not a repo
    if file is not None and not file.lower().endswith(CHECKPOINT_SUFFIXES):
        return None
    return repo, file


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _ON


def _timeout() -> float:
    try:
        return float(os.environ.get("HF_HUB_ETAG_TIMEOUT", _DEFAULT_TIMEOUT))
    except ValueError:
        return _DEFAULT_TIMEOUT


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def probe(repo_id: str, timeout: float) -> str | None:
    """None if the hub answers (any HTTP status) within `timeout` seconds, else why it did not."""
    url = f"{_endpoint()}/api/models/{repo_id}"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # the hub answered (401 for a private repo, 404 for a typo): huggingface_hub says which
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        if isinstance(reason, TimeoutError):
            return f"{_endpoint()} did not answer within {timeout:g} s"
        return f"{_endpoint()} cannot be reached: {reason}"


def needed_files(files: list[str], variant: str | None) -> list[str]:
    """The files of a diffusers (or VAE) repo the conversion reads: configs, tokenizers, the chosen weights."""
    by_folder: dict[str, list[str]] = {}
    for path in files:
        folder, _, name = path.rpartition("/")
        by_folder.setdefault(folder, []).append(name)
    if MODEL_INDEX in by_folder.get("", []):
        wanted = [MODEL_INDEX]
        for folder in READ_AS_CONFIG:
            wanted += [f"{folder}/{n}" for n in by_folder.get(folder, []) if n.endswith(_CONFIG_SUFFIXES)]
        weight_folders = [f for f in _WEIGHT_FOLDERS if f in by_folder]
    elif CONFIG in by_folder.get("", []):
        wanted, weight_folders = [], [""]
    else:
        return []
    for folder in weight_folders:
        prefix = f"{folder}/" if folder else ""
        names = by_folder[folder]
        wanted.append(prefix + CONFIG)
        wanted += [prefix + n for n in choose_weights(names, variant, f"{folder or 'the repo'}").files]
    return wanted


def fetch(src: str, *, variant: str | None = None) -> tuple[Path, dict]:
    """Download (or find in the cache) what converting hub id `src` needs.

    Returns:
        (local folder or file in the hub cache, facts for the manifest: repo id, file, revision).
    Raises:
        ConversionError when the hub cannot be used and the model is not cached, or the repo has nothing to convert.
    """
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, file = parse_hub_id(src)
    why_local = "HF_HUB_OFFLINE is set: unset it to download" if offline() else probe(repo_id, _timeout())
    local_only = why_local is not None
    facts = {"repo_id": repo_id} | ({"file": file} if file else {})
    kwargs = dict(local_files_only=local_only, etag_timeout=_timeout())
    try:
        if file is not None:
            path = Path(hf_hub_download(repo_id, file, endpoint=None if local_only else _endpoint(), **kwargs))
        elif local_only:
            patterns = [f"*{suffix}" for suffix in _CONFIG_SUFFIXES]
            path = Path(snapshot_download(repo_id, allow_patterns=patterns, **kwargs))
        else:
            listing = HfApi(endpoint=_endpoint()).list_repo_files(repo_id)
            wanted = needed_files(listing, variant)
            if not wanted:
                files = [f for f in listing if f.lower().endswith(CHECKPOINT_SUFFIXES)]
                shown = ", ".join(f"{repo_id}/{f}" for f in files[:6]) or "none"
                raise ConversionError(
                    f"{repo_id} is not a diffusers repo (no model_index.json or config.json); its checkpoint files: "
                    f"{shown}: convert one of those"
                )
            path = Path(snapshot_download(repo_id, allow_patterns=wanted, endpoint=_endpoint(), **kwargs))
    except LocalEntryNotFoundError:
        raise ConversionError(
            f"{src} is not (completely) in the local Hugging Face cache and the hub cannot be used "
            f"({why_local or 'the download failed'}); "
            "download it on a connected machine, or pass a local file or folder"
        ) from None
    except HfHubHTTPError as error:
        raise ConversionError(f"{src}: the hub refused ({str(error).splitlines()[0]})") from None
    except (OSError, ValueError) as error:
        if isinstance(error, ConversionError):
            raise
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConversionError(f"{src}: could not be fetched from the hub ({first})") from None
    if "snapshots" in path.parts:  # <cache>/models--owner--name/snapshots/<commit>/...
        facts["revision"] = path.parts[path.parts.index("snapshots") + 1]
    return path, facts


def fetch_file(repo_id: str, filename: str, purpose: str) -> Path:
    """One small file of a hub repo (e.g. a tokenizer that single files do not carry), from the cache or downloaded,
    never hanging: as `fetch` does.

    Args:
        repo_id, filename: what to fetch, e.g. ("google/t5-v1_1-xxl", "spiece.model").
        purpose: what it is for, for the error ("the T5 tokenizer").
    Raises:
        ConversionError naming the file, why the hub could not be used, and how to get it.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    why_local = "HF_HUB_OFFLINE is set: unset it to download" if offline() else probe(repo_id, _timeout())
    local_only = why_local is not None
    try:
        return Path(
            hf_hub_download(repo_id, filename, local_files_only=local_only, etag_timeout=_timeout(),
                            endpoint=None if local_only else _endpoint())
        )  # fmt: skip
    except LocalEntryNotFoundError:
        raise ConversionError(
            f"{purpose} ({repo_id}/{filename}) is not in the local Hugging Face cache and the hub cannot be used "
            f"({why_local or 'the download failed'}); fetch it once on a connected machine "
            f"(`hf download {repo_id} {filename}`), or convert the model's diffusers folder instead"
        ) from None
    except HfHubHTTPError as error:
        raise ConversionError(
            f"{purpose} ({repo_id}/{filename}): the hub refused ({str(error).splitlines()[0]})"
        ) from None
    except OSError as error:
        raise ConversionError(
            f"{purpose} ({repo_id}/{filename}): could not be fetched from the hub ({error})"
        ) from None
