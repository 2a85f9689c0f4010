"""The models a server offers: converted folders found in --models-dir, plus the one named by --model.

Clients name a model by its id (the folder name), A1111's title ("name [hash]"), the short hash or the sha256.
A name from a request is only ever looked up in this table: it never becomes a path.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from mlx_sd.components import load_config
from mlx_sd.infotext import a1111_title
from mlx_sd.model import MANIFEST, ModelInfo, denoiser_folder
from mlx_sd.params import FamilyDefaults
from mlx_sd.samplers import FLOW_SAMPLERS, list_samplers
from mlx_sd.schedules import EDM_SCHEDULERS
from mlx_sd.sd3 import model_defaults

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # A1111 clients often send the file name


@dataclass(frozen=True)
class ModelEntry:
    """One converted model folder and its manifest."""

    name: str
    folder: Path
    info: ModelInfo
    in_channels: int = 4  # 9: an inpainting UNet (latents + mask + masked-image latents); 8: InstructPix2Pix
    config: object = None  # the denoiser's config (SD3.5's defaults differ from SD3's)
    scheduler: dict | None = None  # the scheduler config (EDM models' defaults come from it)

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9

    @property
    def edit(self) -> bool:
        """An InstructPix2Pix model: it edits an init image (mlx_sd/edit.py)."""
        return self.in_channels == 8

    @property
    def title(self) -> str:
        """A1111's checkpoint title: "name [short hash]"."""
        return a1111_title(self.name, self.info.short_hash)

    @property
    def samplers(self) -> list[str]:
        """The samplers this model runs: rectified-flow models (SD3) those with a flow variant (`Sampler.flow`), EDM
        models the k-diffusion ones (mlx_sd/samplers/plan.py), the others every one."""
        entries = list_samplers()
        if self.info.family == "sd3":
            return [s.name for s in entries if s.name in FLOW_SAMPLERS]
        if (self.scheduler or {}).get("_class_name") in EDM_SCHEDULERS:
            return [s.name for s in entries if s.kdiffusion is not None]
        return [s.name for s in entries]

    @property
    def defaults(self) -> FamilyDefaults:
        return model_defaults(self.info, self.config, self.scheduler)

    def keys(self) -> set[str]:
        keys = {self.name, self.title}
        if self.info.sha256:
            keys |= {self.info.short_hash, self.info.sha256}
        return keys


class ModelRegistry:
    """Thread-safe table of the models on offer, rescanned on demand (a folder added later is found)."""

    def __init__(self, models_dir: Path | None = None, extra: list[Path] = ()):
        self.models_dir = models_dir
        self._extra = [Path(p) for p in extra]
        self._lock = threading.Lock()
        self._entries: dict[str, ModelEntry] = {}
        self.refresh()

    def refresh(self) -> None:
        """Rescan --models-dir (one level deep) and re-read the manifests."""
        folders = list(self._extra)
        if self.models_dir is not None and self.models_dir.is_dir():
            folders += sorted(p for p in self.models_dir.iterdir() if (p / MANIFEST).is_file())
        entries = {}
        for folder in folders:
            try:
                info = ModelInfo.read(folder)
                denoiser = folder / denoiser_folder(info)
                in_channels = int(json.loads((denoiser / "config.json").read_text())["in_channels"])
                config = load_config(denoiser) if info.family == "sd3" else None  # SD3.5's defaults differ
                scheduler_file = folder / "scheduler" / "scheduler_config.json"  # EDM models' defaults come from it
                scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else None
            except (OSError, ValueError, TypeError, KeyError):
                continue  # a half-written or foreign folder is not offered
            name = folder.name
            if name in entries and entries[name].folder.resolve() != folder.resolve():
                name = f"{folder.parent.name}-{name}"  # two folders of one name: keep both reachable
            entries[name] = ModelEntry(name, folder, info, in_channels, config, scheduler)
        with self._lock:
            self._entries = entries

    def list(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries.values())

    def find(self, key: str) -> ModelEntry | None:
        """The model named `key` (id, title, hash or sha256; a checkpoint file suffix is ignored), or None."""
        key = key.strip()
        for attempt in range(2):
            for entry in self.list():
                if key in entry.keys():
                    return entry
            base = next((key[: -len(s)] for s in CHECKPOINT_SUFFIXES if key.endswith(s)), None)
            for entry in self.list():
                if base and base in entry.keys():
                    return entry
            if attempt == 0:
                self.refresh()
        return None

    def entry_for(self, folder: Path) -> ModelEntry:
        """The entry of a folder given on the command line (added if it is not in --models-dir)."""
        folder = Path(folder)
        for entry in self.list():
            if entry.folder.resolve() == folder.resolve():
                return entry
        self._extra.append(folder)
        self.refresh()
        for entry in self.list():
            if entry.folder.resolve() == folder.resolve():
                return entry
        raise ValueError(f"{folder} is not a readable mlx-sd model folder")
