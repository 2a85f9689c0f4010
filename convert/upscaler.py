"""Published upscaler files -> a loaded `mlx_sd.model_upscaler.ModelUpscaler`, read at run time like a LoRA.

The ESRGAN family, in every key layout found in A1111's `models/ESRGAN` and `models/RealESRGAN` folders (`.pth`,
`.pt`, `.safetensors`):
- BasicSR / Real-ESRGAN (`conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upI`, `conv_hr`, `conv_last`), the
  weights under `params_ema` (else `params`): RealESRGAN_x4plus, _x4plus_anime_6B, _x2plus (pixel-unshuffled);
- the original ESRGAN layout (`model.0`, `model.1.sub.N.RDBK.convJ.0`, `model.1.sub.NB`, then `model.3`, `model.6`,
  ... for the upsampling convs): ESRGAN_4x and most community models (4x-UltraSharp, Remacri, NMKD, ...), ESRGAN+
  (`conv1x1`) included;
- BSRGAN / RealSR (`RRDB_trunk`, `trunk_conv`, `upconvI`, `HRconv`);
- Real-ESRGAN's compact network (`body.0` conv, `body.1` PReLU, ...): realesr-general-x4v3, realesr-animevideov3.

The configuration is read from the shapes (width, blocks, growth, upsampling stages; in/out channels give the
unshuffle factor, as spandrel decides it), and the file is mapped strictly. Other architectures (SwinIR, DAT, HAT,
LDSR, ScuNET, ...) are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx

from mlx_sd.model_upscaler import ModelUpscaler
from mlx_sd.models.esrgan import CompactConfig, ESRGANConfig, RRDBNet, SRVGGNetCompact

from .keymap import ConversionError, Rule, load_mapped, tensor_shapes
from .readers import open_checkpoint

UPSCALER_EXTENSIONS = (".pth", ".pt", ".safetensors")
# A1111's names for the Real-ESRGAN releases (modules/realesrgan_model.py), by file name
REAL_ESRGAN_NAMES = {
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
}
SUPPORTED = "ESRGAN, Real-ESRGAN (RRDBNet and compact), BSRGAN"
_OTHER_ARCHITECTURES = (  # (a key only that architecture has, its name) for the refusal
    ("conv_after_body.weight", "SwinIR/HAT/DAT-style transformer"),
    ("model.diffusion_model.input_blocks.0.0.weight", "LDSR (latent diffusion)"),
    ("m_head.0.weight", "ScuNET"),
    ("stylegan_decoder.to_rgb1.weight", "GFPGAN (face restoration)"),
)


def upscaler_name(path: Path) -> str:
    """The name A1111 lists a file under: its Real-ESRGAN name for the official releases, else the file name."""
    return REAL_ESRGAN_NAMES.get(path.stem, path.stem)


def read_upscaler(path: str | Path, dtype: mx.Dtype | None = None, name: str | None = None) -> ModelUpscaler:
    """Read an upscaler file (module docstring) into a `ModelUpscaler` named `name` (default: `upscaler_name`).

    Raises:
        ConversionError naming the file and what does not fit (or the architecture that is not supported).
    """
    from mlx_sd.backend import default_dtype

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"{path}: no such upscaler file")
    state = open_checkpoint(path)
    config, rules = _config(path, tensor_shapes(state))
    network = SRVGGNetCompact(config) if isinstance(config, CompactConfig) else RRDBNet(config)
    load_mapped("upscaler", network, state, rules, dtype or default_dtype())
    return ModelUpscaler(network, name or upscaler_name(path))


def upscaler_scale(path: str | Path) -> int:
    """The scale of an upscaler file, from its shapes (no tensor is read). Raises ConversionError as read_upscaler."""
    path = Path(path).expanduser()
    return _config(path, tensor_shapes(open_checkpoint(path)))[0].scale


def _config(path: Path, shapes: dict) -> tuple[ESRGANConfig | CompactConfig, list[Rule]]:
    """The network's configuration and the key map onto its names."""
    stripped = {_strip(key): shape for key, shape in shapes.items()}
    other = next((name for key, name in _OTHER_ARCHITECTURES if key in stripped), None)
    if other:
        raise ConversionError(f"{path}: a {other} model; mlx-sd runs ESRGAN-family upscalers ({SUPPORTED})")
    if "body.1.weight" in stripped and "conv_first.weight" not in stripped:
        return _compact_config(stripped), [Rule(r"(?:module\.)?(body\.\d+\.(?:weight|bias))", r"\1")]
    if any(k in stripped for k in ("conv_first.weight", "model.0.weight")):
        return _esrgan_config(path, stripped)
    raise ConversionError(f"{path}: {_not_esrgan(stripped)}")


