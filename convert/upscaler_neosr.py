"""The configurations of neosr's networks that record their upsampler in the file (`MetaUpsample`: version, method,
scale, input, output and middle channels, DySample groups): MoESR and FDAT, read as spandrel reads them, with each
one's key map. Used by `mlx_sd_convert.upscaler`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mlx_sd.models.fdat import PATTERN, FDATConfig
from mlx_sd.models.moesr import MoESRConfig
from mlx_sd.models.uniupsample import METHODS

from .keymap import ConversionError, Rule
from .upscaler_transformers import indices

FDAT_KEY = "groups.0.blocks.0.inter.cg.1.weight"
MOESR_KEY = "blocks.0.blocks.0.conv.dwconv_hw.weight"
MOESR_METHODS = METHODS[:5]  # MoESR's own list: the first five


def _meta(path: Path, record: np.ndarray, methods: tuple[str, ...]) -> tuple[str, int, int, int, int]:
    """(method, scale, input channels, output channels, middle channels) from a MetaUpsample record."""
    _, index, scale, dim, out, mid, _ = (int(v) for v in np.asarray(record).reshape(-1))
    if index >= len(methods) or methods[index] == "lda":
        name = METHODS[index] if index < len(METHODS) else f"number {index}"
        raise ConversionError(f"{path}: an upsampler mlx-sd does not run ({name}); it runs "
                              f"{', '.join(m for m in methods if m != 'lda')}")  # fmt: skip
    return methods[index], scale, dim, out, mid


def _rules(head: str) -> list[Rule]:
    return [
        Rule(rf"{head}\.MetaUpsample", None, "the upsampler's record (read into the configuration)"),
        Rule(rf"{head}\.\d+\.init_pos", None, "recomputed from the scale (DySample's grid)"),
        Rule(r"(.+)", r"\1"),
    ]


def fdat_config(path: Path, shapes: dict, record: np.ndarray) -> tuple[FDATConfig, list[Rule]]:
    """FDAT's configuration from its shapes and upsampler record (spandrel's rules: the "unshuffle" models' first
    conv takes 4 // scale squared times the channels and the network runs 4x; the width is the first conv's, where
    spandrel takes the record's, which "pa_up" heads overwrite with their middle width)."""
    method, scale, _, out, mid = _meta(path, record, METHODS)
    unshuffle = 1
    if "conv_first.1.weight" in shapes:
        (dim, shuffled), in_channels, scale = shapes["conv_first.1.weight"][:2], out, 4
        unshuffle = math.isqrt(shuffled // out)
    else:
        dim, in_channels = shapes["conv_first.weight"][:2]  # (the record's input width is mid's for "pa_up")
    bias = shapes["groups.0.blocks.0.attn.bias"]
    blocks = len(indices(shapes, r"groups\.0\.blocks\.(\d+)\.n1\.weight")) // len(PATTERN) * len(PATTERN)
    config = FDATConfig(
        in_channels=in_channels, out_channels=out, embed_dim=dim,
        num_groups=len(indices(shapes, r"groups\.(\d+)\.conv\.weight")), blocks=blocks, num_heads=bias[0],
        window_size=math.isqrt(bias[2]), hidden=int(dim * float(shapes["groups.0.blocks.0.ffn.fc1.weight"][0] / dim)),
        gate_channels=dim // (dim // shapes[FDAT_KEY][0]), upsampler=method, upscale=scale, mid_dim=mid,
        unshuffle=unshuffle,
    )  # fmt: skip
    return config, _rules("upsampler")


def moesr_config(path: Path, shapes: dict, record: np.ndarray) -> tuple[MoESRConfig, list[Rule]]:
    """MoESR's configuration from its shapes and upsampler record, as spandrel reads it."""
    method, scale, _, out, mid = _meta(path, record, MOESR_METHODS)
    dim, in_channels = shapes["in_to_dim.weight"][:2]
    hidden, msg = (int(dim * (shapes[k][0] / shapes[k][1] / 2)) for k in
                   ("blocks.0.blocks.0.fc1.weight", "blocks.0.msg.gated.0.fc1.weight"))  # fmt: skip
    config = MoESRConfig(
        in_channels=in_channels, out_channels=out, dim=dim, n_blocks=len(indices(shapes, r"blocks\.(\d+)\.msg\..+")),
        n_block=len(indices(shapes, r"blocks\.0\.blocks\.(\d+)\.gamma")), hidden=hidden, msg_hidden=msg,
        upsampler=method, upscale=1 if method == "conv" else scale, upsample_dim=mid,
    )  # fmt: skip
    return config, _rules("upscale")
