"""big-lama files -> a loaded `mlx_sd.models.lama.LaMa`, read at run time like an upscaler.

The layouts spandrel detects (`spandrel/architectures/LaMa/__init__.py`): the generator's `nn.Sequential` as
`model.model.N...` (spandrel's, the big-lama.pt ComfyUI and chaiNNer list) or as `generator.model.N...` (the
training module's: the original `best.ckpt` and A1111's ControlNet extension's `models/lama/ControlNetLama.pth`,
under `state_dict`, which the reader unwraps). The input and output channels are read from the shapes as spandrel
reads them; everything else is big-lama's fixed configuration, checked key by key and shape by shape. The training
checkpoint's discriminator and loss networks are dropped by name.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from mlx_sd.models.lama import LaMa, LaMaConfig

from .keymap import ConversionError, Rule, load_mapped, tensor_shapes
from .readers import open_checkpoint
from .upscaler_restoration import seq_len

DETECT_KEYS = ("model.model.1.bn_l.running_mean", "generator.model.1.bn_l.running_mean")  # spandrel's detection
RULES = [
    Rule(r"(?:generator|model)\.model\.\d+\.(?:.+\.)?num_batches_tracked", None, "BatchNorm's training counter"),
    Rule(
        r"(?:discriminator|loss_\w+|val_evaluator|test_evaluator)\..+",
        None,
        "the training module's discriminator, loss networks and evaluators (not the generator)",
    ),  # fmt: skip
    Rule(r"(?:generator|model)\.model\.(.+)", r"model.model.\1"),
]


def lama_config(path: Path, shapes: dict) -> LaMaConfig:
    """The configuration spandrel builds: in_nc from the first conv, out_nc from the last layer."""
    shapes = {key.replace("generator.model", "model.model", 1): shape for key, shape in shapes.items()}
    if not any(key in shapes for key in DETECT_KEYS):
        keys = ", ".join(list(shapes)[:6])
        raise ConversionError(f"{path}: not a LaMa generator (keys: {keys}, ...); expected {DETECT_KEYS[0]}")
    last = seq_len(shapes, "model.model") - 1
    return LaMaConfig(
        in_channels=shapes["model.model.1.ffc.convl2l.weight"][1],
        out_channels=shapes[f"model.model.{last}.weight"][0],
    )


def read_lama(path: str | Path) -> LaMa:
    """Read a big-lama file (module docstring) into float32 (LaMa does not run in float16, as spandrel says).

    Raises:
        ConversionError naming the file and the keys or shapes that do not fit.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path}: no such LaMa file")
    state = open_checkpoint(path)
    network = LaMa(lama_config(path, tensor_shapes(state)))
    return load_mapped("lama", network, state, RULES, mx.float32)
