"""neosr's "UniUpsample" heads (the `MetaUpsample` record in the file names one): the upsamplers of MoESR and FDAT.

- "conv" (or any scale 1): a 3x3 conv;
- "pixelshuffledirect": a conv to out x scale^2 channels and a pixel shuffle;
- "pixelshuffle": a conv to `mid` channels, LeakyReLU, per octave (or once for 3x) a conv and a pixel shuffle, a conv;
- "nearest+conv": per octave a conv, nearest 2x, LeakyReLU 0.2 (3x: once), a conv and LeakyReLU 0.2, a conv;
- "dysample": (a conv to `mid` and LeakyReLU where `mid` differs), DySample (`mlx_sd.models.dysample`);
- "transpose+conv": 2x one 4x4 transposed conv (stride 2), 3x a 3x3 one (stride 3), 4x two 4x4 with GELU between;
  then a 3x3 conv;
- "pa_up": per octave (or once for 3x) nearest upsampling, a conv, pixel attention (x times the sigmoid of a 1x1
  conv of itself), LeakyReLU 0.2, a conv, LeakyReLU 0.2; a last conv.
The layers are returned as the original's `nn.Sequential` holds them (their indices are the files' names);
`sequential` runs them. LeakyReLU without a slope is torch's 0.01.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cugan import ConvTranspose
from .dat import GELU
from .dysample import DySample
from .esrgan import upsample_repeat
from .layers import Conv2d, sigmoid
from .swinir import LeakyReLU, PixelShuffle

# the `MetaUpsample` record's method index: neosr's SampleMods3 order (MoESR's first five are the same)
METHODS = ("conv", "pixelshuffledirect", "pixelshuffle", "nearest+conv", "dysample", "transpose+conv", "lda", "pa_up")


class Nearest(nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self._r = r

    def __call__(self, x: mx.array) -> mx.array:
        return upsample_repeat(x, self._r)


class PixelAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv = [Conv2d(dim, dim, 1)]

    def __call__(self, x: mx.array) -> mx.array:
        return x * sigmoid(self.conv[0](x))


def _octaves(scale: int) -> list[int]:
    """The stages' factors: 2 per octave of a power of two, else one 3."""
    if scale & (scale - 1) == 0:
        return [2] * (scale.bit_length() - 1)
    if scale == 3:
        return [3]
    raise ValueError(f"an upsampler of scale {scale}: only powers of two and 3 exist")


def uni_upsample(method: str, scale: int, dim: int, out: int, mid: int, groups: int = 4) -> list[nn.Module]:
    """The layers of neosr's UniUpsample(V3) `method` from `dim` to `out` channels (module docstring)."""
    conv = lambda i, o: Conv2d(i, o, 3, padding=1)  # noqa: E731
    if scale == 1 or method == "conv":
        return [conv(dim, out)]
    if method == "pixelshuffledirect":
        return [conv(dim, out * scale**2), PixelShuffle(scale)]
    if method == "pixelshuffle":
        stages = [m for r in _octaves(scale) for m in (conv(mid, r * r * mid), PixelShuffle(r))]
        return [conv(dim, mid), LeakyReLU(0.01), *stages, conv(mid, out)]
    if method == "nearest+conv":
        stages = [m for r in _octaves(scale) for m in (conv(dim, dim), Nearest(r), LeakyReLU(0.2))]
        return [*stages, conv(dim, dim), LeakyReLU(0.2), conv(dim, out)]
    if method == "dysample":
        first = [conv(dim, mid), LeakyReLU(0.01)] if mid != dim else []
        return [*first, DySample(mid, out, scale, groups)]
    if method == "transpose+conv":
        if scale == 2:
            layers = [ConvTranspose(dim, out, 4, 2, 1)]
        elif scale == 3:
            layers = [ConvTranspose(dim, out, 3, 3, 0)]
        elif scale == 4:
            layers = [ConvTranspose(dim, dim, 4, 2, 1), GELU(), ConvTranspose(dim, out, 4, 2, 1)]
        else:
            raise ValueError(f"a transposed-conv upsampler of scale {scale}: only 2, 3 and 4 exist")
        return [*layers, conv(out, out)]
    if method == "pa_up":
        layers = []
        for r in _octaves(scale):
            layers += [Nearest(r), conv(dim, mid), PixelAttention(mid), LeakyReLU(0.2), conv(mid, mid), LeakyReLU(0.2)]
            dim = mid
        return [*layers, conv(mid, out)]
    raise ValueError(f"upsampler {method!r} is not one mlx-sd runs ({', '.join(m for m in METHODS if m != 'lda')})")