def _strip(key: str) -> str:
    return key.removeprefix("module.")  # DataParallel's wrapper, as spandrel removes it


def _not_esrgan(shapes: dict) -> str:
    keys = ", ".join(list(shapes)[:6])
    return f"not an ESRGAN-family upscaler (keys: {keys}, ...); mlx-sd runs {SUPPORTED}"


def _indices(shapes: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.fullmatch(k))})


def _esrgan_config(path: Path, shapes: dict) -> tuple[ESRGANConfig, list[Rule]]:
    """The RRDBNet configuration and the key map onto its (BasicSR) names, for all three layouts."""
    prefix = r"(?:module\.)?"
    if "model.0.weight" in shapes:  # original ESRGAN: a flat nn.Sequential
        blocks = _indices(shapes, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
        last = max(_indices(shapes, r"model\.(\d+)\.weight"))
        upsamples = (last + 1 - 5) // 3  # conv, trunk, (upsample, conv, act) per stage, conv, act, conv
        first, out, rdb = "model.0.weight", f"model.{last}.weight", "model.1.sub.N.RDBk"
        rules = [
            Rule(prefix + r"model\.0\.(weight|bias)", r"conv_first.\1"),
            Rule(prefix + r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", r"body.\1.rdb\2.conv\3.\4"),
            Rule(prefix + r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv1x1\.weight", r"body.\1.rdb\2.conv1x1.weight"),
            Rule(prefix + rf"model\.1\.sub\.{len(blocks)}\.(weight|bias)", r"conv_body.\1"),
            *(Rule(prefix + rf"model\.{3 * (i + 1)}\.(weight|bias)", rf"conv_up{i + 1}.\1") for i in range(upsamples)),
            Rule(prefix + rf"model\.{3 * upsamples + 2}\.(weight|bias)", r"conv_hr.\1"),
            Rule(prefix + rf"model\.{last}\.(weight|bias)", r"conv_last.\1"),
        ]
    else:  # BasicSR (Real-ESRGAN) or BSRGAN names
        blocks = _indices(shapes, r"(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)1\.conv1\.weight")
        upsamples = len(_indices(shapes, r"(?:conv_up|upconv)(\d+)\.weight"))
        first, out, rdb = "conv_first.weight", "conv_last.weight", "body.N.rdbk"
        rules = [
            Rule(prefix + r"(conv_first|conv_last)\.(weight|bias)", r"\1.\2"),
            Rule(prefix + r"(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)(\d)\.(conv\d|conv1x1)\.(weight|bias)",
                 r"body.\1.rdb\2.\3.\4"),
            Rule(prefix + r"(?:conv_body|trunk_conv)\.(weight|bias)", r"conv_body.\1"),
            Rule(prefix + r"(?:conv_up|upconv)(\d+)\.(weight|bias)", r"conv_up\1.\2"),
            Rule(prefix + r"(?:conv_hr|HRconv)\.(weight|bias)", r"conv_hr.\1"),
        ]  # fmt: skip
    if not blocks:
        raise ConversionError(f"{path}: an ESRGAN-style file without residual dense blocks (no {rdb}... keys)")
    num_feat, in_channels = shapes[first][:2]
    out_channels = shapes[out][0]
    growth = shapes[next(k for k in shapes if re.search(r"\.(?:rdb|RDB)1\.conv1\.(?:0\.)?weight$", k))][0]
    # Real-ESRGAN's 2x and 1x models pixel-unshuffle the image: 4x or 16x the channels in (spandrel's rule)
    shuffle = math.isqrt(in_channels // out_channels) if in_channels in (4 * out_channels, 16 * out_channels) else 1
    config = ESRGANConfig(
        in_channels=in_channels // shuffle**2, out_channels=out_channels, num_feat=num_feat, num_blocks=len(blocks),
        growth=growth, upsamples=upsamples, shuffle=shuffle, plus=any("conv1x1" in k for k in shapes),
    )  # fmt: skip
    return config, rules


def _compact_config(shapes: dict) -> CompactConfig:
    last = max(_indices(shapes, r"body\.(\d+)\.weight"))
    num_feat, in_channels = shapes["body.0.weight"][:2]
    # the last conv makes out * scale^2 channels, which the pixel shuffle turns into scale x the size; the nearest-
    # upsampled input is added, so out = in
    scale = math.isqrt(shapes[f"body.{last}.weight"][0] // in_channels)
    return CompactConfig(in_channels=in_channels, out_channels=in_channels, num_feat=num_feat,
                         num_conv=(last - 2) // 2, scale=scale)  # fmt: skip
