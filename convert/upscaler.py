"""Published upscaler files -> a loaded `mlx_sd.model_upscaler.ModelUpscaler`, read at run time like a LoRA.

The ESRGAN family, in every key layout found in A1111's `models/ESRGAN` and `models/RealESRGAN` folders (`.pth`,
`.pt`, `.safetensors`):
- BasicSR / Real-ESRGAN (`conv_first`, `body.N.rdbK.convJ`, `conv_body`, `conv_upI`, `conv_hr`, `conv_last`), the
  weights under `params_ema` (else `params`): RealESRGAN_x4plus, _x4plus_anime_6B, _x2plus (pixel-unshuffled);
- the original ESRGAN layout (`model.0`, `model.1.sub.N.RDBK.convJ.0`, `model.1.sub.NB`, then `model.3`, `model.6`,
  ... for the upsampling convs): ESRGAN_4x and most community models (4x-UltraSharp, Remacri, NMKD, ...), ESRGAN+
  (`conv1x1`) included;
- BSRGAN / RealSR (`RRDB_trunk`, `trunk_conv`, `upconvI`, `HRconv`);
- Real-ESRGAN's compact network (`body.0` conv, `body.1` PReLU, ...): realesr-general-x4v3, realesr-animevideov3;
- SwinIR (`conv_first`, `layers.N.residual_group.blocks.M...`): A1111's "SwinIR 4x" (SwinIR-L, real-world x4) and
  the classical, lightweight and restoration models; its relative-position indices and shift masks are recomputed;
- DAT (`before_RG.1`, `layers.N.blocks.M.attn.attns.K.pos...`): A1111's "DAT x2", "DAT x3", "DAT x4", DAT-S, DAT-2
  and DAT-light; the window size is read from the position-bias offsets (`rpe_biases`, one small tensor), the other
  buffers are recomputed;
- SCUNet (`m_head`, `m_down1.N`, ..., `m_tail`): A1111's "ScuNET" and "ScuNET PSNR" (1x denoisers);
- HAT (`layers.N.residual_group.blocks.M.conv_block.cab...`, `overlap_attn`): Real_HAT_GAN_SRx4, HAT-S/HAT/HAT-L,
  4xNomos8kSCHAT and the other community HAT models A1111 runs from `models/ESRGAN`; the windows are read from the
  bias tables, the position-index buffers recomputed;
- SPAN (`conv_1.sk`, `block_N.cK_r.conv.M`, `conv_cat`, `upsampler.0`): 4xNomos8k_span_otf, ClearReality and the
  other SPAN models; each `Conv3XC`'s 3x3 conv is fused from its 1x1 -> 3x3 -> 1x1 chain and 1x1 skip here, as
  spandrel recomputes it before every call (the stored `eval_conv` copy is not read);
- RealPLKSR and PLKSR (`feats.N.channel_mixer` / `channe_mixer`, `feats.N.lk.conv`): 4xNomos2_realplksr and the
  other PLKSR models with the plain large kernel (the sparse-kernel ablations and DySample heads are refused);
- DRCT (`layers.N.swinK...`, `layers.N.adjustK`): DRCT, DRCT-L and the community DRCT models; heads read per block,
  the position-index and mask buffers recomputed.

The configuration is read from the shapes (width, blocks, growth, upsampling stages; in/out channels give the
unshuffle factor; SwinIR's, DAT's and HAT's head, depths, heads and window), as spandrel decides it, and the file is
mapped strictly. Other architectures (SRFormer, LDSR, GFPGAN, ...) are refused by name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.model_upscaler import ModelUpscaler
from mlx_sd.models.dat import DAT, DATConfig
from mlx_sd.models.drct import DRCT, DRCTConfig
from mlx_sd.models.esrgan import CompactConfig, ESRGANConfig, RRDBNet, SRVGGNetCompact
from mlx_sd.models.hat import HAT, HATConfig
from mlx_sd.models.plksr import PLKSR, PLKSRConfig
from mlx_sd.models.scunet import SCUNet, SCUNetConfig
from mlx_sd.models.span import SPAN, SPANConfig
from mlx_sd.models.swinir import SwinIR, SwinIRConfig

from .keymap import ConversionError, Rule, load_mapped, tensor_shapes
from .readers import open_checkpoint

UPSCALER_EXTENSIONS = (".pth", ".pt", ".safetensors")
# A1111's names for the releases it downloads itself (modules/realesrgan_model.py, SwinIR's swinir_model.py), by file
# name; every other file is listed by its name
A1111_NAMES = {
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN": "SwinIR 4x",
    "DAT_x2": "DAT x2",  # modules/dat_model.py's releases (HF w-e-w/DAT)
    "DAT_x3": "DAT x3",
    "DAT_x4": "DAT x4",
    "scunet_color_real_gan": "ScuNET",  # modules/scunet_model.py's (saved by A1111 as ScuNET.pth)
    "scunet_color_real_psnr": "ScuNET PSNR",
    "RealESRGAN_x4plus": "R-ESRGAN 4x+",
    "RealESRGAN_x4plus_anime_6B": "R-ESRGAN 4x+ Anime6B",
    "RealESRGAN_x2plus": "R-ESRGAN 2x+",
    "realesr-general-x4v3": "R-ESRGAN General 4xV3",
    "realesr-general-wdn-x4v3": "R-ESRGAN General WDN 4xV3",
    "realesr-animevideov3": "R-ESRGAN AnimeVideo",
}
SUPPORTED = "ESRGAN, Real-ESRGAN (RRDBNet and compact), BSRGAN, SwinIR, DAT, ScuNET, HAT, SPAN, PLKSR, DRCT"
SWINIR_KEY = "layers.0.residual_group.blocks.0.attn.relative_position_index"  # HAT has it too, and HAT_KEY
HAT_KEY = "layers.0.residual_group.blocks.0.conv_block.cab.0.weight"
DAT_KEY = "layers.0.blocks.0.attn.attns.0.rpe_biases"
NETWORKS = {ESRGANConfig: RRDBNet, CompactConfig: SRVGGNetCompact, SwinIRConfig: SwinIR, DATConfig: DAT,
            SCUNetConfig: SCUNet, HATConfig: HAT, SPANConfig: SPAN, PLKSRConfig: PLKSR, DRCTConfig: DRCT}  # fmt: skip
FLOAT32_ONLY = (SwinIRConfig, DATConfig, SCUNetConfig, HATConfig, DRCTConfig)  # spandrel: never in half precision
_OTHER_ARCHITECTURES = (  # (a key only that architecture has, its name) for the refusal
    ("conv_after_body.weight", "transformer (SRFormer, ...)"),
    ("model.diffusion_model.input_blocks.0.0.weight", "LDSR (latent diffusion)"),
    ("stylegan_decoder.to_rgb1.weight", "GFPGAN (face restoration)"),
)


def upscaler_name(path: Path) -> str:
    """The name A1111 lists a file under: its own name for the releases it downloads ("R-ESRGAN 4x+", "SwinIR 4x"),
    else the file name."""
    return A1111_NAMES.get(path.stem, path.stem)


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
    config, rules = _config(path, state)
    network = NETWORKS[type(config)](config)
    if isinstance(config, FLOAT32_ONLY) or not getattr(config, "supports_half", True):
        dtype = mx.float32  # as spandrel (so A1111) runs them; ScuNET's -inf masks need it too
    shapes = None
    if isinstance(config, SPANConfig):
        state = _fused_span(state)
        shapes = {key: value.shape for key, value in state.items()}
    load_mapped("upscaler", network, state, rules, dtype or default_dtype(), shapes=shapes)
    return ModelUpscaler(network, name or upscaler_name(path))


def upscaler_listing(path: str | Path) -> dict:
    """A1111's `GET /sdapi/v1/upscalers` entry of a file, its scale read from the shapes (no weight is read; DAT's
    window offsets, a small buffer, are).
    Raises ConversionError as read_upscaler."""
    path = Path(path).expanduser()
    config = _config(path, open_checkpoint(path))[0]
    family = {SwinIRConfig: "SwinIR", DATConfig: "DAT", SCUNetConfig: "ScuNET"}.get(type(config), "ESRGAN")
    if isinstance(config, CompactConfig) or (path.stem in A1111_NAMES and family == "ESRGAN"):
        family = "RealESRGAN"  # A1111's upscaler family for the Real-ESRGAN releases
    return {"name": upscaler_name(path), "model_name": family, "model_path": str(path), "model_url": None,
            "scale": config.scale}  # fmt: skip


def _config(path: Path, state) -> tuple[object, list[Rule]]:
    """The network's configuration and the key map onto its names."""
    stripped = {_strip(key): shape for key, shape in tensor_shapes(state).items()}
    if SWINIR_KEY in stripped and HAT_KEY not in stripped:
        return _swinir_config(stripped)
    if HAT_KEY in stripped:
        return _hat_config(path, stripped)
    if "layers.0.swin1.norm1.weight" in stripped and "layers.0.adjust1.weight" in stripped:
        return _drct_config(path, stripped)
    if "conv_1.sk.weight" in stripped and "block_1.c1_r.sk.weight" in stripped:
        return _span_config(path, stripped)
    if "feats.0.weight" in stripped and "feats.1.refine.weight" in stripped:
        return _plksr_config(path, stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if "m_head.0.weight" in stripped and "m_tail.0.weight" in stripped:
        return _scunet_config(stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if DAT_KEY in stripped:
        offsets = next(state[k] for k in state if _strip(k) == DAT_KEY)
        return _dat_config(stripped, tuple(int(v) + 1 for v in offsets[-1]))
    other = next((name for key, name in _OTHER_ARCHITECTURES if key in stripped), None)
    if other:
        raise ConversionError(f"{path}: a {other} model; mlx-sd runs {SUPPORTED} upscalers")
    if "body.1.weight" in stripped and "conv_first.weight" not in stripped:
        return _compact_config(stripped), [Rule(r"(?:module\.)?(body\.\d+\.(?:weight|bias))", r"\1")]
    if any(k in stripped for k in ("conv_first.weight", "model.0.weight")):
        return _esrgan_config(path, stripped)
    raise ConversionError(f"{path}: {_not_esrgan(stripped)}")


def _strip(key: str) -> str:
    return key.removeprefix("module.")  # DataParallel's wrapper, as spandrel removes it


def _not_esrgan(shapes: dict) -> str:
    keys = ", ".join(list(shapes)[:6])
    return f"not an upscaler mlx-sd runs (keys: {keys}, ...); it runs {SUPPORTED}"


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


def _swinir_config(shapes: dict) -> tuple[SwinIRConfig, list[Rule]]:
    """SwinIR's configuration from its shapes (spandrel's rules) and the map: its own names, the buffers dropped."""
    if "conv_before_upsample.0.weight" in shapes:
        upsampler = "nearest+conv" if "conv_up1.weight" in shapes else "pixelshuffle"
    else:
        upsampler = "pixelshuffledirect" if "upsample.0.weight" in shapes else ""
    first = "conv_first.1.weight" if "conv_first.1.weight" in shapes else "conv_first.weight"
    embed_dim, in_channels = shapes[first][:2]
    unshuffle = round(math.sqrt(in_channels // 3)) if first == "conv_first.1.weight" else 1
    out_channels = shapes["conv_last.weight"][0] if "conv_last.weight" in shapes else in_channels
    if upsampler == "nearest+conv":
        upscale = 2 ** len(_indices(shapes, r"conv_up(\d+)\.weight"))
    elif upsampler == "pixelshuffle":
        convs = _indices(shapes, r"upsample\.(\d+)\.weight")  # one 9x conv for 3x, else one 4x conv per octave
        upscale = 3 if shapes["upsample.0.weight"][0] == 9 * shapes["conv_last.weight"][1] else 2 ** len(convs)
    elif upsampler == "pixelshuffledirect":
        upscale = math.isqrt(shapes["upsample.0.bias"][0] // out_channels)
    else:
        upscale = 1
    window = math.isqrt(shapes[SWINIR_KEY][0])
    layers = _indices(shapes, r"layers\.(\d+)\.residual_group\.blocks\.0\.norm1\.weight")
    depths = tuple(len(_indices(shapes, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
    heads = tuple(shapes[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"][1] for i in layers)
    mask = shapes.get("layers.0.residual_group.blocks.1.attn_mask")
    config = SwinIRConfig(
        in_channels=in_channels // unshuffle**2, out_channels=out_channels, embed_dim=embed_dim, depths=depths,
        num_heads=heads, window_size=window,
        mlp_ratio=shapes["layers.0.residual_group.blocks.0.mlp.fc1.bias"][0] / embed_dim, upsampler=upsampler,
        upscale=upscale, resi_connection="1conv" if "conv_after_body.weight" in shapes else "3conv",
        img_range=255.0 if window == 7 else 1.0,  # the JPEG models (window 7) work in [0, 255], as spandrel assumes
        num_feat=shapes["conv_before_upsample.0.weight"][0] if "conv_before_upsample.0.weight" in shapes else 64,
        start_unshuffle=unshuffle, img_size=round(math.sqrt(mask[0]) * window) if mask else 64,
    )  # fmt: skip
    buffers = "recomputed from the window size and the image (relative_position_index, attn_mask)"
    rules = [
        Rule(r"(?:module\.)?layers\.\d+\.residual_group\.blocks\.\d+\.(?:attn\.relative_position_index|attn_mask)",
             None, buffers),
        Rule(r"(?:module\.)?conv_first\.1\.(weight|bias)", r"conv_first.\1"),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]  # fmt: skip
    return config, rules


def _dat_config(shapes: dict, window: tuple[int, int]) -> tuple[DATConfig, list[Rule]]:
    """DAT's configuration from its shapes and first window (the last position-bias offset + 1), spandrel's rules."""
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = _indices(shapes, r"layers\.(\d+)\.blocks\.0\.norm1\.weight")
    depths = tuple(len(_indices(shapes, rf"layers\.{i}\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
    heads = tuple(
        shapes[f"layers.{i}.blocks.1.attn.temperature"][0] if depth >= 2
        else 2 * shapes[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"][0]
        for i, depth in zip(layers, depths, strict=True)
    )  # fmt: skip
    if "conv_last.weight" in shapes:
        upsampler, upscale, num_feat = "pixelshuffle", 1, 64
        for i in _indices(shapes, r"upsample\.(\d+)\.weight"):
            out, num_feat = shapes[f"upsample.{i}.weight"][:2]
            upscale *= math.isqrt(out // num_feat)
    else:
        upsampler, num_feat = "pixelshuffledirect", 64
        upscale = math.isqrt(shapes["upsample.0.weight"][0] // in_channels)
    config = DATConfig(
        in_channels=in_channels, embed_dim=embed_dim, split_size=window, depths=depths, num_heads=heads,
        expansion_factor=shapes["layers.0.blocks.0.ffn.fc1.weight"][0] / embed_dim,
        qkv_bias="layers.0.blocks.0.attn.qkv.bias" in shapes, upscale=upscale,
        resi_connection="1conv" if "conv_after_body.weight" in shapes else "3conv", upsampler=upsampler,
        num_feat=num_feat,
    )  # fmt: skip
    buffers = "recomputed from the window size and the image (rpe_biases, relative_position_index, attn_mask_N)"
    rules = [
        Rule(r"(?:module\.)?layers\.\d+\.blocks\.\d+\.attn\.(?:attns\.\d\.(?:rpe_biases|relative_position_index)"
             r"|attn_mask_\d)", None, buffers),
        Rule(r"(?:module\.)?.+\.num_batches_tracked", None, "BatchNorm's training counter"),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]  # fmt: skip
    return config, rules


def _scunet_config(shapes: dict) -> SCUNetConfig:
    """SCUNet's width and blocks per level (the down stages end in their strided conv, the up stages start with
    their transposed one), as spandrel reads them."""
    dim, in_channels = shapes["m_head.0.weight"][:2]
    count = {name: len(_indices(shapes, rf"{name}\.(\d+)\..+")) for name in
             ("m_down1", "m_down2", "m_down3", "m_body", "m_up3", "m_up2", "m_up1")}  # fmt: skip
    blocks = tuple(n if name == "m_body" else n - 1 for name, n in count.items())
    return SCUNetConfig(in_channels=in_channels, dim=dim, config=blocks)


def _hat_config(path: Path, shapes: dict) -> tuple[HATConfig, list[Rule]]:
    """HAT's configuration from its shapes (spandrel's rules; the windows from the bias tables: (2 window - 1)^2 and
    (window + overlap - 1)^2 rows) and the map: its own names, the position-index buffers dropped."""
    if "absolute_pos_embed" in shapes:
        raise ConversionError(f"{path}: a HAT with an absolute position embedding, which runs only at its training "
                              "size; mlx-sd runs HAT models without one (all published ones)")  # fmt: skip
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    num_feat = shapes["conv_last.weight"][1]
    block = "layers.{}.residual_group.blocks.{}."
    layers = _indices(shapes, r"layers\.(\d+)\.residual_group\.blocks\.0\.norm1\.weight")
    depths = tuple(len(_indices(shapes, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
    heads = tuple(shapes[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"][1] for i in layers)
    window = (math.isqrt(shapes[block.format(0, 0) + "attn.relative_position_bias_table"][0]) + 1) // 2
    overlap = math.isqrt(shapes["layers.0.residual_group.overlap_attn.relative_position_bias_table"][0]) - window + 1
    if (overlap - window) % 2:
        raise ConversionError(f"{path}: a HAT whose overlapping windows ({overlap}) exceed its windows ({window}) by "
                              "an odd count, which the original cannot run either")  # fmt: skip
    convs = _indices(shapes, r"upsample\.(\d+)\.weight")  # one 9x conv for 3x, else one 4x conv per octave
    upscale = 3 if convs and shapes["upsample.0.weight"][0] == 9 * num_feat else 2 ** len(convs)  # 1x: none
    config = HATConfig(
        in_channels=in_channels, embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
        overlap_window=overlap, conv_channels=shapes[block.format(0, 0) + "conv_block.cab.0.weight"][0],
        squeeze_channels=shapes[block.format(0, 0) + "conv_block.cab.3.attention.1.weight"][0],
        mlp_ratio=shapes[block.format(0, 0) + "mlp.fc1.weight"][0] / embed_dim,
        qkv_bias=block.format(0, 0) + "attn.qkv.bias" in shapes, patch_norm="patch_embed.norm.weight" in shapes,
        upscale=upscale, resi_connection="1conv" if "conv_after_body.weight" in shapes else "identity",
        num_feat=num_feat,
    )  # fmt: skip
    buffers = "recomputed from the window sizes (relative_position_index_SA, relative_position_index_OCA)"
    rules = [Rule(r"(?:module\.)?relative_position_index_(?:SA|OCA)", None, buffers), Rule(r"(?:module\.)?(.+)", r"\1")]
    return config, rules


def _span_config(path: Path, shapes: dict) -> tuple[SPANConfig, list[Rule]]:
    """SPAN's configuration (spandrel's rules: the upsampler's channels are out x scale^2, out = in where it can
    be) and the map onto the fused convs `_fused_span` makes."""
    features, in_channels = shapes["conv_1.sk.weight"][:2]
    shuffled = shapes["upsampler.0.weight"][0]
    fits = [c for c in (in_channels, 3, 4, 1) if shuffled % c == 0 and math.isqrt(shuffled // c) ** 2 * c == shuffled]
    if not fits:
        raise ConversionError(f"{path}: a SPAN whose last conv makes {shuffled} channels, no pixel shuffle of 1, 3 "
                              "or 4 channels")  # fmt: skip
    out_channels = fits[0]
    upscale = math.isqrt(shuffled // out_channels)
    norm = "no_norm" not in shapes
    if norm and in_channels != 3:
        raise ConversionError(f"{path}: a {in_channels}-channel SPAN that normalises by the RGB mean, which the "
                              "original cannot run either")  # fmt: skip
    config = SPANConfig(in_channels=in_channels, out_channels=out_channels, feature_channels=features,
                        upscale=upscale, norm=norm)  # fmt: skip
    return config, [Rule(r"no_norm", None, "a flag (SPANConfig.norm)"), Rule(r"(.+)", r"\1")]


def _fused_span(state) -> dict:
    """SPAN's tensors (prefix "module." removed) with every Conv3XC as spandrel runs it: its `eval_conv` (3x3) fused
    from the 1x1 -> 3x3 -> 1x1 chain `conv.0-2` plus the 1x1 skip `sk` (`Conv3XC.update_params`, in float64); the
    chain, the skip and the stored eval_conv copy left out."""
    tensors = {_strip(key): np.asarray(state[key]) for key in state}
    out = {}
    for key, value in tensors.items():
        prefix, _, name = key.rpartition(".sk.")
        if name == "weight":
            t = {n: tensors[f"{prefix}.{n}"].astype(np.float64) for n in
                 ("conv.0.weight", "conv.0.bias", "conv.1.weight", "conv.1.bias", "conv.2.weight", "conv.2.bias",
                  "sk.weight", "sk.bias")}  # fmt: skip
            first, last = t["conv.0.weight"][:, :, 0, 0], t["conv.2.weight"][:, :, 0, 0]
            weight = np.einsum("op,pmyx,mi->oiyx", last, t["conv.1.weight"], first)
            middle = np.einsum("pmyx,m->p", t["conv.1.weight"], t["conv.0.bias"]) + t["conv.1.bias"]
            weight[:, :, 1, 1] += t["sk.weight"][:, :, 0, 0]
            out[f"{prefix}.eval_conv.weight"] = weight.astype(np.float32)
            out[f"{prefix}.eval_conv.bias"] = (last @ middle + t["conv.2.bias"] + t["sk.bias"]).astype(np.float32)
        elif not re.search(r"\.(conv\.\d|sk|eval_conv)\.(weight|bias)$", key):
            out[key] = value
    return out


def _plksr_config(path: Path, shapes: dict) -> PLKSRConfig:
    """(Real)PLKSR's configuration from its shapes, as spandrel reads it (RealPLKSR spells `channel_mixer`, PLKSR
    `channe_mixer`; RealPLKSR's `feats` hold a parameter-free dropout before the last conv)."""
    for key, what in (("feats.1.lk.convs.0.weight", "sparse large kernels"), ("feats.1.lk.mn_conv.weight",
                      "rectangular sparse large kernels"), ("to_img.init_pos", "a DySample head")):  # fmt: skip
        if key in shapes:
            raise ConversionError(f"{path}: a PLKSR with {what}, which mlx-sd does not run (it runs the published "
                                  "PLKSR and RealPLKSR models: plain large kernels, pixel-shuffle heads)")  # fmt: skip
    real = "feats.1.channel_mixer.0.weight" in shapes
    mixer = "feats.1.channel_mixer." if real else "feats.1.channe_mixer."
    kinds = {(3, 3): "DCCM", (3, 1): "CCM", (1, 3): "ICCM"}
    mixer_kind = kinds.get((shapes[mixer + "0.weight"][2], shapes[mixer + "2.weight"][2]))
    if mixer_kind is None or (real and mixer_kind != "DCCM"):
        raise ConversionError(f"{path}: a PLKSR channel mixer of kernels {shapes[mixer + '0.weight'][2:]} and "
                              f"{shapes[mixer + '2.weight'][2:]}, not one the architecture has")  # fmt: skip
    last = max(_indices(shapes, r"feats\.(\d+)\.weight"))
    large = shapes["feats.1.lk.conv.weight"]
    return PLKSRConfig(
        dim=shapes["feats.0.weight"][0], n_blocks=last - (2 if real else 1),
        upscale=math.isqrt(shapes[f"feats.{last}.weight"][0] // 3), kernel_size=large[2], partial=large[0], real=real,
        mixer=mixer_kind, use_ea="feats.1.attn.f.0.weight" in shapes, layer_norm="feats.1.layer_norm.bias" in shapes,
    )  # fmt: skip


def _drct_config(path: Path, shapes: dict) -> tuple[DRCTConfig, list[Rule]]:
    """DRCT's configuration (spandrel's rules: the window from the bias table's (2 window - 1)^2 rows, the training
    size from a shifted block's mask, heads per block) and the map: its own names, the buffers dropped."""
    if "conv_last.weight" not in shapes:
        raise ConversionError(f"{path}: a DRCT without an upsampler, whose forward returns its input unchanged")
    if "layers.0.swin1.attn.qkv.bias" not in shapes or "absolute_pos_embed" in shapes:
        raise ConversionError(f"{path}: a DRCT without qkv biases or with an absolute position embedding, which "
                              "mlx-sd does not run (no published model has either)")  # fmt: skip
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = _indices(shapes, r"layers\.(\d+)\.swin1\.norm1\.weight")
    heads = tuple(tuple(shapes[f"layers.{i}.swin{k}.attn.relative_position_bias_table"][1] for k in range(1, 6))
                  for i in layers)  # fmt: skip
    window = (math.isqrt(shapes["layers.0.swin1.attn.relative_position_bias_table"][0]) + 1) // 2
    mask = shapes.get("layers.0.swin2.attn_mask")
    num_feat = shapes["conv_last.weight"][1]
    convs = _indices(shapes, r"upsample\.(\d+)\.weight")  # one 9x conv for 3x, else one 4x conv per octave
    config = DRCTConfig(
        in_channels=in_channels, embed_dim=embed_dim, num_heads=heads, window_size=window,
        mlp_ratio=shapes["layers.0.swin1.mlp.fc1.weight"][0] / embed_dim, gc=shapes["layers.0.adjust1.weight"][0],
        upscale=3 if convs and shapes["upsample.0.weight"][0] == 9 * num_feat else 2 ** len(convs),
        resi_connection="1conv" if "conv_after_body.weight" in shapes else "identity",
        patch_norm="patch_embed.norm.weight" in shapes, num_feat=num_feat,
        img_size=math.isqrt(mask[0]) * window if mask else window,
    )  # fmt: skip
    buffers = "recomputed from the window size and the image (relative_position_index, attn_mask)"
    rules = [
        Rule(r"(?:module\.)?layers\.\d+\.swin\d\.(?:attn\.relative_position_index|attn_mask)", None, buffers),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]
    return config, rules
