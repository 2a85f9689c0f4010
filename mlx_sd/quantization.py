"""Weight quantization of converted models: which layers are quantized, decided in one place.

`mlx-sd convert --quantize 4|8` stores the selected Linear layers of the denoiser (the UNet, or SD3's MMDiT) and the
text encoders (CLIP, and SD3's T5) as MLX affine quantized weights (`mx.quantize`: per group of `group_size` input
weights, a scale and a bias in the model's dtype, `bits`-bit integers packed into uint32). The converter writes them
with `quantized_layers`, and `mlx_sd.components.load_component` rebuilds the same structure with `quantize_model`
before its strict load, so the two cannot disagree: a layer quantized by one and not the other is a missing or
unexpected key, never a silent mismatch.

What stays in floating point, and why:
- Convolutions (most of the UNet's weights; the MMDiT's patch embedding) and the VAE: MLX has no quantized
  convolution, and the VAE is small and decides the image's fine detail.
- The UNet's timestep path: `time_embedding`, `add_embedding` (SDXL) and every resnet's `time_emb_proj`. The time
  embedding conditions every block on the noise level; a small error there shifts every resnet's features at
  once, and these layers are ~3% of the UNet's linear weights (measured cost: see `tests/test_convert.py`).
- The MMDiT's entry and exit layers: `time_text_embed` (the timestep + pooled-text embedding every block's
  modulation is computed from), `context_embedder` (every text token enters through it) and `proj_out` (writes the
  velocity itself). Together 0.3-0.7% of the MMDiT's weights; keeping them float lowered the output error of a
  random SD3-medium-width MMDiT (4 blocks, weights drawn as `benchmarks/quantization.py` draws them) from 0.96%
  to 0.92% RMS (54.7 -> 55.1 dB PSNR) at 8 bits and from 22% to 17% (27.6 -> 29.8 dB) at 4 bits.
- Not kept: the MMDiT's adaLN modulation projections (`norm1.linear`, `norm1_context.linear`, `norm_out.linear`).
  They play the UNet's `time_emb_proj` part, but they hold a third of the MMDiT's weights (33% of SD3.5 large's
  8.1B; the UNet's timestep path is 3%): float, they would grow SD3.5 large's 8-bit MMDiT from 8.2 to 10.5 GiB.
  Measured on the same model, keeping them float bought 3 dB at 8 bits (55.1 -> 58.3 dB, 0.92% -> 0.63% RMS; SD1.5's
  8-bit UNet: 57 dB) and 1 dB at 4 bits (29.8 -> 30.9 dB): not worth a third of the memory saved.
- T5: every Linear is quantized, `wo` included. transformers keeps T5 v1.1's `wo` out of float16 and out of int8
  (`_keep_in_fp32_modules`) because its *activations* overflow half precision; here only weights are quantized:
  `wo` still receives t5.py's float32 product, a float32 input makes the quantized matmul run and return float32
  (its half-precision scales are promoted), and the residual stream stays float32, so nothing can overflow
  (`tests/test_sd3_quantization.py`). Keeping `wo` float (21% of T5's weights) bought 0.5 dB on a random
  4096-wide T5 of 3 blocks (8 bits: 58.7 -> 59.2 dB; 4 bits: 34.9 -> 35.3 dB). The token embedding `shared` and
  the relative attention bias are Embeddings, not Linear layers, and stay as they are.
- The text encoders' `text_projection` (SDXL's and SD3's pooled embeddings): one small layer feeding the added
  conditioning directly.
- Any Linear whose input width is not a multiple of `group_size` (mx.quantize's requirement).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import mlx.nn as nn

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64  # MLX's default: a scale and bias per 64 weights, 0.5 bit/weight overhead at fp16
# The component kinds (mlx_sd.components.KINDS) that are quantized.
QUANTIZED_KINDS = ("unet", "clip_text", "mmdit", "t5_text")

# Module paths kept in floating point, per component kind (full matches; reasons in the module docstring).
KEEP_FLOAT = {
    "unet": (r"time_embedding\..+", r"add_embedding\..+", r".+\.time_emb_proj"),
    "clip_text": (r"text_projection",),
    "mmdit": (r"time_text_embed\..+", r"context_embedder", r"proj_out"),
    "t5_text": (),
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
