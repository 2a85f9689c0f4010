"""FBCNN (Jiang et al. 2021, "Towards Flexible Blind JPEG Artifacts Removal"): fbcnn_color, fbcnn_gray and
fbcnn_gray_double, 1x JPEG-artefact removers A1111 (1.8+, through spandrel) runs from `models/ESRGAN`.

DRUNet's UNet (`drunet.py`: KAIR's residual blocks, down- and upsamplings; biases here) whose bottom splits in two:
a decoder, and a quality-factor predictor (residual blocks, global average pooling, a 512-wide MLP, a sigmoid: one
number per image). The quality factor is embedded by another MLP, and each decoder level's blocks are `QFAttention`
blocks, x + gamma * conv(ReLU(conv(x))) + beta, with gamma (sigmoid) and beta (tanh) per channel from the embedding.
The image is padded by edge replication to multiples of 8 and cropped back. spandrel runs the model plainly as an
image-to-image network: the quality factor is the predicted one (the original's `qf_input` unset).

Parameter paths follow the published checkpoints (`m_head`, `m_down1.N.res.M`, `m_up3.N`, `qf_pred.N`, `qf_embed.N`,
`to_gamma_3.0`, ...). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .dat import Placeholder, ReLU
from .drunet import MULTIPLE, ResBlock, conv_relu_conv, downsample, upsample
from .layers import Conv2d
from .swinir import sequential

QF_WIDTH = 512  # the quality-factor MLPs' width, fixed in the original (its pooled input: the last level's channels)


@dataclass(frozen=True)
class FBCNNConfig:
    in_channels: int = 3
    out_channels: int = 3
    nc: tuple[int, int, int, int] = (64, 128, 256, 512)  # channels per level; the last must be QF_WIDTH
    nb: int = 4  # residual blocks per level
    downsample: str = "strideconv"  # or "avgpool"
    upsample: str = "convtranspose"  # or "upconv", "pixelshuffle"

    @property
    def scale(self) -> int:
        return 1


class QFAttention(nn.Module):
    """x + gamma * conv(ReLU(conv(x))) + beta, gamma and beta (B, C) from the quality factor."""

    def __init__(self, channels: int):
        super().__init__()
        self.res = conv_relu_conv(channels, True)

    def __call__(self, x: mx.array, gamma: mx.array, beta: mx.array) -> mx.array:
        return x + (gamma[:, None, None] * sequential(self.res, x) + beta[:, None, None])


def _level(inputs: int, outputs: int, c: FBCNNConfig) -> tuple[list, list]:
    """A level's encoder (blocks, then the downsampling to `outputs` channels) and decoder (the upsampling from
    `outputs`, then the QFAttention blocks; the upsampling one entry, as the original's ModuleList holds it)."""
    up = upsample(outputs, inputs, c.upsample, True)
    encoder = [*(ResBlock(inputs, True) for _ in range(c.nb)), *downsample(inputs, outputs, c.downsample, True)]
    return encoder, [up[0] if len(up) == 1 else up, *(QFAttention(inputs) for _ in range(c.nb))]


def _mlp(*sizes: int) -> list:
    """Linear layers with a ReLU after each, as the original's `sequential` numbers them."""
    return [layer for a, b in zip(sizes, sizes[1:]) for layer in (nn.Linear(a, b), ReLU())]


class FBCNN(nn.Module):
    def __init__(self, config: FBCNNConfig):
        super().__init__()
        self.config = c = config
        nc, nb = c.nc, c.nb
        self.m_head = Conv2d(c.in_channels, nc[0], 3, padding=1)
        self.m_down1, self.m_up1 = _level(nc[0], nc[1], c)
        self.m_down2, self.m_up2 = _level(nc[1], nc[2], c)
        self.m_down3, self.m_up3 = _level(nc[2], nc[3], c)
        self.m_body_encoder = [ResBlock(nc[3], True) for _ in range(nb)]
        self.m_body_decoder = [ResBlock(nc[3], True) for _ in range(nb)]
        self.m_tail = Conv2d(nc[0], c.out_channels, 3, padding=1)
        # blocks, pooling and flattening (applied in `quality`), the MLP, a sigmoid (likewise)
        mlp = _mlp(QF_WIDTH, QF_WIDTH, QF_WIDTH, 1)[:-1]
        self.qf_pred = [*(ResBlock(nc[3], True) for _ in range(nb)), Placeholder(), Placeholder(), *mlp, Placeholder()]
        self.qf_embed = _mlp(1, QF_WIDTH, QF_WIDTH, QF_WIDTH)
        for level in (1, 2, 3):  # a Linear, then its sigmoid / tanh
            setattr(self, f"to_gamma_{level}", [nn.Linear(QF_WIDTH, nc[level - 1]), Placeholder()])
            setattr(self, f"to_beta_{level}", [nn.Linear(QF_WIDTH, nc[level - 1]), Placeholder()])

    @property
    def dtype(self) -> mx.Dtype:
        return self.m_tail.weight.dtype

    @property
    def input_channels(self) -> int:
        return self.config.in_channels

    size_minimum = 1
    size_multiple = 1  # the network pads itself to MULTIPLE
    a1111_tiling = "grid"  # from models/ESRGAN, A1111 runs it as ESRGAN (`upscale_with_model`, ESRGAN_tile)

    def quality(self, x: mx.array) -> mx.array:
        """The predicted quality factor, (B, 1) in (0, 1), from the bottom level's (B, h, w, 512) features."""
        nb = self.config.nb
        pooled = sequential(self.qf_pred[:nb], x).mean(axis=(1, 2))  # (B, 512)
        return mx.sigmoid(sequential(self.qf_pred[nb + 2 : -1], pooled))

    def __call__(self, x: mx.array, qf: mx.array | None = None) -> mx.array:
        """(B, H, W, C) in [0, 1] -> (B, H, W, out_channels); `qf` (B, 1) replaces the predicted quality factor (the
        original's `qf_input`; spandrel leaves it unset)."""
        _, H, W, _ = x.shape
        x = mx.pad(x, [(0, 0), (0, -H % MULTIPLE), (0, -W % MULTIPLE), (0, 0)], mode="edge")  # ReplicationPad2d
        x1 = self.m_head(x)
        x2 = sequential(self.m_down1, x1)
        x3 = sequential(self.m_down2, x2)
        x4 = sequential(self.m_down3, x3)
        y = sequential(self.m_body_encoder, x4)
        predicted = self.quality(y)
        y = sequential(self.m_body_decoder, y)
        embedding = sequential(self.qf_embed, predicted if qf is None else qf.astype(x.dtype))  # (B, 512)
        y = y + x4
        for level, skip in ((3, x3), (2, x2), (1, x1)):
            gamma = mx.sigmoid(getattr(self, f"to_gamma_{level}")[0](embedding))
            beta = mx.tanh(getattr(self, f"to_beta_{level}")[0](embedding))
            up, *blocks = getattr(self, f"m_up{level}")
            y = sequential(up, y)
            for block in blocks:
                y = block(y, gamma, beta)
            y = y + skip
        return self.m_tail(y)[:, :H, :W]
