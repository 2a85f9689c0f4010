"""Model components on disk: one folder each, `config.json` (our config dataclass) + `weights.safetensors`.

Weights are stored in MLX layout and loaded strictly: a missing or unexpected key is an error, never a
randomly initialised layer. A quantized component records its settings under "quantization" in config.json;
the loader rebuilds the quantized layers that `mlx_sd.quantization` selects before loading.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import backend, cpu_kernels
from .models import (
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    ControlNetConfig,
    ControlNetModel,
    MMDiTConfig,
    SD3ControlNetConfig,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    T5Config,
    T5EncoderModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)
from .quantization import QuantizationConfig, quantize_model

# kind -> (config dataclass, module class)
KINDS = {
    "unet": (UNetConfig, UNet2DConditionModel),
    "vae": (VAEConfig, AutoencoderKL),
    "clip_text": (CLIPTextConfig, CLIPTextModel),
    "controlnet": (ControlNetConfig, ControlNetModel),
    "mmdit": (MMDiTConfig, SD3Transformer2DModel),
    "sd3_controlnet": (SD3ControlNetConfig, SD3ControlNetModel),
    "t5_text": (T5Config, T5EncoderModel),
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
QUANTIZATION_KEY = "quantization"


def config_from_dict(cls, data: dict):
    """Build a config dataclass from JSON data; lists become tuples, unknown keys are an error."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; was this folder written by a newer mlx-sd?")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def kind_of(config) -> str:
    for kind, (cls, _) in KINDS.items():
        if type(config) is cls:  # exact: a ControlNetConfig is also a UNetConfig
            return kind
    raise TypeError(f"not a model config: {type(config).__name__}")


def build(config) -> nn.Module:
    """An uninitialised model for `config` (weights are random until loaded)."""
    return KINDS[kind_of(config)][1](config)


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def write_config(folder: str | Path, config, quantization: QuantizationConfig | None = None) -> None:
    """Write a component's config.json: its kind, the config's fields and the quantization, if any."""
    data = {"kind": kind_of(config), **asdict(config)}
    if quantization is not None:
        data[QUANTIZATION_KEY] = quantization.to_dict()
    (Path(folder) / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")


def save_component(folder: str | Path, config, weights: dict[str, mx.array]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder, config)
    mx.save_safetensors(str(folder / WEIGHTS_FILE), weights)


def read_config(folder: str | Path):
    """A component folder's config and its quantization (None when the weights are floating point)."""
    data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise ValueError(f"{folder}: config.json names no known component kind ({kind!r})")
    quantization = data.pop(QUANTIZATION_KEY, None)
    if quantization is not None:
        quantization = QuantizationConfig(**quantization)
    return config_from_dict(KINDS[kind][0], data), quantization


def load_config(folder: str | Path):
    return read_config(folder)[0]


def load_component(folder: str | Path, dtype: mx.Dtype | None = None) -> nn.Module:
    """Load a component folder strictly; `dtype` casts floating-point weights (None keeps the stored dtype).

    Quantized layers keep their packed integer weights; their scales and biases take `dtype`.
    """
    folder = Path(folder)
    config, quantization = read_config(folder)
    if backend.row_kernels(dtype or backend.default_dtype()) == "numba":
        cpu_kernels.warm_up_in_background()  # numba's start-up overlaps the load instead of delaying the first step
    model = build(config)
    if quantization is not None:
        quantize_model(kind_of(config), model, quantization)
    weights = mx.load(str(folder / WEIGHTS_FILE))
    if dtype is not None:
        weights = _cast(weights, dtype)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    """Floating-point weights cast to `dtype` (lazily). On CPU the casts are spread over one stream per core: most of
    a cast's time is page faults on the fresh memory, which run in parallel (SD1.5 UNet float16 -> float32 on 2
    cores: 2.9 s -> 1.6 s)."""
    streams = backend.cpu_streams() if not backend.on_gpu() else [mx.default_stream(mx.default_device())]
    load = [0] * len(streams)
    out = {}
    for k, v in sorted(weights.items(), key=lambda kv: -kv[1].size):  # largest first onto the least loaded stream
        if not mx.issubdtype(v.dtype, mx.floating) or v.dtype == dtype:
            out[k] = v
            continue
        i = load.index(min(load))
        load[i] += v.size
        out[k] = v.astype(dtype, stream=streams[i])
    return out
