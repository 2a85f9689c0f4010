"""The configurations of spandrel's 1x restoration networks: KAIR's FBCNN, DRUNet and DnCNN / FDnCNN, and megvii's
NAFNet, each recognised by the keys spandrel's detection asks for and read from the shapes as spandrel reads it
(`spandrel/architectures/<arch>/__init__.py`), with its key map. Used by `mlx_sd_convert.upscaler`.
"""

from __future__ import annotations

from pathlib import Path

from mlx_sd.models.dncnn import DnCNNConfig
from mlx_sd.models.drunet import DRUNetConfig
from mlx_sd.models.fbcnn import QF_WIDTH, FBCNNConfig
from mlx_sd.models.nafnet import NAFNetConfig

from .keymap import ConversionError, Rule

# spandrel's detection: every key of one of the lists
FBCNN_KEYS = ("m_head.weight", "m_down1.0.res.0.weight", "m_down2.0.res.0.weight", "m_body_encoder.0.res.0.weight",
              "m_tail.weight", "qf_pred.0.res.0.weight")  # fmt: skip
DRUNET_KEYS = ("m_head.weight", "m_down1.0.res.0.weight", "m_down1.0.res.2.weight", "m_down2.0.res.0.weight",
               "m_down3.0.res.0.weight", "m_body.0.res.0.weight", "m_body.0.res.2.weight", "m_up3.2.res.0.weight",
               "m_up3.2.res.2.weight", "m_up2.2.res.0.weight", "m_up1.2.res.0.weight", "m_tail.weight")  # fmt: skip
NAFNET_KEYS = ("intro.weight", "ending.weight", "ups.0.0.weight", "downs.0.weight", *(
    f"middle_blks.0.{name}" for name in ("beta", "gamma", "conv1.weight", "conv2.weight", "conv3.weight",
                                         "sca.1.weight", "conv4.weight", "conv5.weight", "norm1.weight",
                                         "norm2.weight")
), "encoders.0.0.beta", "encoders.0.0.gamma", "decoders.0.0.beta", "decoders.0.0.gamma")  # fmt: skip
_DNCNN_HEAD = ("model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias")
DNCNN_KEYS = (  # act_mode "R" (convs at even indices) or "BR" (BatchNorm after the middle convs)
    (*_DNCNN_HEAD, *(f"model.{i}.{kind}" for i in (4, 6, 8, 10, 12, 14) for kind in ("weight", "bias"))),
    (*_DNCNN_HEAD, *(f"model.{i}.{kind}" for i in (3, 6) for kind in ("weight", "bias", "running_mean", "running_var")),
     "model.5.weight", "model.5.bias", "model.8.weight", "model.8.bias"),
)  # fmt: skip
PLAIN = [Rule(r"(?:module\.)?(.+)", r"\1")]


def seq_len(shapes: dict, prefix: str) -> int:
    """spandrel's `get_seq_len`: one more than the largest index N of a `prefix.N...` key (0 without one)."""
    found = [int(k[len(prefix) + 1 :].split(".", 1)[0]) for k in shapes if k.startswith(prefix + ".")]
    return max(found) + 1 if found else 0


def _downsample(shapes: dict, nb: int) -> str:
    """KAIR's downsampling from the file: a strided conv ends `m_down1` at index nb, else the pooling there and its
    conv after (average or max pooling, which no shape tells: spandrel reads it as average)."""
    return "strideconv" if f"m_down1.{nb}.weight" in shapes else "avgpool"


