"""Model components on disk: one folder each, `config.json` (our config dataclass) + `weights.safetensors`.

Weights are stored in MLX layout and loaded strictly: a missing or unexpected key is an error, never a
randomly initialised layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)

# kind -> (config dataclass, module class)
KINDS = {
    "unet": (UNetConfig, UNet2DConditionModel),
    "vae": (VAEConfig, AutoencoderKL),
    "clip_text": (CLIPTextConfig, CLIPTextModel),
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


def config_from_dict(cls, data: dict):
    """Build a config dataclass from JSON data; lists become tuples, unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; was this folder written by a newer mlx-sd?")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def kind_of(config) -> str:
    for kind, (cls, _) in KINDS.items():
        if isinstance(config, cls):
            return kind
    raise TypeError(f"not a model config: {type(config).__name__}")


def build(config) -> nn.Module:
    """An uninitialised model for `config` (weights are random until loaded)."""
    return KINDS[kind_of(config)][1](config)


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def save_component(folder: str | Path, config, weights: dict[str, mx.array]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"kind": kind_of(config), **asdict(config)}
    (folder / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    mx.save_safetensors(str(folder / WEIGHTS_FILE), weights)


def load_config(folder: str | Path):
    data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"{folder}: config.json names no known component kind ({kind!r})")
    return config_from_dict(KINDS[kind][0], data)


def load_component(folder: str | Path, dtype: mx.Dtype | None = None) -> nn.Module:
    """Load a component folder strictly; `dtype` casts floating-point weights (None keeps the stored dtype)."""
    folder = Path(folder)
    model = build(load_config(folder))
    weights = mx.load(str(folder / WEIGHTS_FILE))
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model
