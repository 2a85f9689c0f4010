"""Weight quantization of converted models: which layers are quantized, decided in one place.

`mlx-sd convert --quantize 4|8` stores the selected Linear layers of the UNet and the text encoders as MLX affine
quantized weights (`mx.quantize`: per group of `group_size` input weights, a scale and a bias in the model's dtype,
`bits`-bit integers packed into uint32). The converter writes them with `quantized_layers`, and
`mlx_sd.components.load_component` rebuilds the same structure with `quantize_model` before its strict load, so
the two cannot disagree: a layer quantized by one and not the other is a missing or unexpected key, never a
silent mismatch.

What stays in floating point, and why:
- Convolutions (most of the UNet's weights) and the VAE: MLX has no quantized convolution, and the VAE is small
  and decides the image's fine detail.
- The UNet's timestep path: `time_embedding`, `add_embedding` (SDXL) and every resnet's `time_emb_proj`. The time
  embedding conditions every block on the noise level; a small error there shifts every resnet's features at
  once, and these layers are ~3% of the UNet's linear weights (measured cost: see `tests/test_convert.py`).
- The text encoders' `text_projection` (SDXL's pooled embedding): one small layer feeding the added
  conditioning directly. Embeddings (token, position) are not Linear layers and stay as they are.
- Any Linear whose input width is not a multiple of `group_size` (mx.quantize's requirement).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # MLX's default: a scale and bias per 64 weights, 0.5 bit/weight overhead at fp16
QUANTIZED_KINDS = ("unet", "clip_text")  # component kinds (mlx_sd.components.KINDS) that are quantized

# Module paths kept in floating point, per component kind (full matches; reasons in the module docstring).
KEEP_FLOAT = {
    "unet": (r"time_embedding\..+", r"add_embedding\..+", r".+\.time_emb_proj"),
    "clip_text": (r"text_projection",),
}


@dataclass(frozen=True)
class QuantizationConfig:
    """MLX affine quantization settings, as recorded in a component's config.json."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    mode: str = "affine"

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"quantization bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"quantization group_size must be one of {GROUP_SIZES}, got {self.group_size}")
        if self.mode != "affine":
            raise ValueError(f"only affine quantization is supported, got {self.mode!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def is_quantized(kind: str, path: str, module: nn.Module, config: QuantizationConfig) -> bool:
    """Whether the module at `path` of a `kind` component is stored quantized (the one shared predicate)."""
    if kind not in QUANTIZED_KINDS or type(module) is not nn.Linear:
        return False
    if module.weight.shape[1] % config.group_size:
        return False
    return not any(re.fullmatch(pattern, path) for pattern in KEEP_FLOAT.get(kind, ()))


def quantized_layers(kind: str, model: nn.Module, config: QuantizationConfig) -> list[str]:
    """Module paths of the layers `quantize_model` quantizes, e.g. "down_blocks.0.attentions.0.proj_in"."""
    return [path for path, module in model.named_modules() if is_quantized(kind, path, module, config)]


def quantize_model(kind: str, model: nn.Module, config: QuantizationConfig) -> None:
    """Replace the selected Linear layers of `model` with QuantizedLinear layers, in place (before loading)."""
    nn.quantize(
        model,
        group_size=config.group_size,
        bits=config.bits,
        mode=config.mode,
        class_predicate=lambda path, module: is_quantized(kind, path, module, config),
    )