def fbcnn_config(path: Path, shapes: dict) -> tuple[FBCNNConfig, list[Rule]]:
    """FBCNN's configuration, as spandrel reads it: the levels' widths from their first convs, the upsampling from
    how the original's ModuleList holds it (`m_up3.0` a transposed conv, `.0.1` nearest + conv, `.0.0` conv +
    shuffle)."""
    nb = seq_len(shapes, "m_body_encoder")
    nc = (shapes["m_head.weight"][0], shapes["m_down2.0.res.0.weight"][0], shapes["m_down3.0.res.0.weight"][0],
          shapes["m_body_encoder.0.res.0.weight"][0])  # fmt: skip
    if nc[3] != QF_WIDTH:
        raise ConversionError(f"{path}: an FBCNN whose last level has {nc[3]} channels; the original's quality-factor "
                              f"predictor takes {QF_WIDTH} (it cannot run this file either)")  # fmt: skip
    modes = {"m_up3.0.weight": "convtranspose", "m_up3.0.1.weight": "upconv", "m_up3.0.0.weight": "pixelshuffle"}
    upsample = next((mode for key, mode in modes.items() if key in shapes), None)
    if upsample is None:
        raise ConversionError(f"{path}: an FBCNN without an upsampling layer at m_up3.0 (nor can spandrel read it)")
    config = FBCNNConfig(in_channels=shapes["m_head.weight"][1], out_channels=shapes["m_tail.weight"][0], nc=nc,
                         nb=nb, downsample=_downsample(shapes, nb), upsample=upsample)  # fmt: skip
    return config, PLAIN


def drunet_config(path: Path, shapes: dict) -> tuple[DRUNetConfig, list[Rule]]:
    """DRUNet's configuration, as spandrel reads it (its first conv takes the image and the noise map)."""
    nb = seq_len(shapes, "m_body")
    nc = (shapes["m_head.weight"][0], shapes["m_down2.0.res.0.weight"][0], shapes["m_down3.0.res.0.weight"][0],
          shapes["m_body.0.res.0.weight"][0])  # fmt: skip
    if "m_up3.1.weight" in shapes:
        upsample = "upconv"  # nearest at m_up3.0, the conv at .1
    elif shapes["m_up3.0.weight"][2] == 3:
        upsample = "pixelshuffle"  # a 3x3 conv, then the shuffle
    else:
        upsample = "convtranspose"
    in_channels = shapes["m_head.weight"][1] - 1
    if in_channels < 1:
        raise ConversionError(f"{path}: a DRUNet whose first conv takes one channel, with no room for its noise map")
    config = DRUNetConfig(in_channels=in_channels, out_channels=shapes["m_tail.weight"][0], nc=nc, nb=nb,
                          downsample=_downsample(shapes, nb), upsample=upsample)  # fmt: skip
    return config, PLAIN


def dncnn_config(shapes: dict) -> tuple[DnCNNConfig, list[Rule]]:
    """DnCNN's configuration, as spandrel reads it: BatchNorm layers ("BR") when `model.3` holds weights, the number
    of convs from the sequence's length, FDnCNN where the output has fewer channels than the input (the noise map)."""
    layers = seq_len(shapes, "model")
    nc, in_channels = shapes["model.0.weight"][:2]
    out_channels = shapes[f"model.{layers - 1}.weight"][0]
    batch_norm = "model.3.weight" in shapes
    nb = (layers - 3) // 3 + 2 if batch_norm else (layers - 3) // 2 + 2
    flexible = in_channels != out_channels
    config = DnCNNConfig(in_channels=in_channels - flexible, out_channels=out_channels, nc=nc, nb=nb,
                         batch_norm=batch_norm, flexible=flexible)  # fmt: skip
    return config, [Rule(r"(?:module\.)?.+\.num_batches_tracked", None, "BatchNorm's training counter"), *PLAIN]


def nafnet_config(shapes: dict) -> tuple[NAFNetConfig, list[Rule]]:
    """NAFNet's configuration, as spandrel reads it: the blocks per level from the sequences' lengths."""
    config = NAFNetConfig(
        img_channel=shapes["intro.weight"][1], width=shapes["intro.weight"][0],
        middle_blk_num=seq_len(shapes, "middle_blks"),
        enc_blk_nums=tuple(seq_len(shapes, f"encoders.{i}") for i in range(seq_len(shapes, "encoders"))),
        dec_blk_nums=tuple(seq_len(shapes, f"decoders.{i}") for i in range(seq_len(shapes, "decoders"))),
    )  # fmt: skip
    return config, PLAIN
