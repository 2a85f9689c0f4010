"""DnCNN (Zhang et al. 2017, "Beyond a Gaussian Denoiser") and FDnCNN (the flexible variant of FFDNet, Zhang et al.
2018): KAIR's dncnn_15 / 25 / 50, dncnn_color_blind, dncnn_gray_blind, fdncnn_gray / color (and their _clip
models), 1x denoisers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

A plain stack of nb 3x3 convs: the first followed by ReLU, the middle ones by BatchNorm (eps 1e-4, its running
statistics; the published files have it merged into the convs, "R" mode) and ReLU, the last alone. DnCNN predicts
the noise and returns the input minus it; FDnCNN takes one channel more, the noise-level map, which spandrel fills
with 15/255, and returns the image itself.

Parameter paths follow the published checkpoints (`model.N`, KAIR's flattened sequential). Images are (B, H, W, C)
in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import BatchNorm, ReLU
from .drunet import NOISE_LEVEL
from .layers import Conv2d
from .swinir import sequential

BN_EPS = 1e-4  # KAIR's BatchNorm2d(eps=1e-04)


@dataclass(frozen=True)
class DnCNNConfig:
    in_channels: int = 1  # the image's (FDnCNN's first conv takes one more: the noise map)
    out_channels: int = 1
    nc: int = 64
    nb: int = 17  # convs
    batch_norm: bool = False  # KAIR's act_mode "BR" (else "R")
    flexible: bool = False  # FDnCNN: a noise-map input and no residual

    @property
    def scale(self) -> int:
        return 1


class DnCNN(nn.Module):
    def __init__(self, config: DnCNNConfig):
        super().__init__()
        self.config = c = config
        self.model = [Conv2d(c.in_channels + c.flexible, c.nc, 3, padding=1), ReLU()]
        for _ in range(c.nb - 2):
            norm = [BatchNorm(c.nc, BN_EPS)] if c.batch_norm else []
            self.model += [Conv2d(c.nc, c.nc, 3, padding=1), *norm, ReLU()]
        self.model.append(Conv2d(c.nc, c.out_channels, 3, padding=1))

    @property
    def dtype(self) -> mx.Dtype:
        return self.model[-1].weight.dtype

    @property
    def input_channels(self) -> int:
        return self.config.in_channels

    size_minimum = 1
    size_multiple = 1
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H, W, out_channels)."""
        if self.config.flexible:
            return sequential(self.model, mx.concatenate([x, mx.full((*x.shape[:3], 1), NOISE_LEVEL, x.dtype)], -1))
        return x - sequential(self.model, x)
