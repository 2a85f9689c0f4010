"""The transformer upscalers' configurations, read from a file's tensor shapes as spandrel reads them (SwinIR,
Swin2SR, DAT, RGT, HAT, DRCT, ATD, SRFormer, CRAFT), with each one's key map: their own names, the buffers the networks
recompute dropped. Used by `mlx_sd_convert.upscaler`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from mlx_sd.models.atd import ATDConfig
from mlx_sd.models.craft import CRAFTConfig
from mlx_sd.models.dat import DATConfig
from mlx_sd.models.drct import DRCTConfig
from mlx_sd.models.hat import HATConfig
from mlx_sd.models.rgt import RGTConfig
from mlx_sd.models.srformer import SRFormerConfig
from mlx_sd.models.swin2sr import Swin2SRConfig
from mlx_sd.models.swinir import SwinIRConfig

from .keymap import ConversionError, Rule

SWINIR_KEY = "layers.0.residual_group.blocks.0.attn.relative_position_index"  # HAT has it too, and HAT_KEY
HAT_KEY = "layers.0.residual_group.blocks.0.conv_block.cab.0.weight"
DAT_KEY = "layers.0.blocks.0.attn.attns.0.rpe_biases"  # RGT has it too, and RGT_KEY
RGT_KEY = "layers.0.blocks.0.gamma"
ATD_KEY = "layers.0.residual_group.td"  # the token dictionary
SWIN2SR_KEY = "layers.0.residual_group.blocks.0.attn.logit_scale"  # Swin V2's attention (SWINIR_KEY too)
SRFORMER_KEY = "layers.0.residual_group.blocks.0.attn.aligned_relative_position_index"  # the permuted attention's
CRAFT_KEY = "layers.0.residual_group.hf_blocks.0.attn.temperature"  # the fusion block's channel attention


def indices(shapes: dict, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := regex.fullmatch(k))})


def swinir_config(shapes: dict) -> tuple[SwinIRConfig, list[Rule]]:
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
        upscale = 2 ** len(indices(shapes, r"conv_up(\d+)\.weight"))
    elif upsampler == "pixelshuffle":
        convs = indices(shapes, r"upsample\.(\d+)\.weight")  # one 9x conv for 3x, else one 4x conv per octave
        upscale = 3 if shapes["upsample.0.weight"][0] == 9 * shapes["conv_last.weight"][1] else 2 ** len(convs)
    elif upsampler == "pixelshuffledirect":
        upscale = math.isqrt(shapes["upsample.0.bias"][0] // out_channels)
    else:
        upscale = 1
    window = math.isqrt(shapes[SWINIR_KEY][0])
    layers = indices(shapes, r"layers\.(\d+)\.residual_group\.blocks\.0\.norm1\.weight")
    depths = tuple(len(indices(shapes, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
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


def dat_config(shapes: dict, window: tuple[int, int]) -> tuple[DATConfig, list[Rule]]:
    """DAT's configuration from its shapes and first window (the last position-bias offset + 1), spandrel's rules."""
    common, layers, rules = _dat_skeleton(shapes)
    heads = tuple(
        shapes[f"layers.{i}.blocks.1.attn.temperature"][0] if depth >= 2
        else 2 * shapes[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"][0]
        for i, depth in zip(layers, common["depths"], strict=True)
    )  # fmt: skip
    expansion = shapes["layers.0.blocks.0.ffn.fc1.weight"][0] / common["embed_dim"]
    return DATConfig(split_size=window, num_heads=heads, expansion_factor=expansion, **common), rules


def rgt_config(shapes: dict, window: tuple[int, int]) -> tuple[RGTConfig, list[Rule]]:
    """RGT's configuration from its shapes and first window, spandrel's rules: a layer's heads are twice a window
    branch's (plus one where twice does not divide the width); RG-SA's channel ratio from its 1x1 conv."""
    common, layers, rules = _dat_skeleton(shapes)
    dim = common["embed_dim"]
    halves = [shapes[f"layers.{i}.blocks.0.attn.attns.0.pos.pos3.2.weight"][0] for i in layers]
    heads = tuple(2 * h if dim % (2 * h) == 0 else 2 * h + 1 for h in halves)
    conv = next((shapes[f"layers.{i}.blocks.1.attn.conv.weight"] for i, depth in zip(layers, common["depths"],
                strict=True) if depth >= 2), None)  # fmt: skip
    config = RGTConfig(
        split_size=window, num_heads=heads, expansion_factor=shapes["layers.0.blocks.0.mlp.fc1.weight"][0] / dim,
        c_ratio=conv[0] / conv[1] if conv else 0.5, **common,
    )  # fmt: skip
    return config, rules


def _dat_skeleton(shapes: dict) -> tuple[dict, list[int], list[Rule]]:
    """What DAT and RGT read alike: DATConfig's other fields, the layer indices, and the key map (the buffers
    dropped)."""
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = indices(shapes, r"layers\.(\d+)\.blocks\.0\.norm1\.weight")
    depths = tuple(len(indices(shapes, rf"layers\.{i}\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
    if "conv_last.weight" in shapes:
        upsampler, upscale, num_feat = "pixelshuffle", 1, 64
        for i in indices(shapes, r"upsample\.(\d+)\.weight"):
            out, num_feat = shapes[f"upsample.{i}.weight"][:2]
            upscale *= math.isqrt(out // num_feat)
    else:
        upsampler, num_feat = "pixelshuffledirect", 64
        upscale = math.isqrt(shapes["upsample.0.weight"][0] // in_channels)
    common = dict(
        in_channels=in_channels, embed_dim=embed_dim, depths=depths,
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
    return common, layers, rules


def hat_config(path: Path, shapes: dict) -> tuple[HATConfig, list[Rule]]:
    """HAT's configuration from its shapes (spandrel's rules; the windows from the bias tables: (2 window - 1)^2 and
    (window + overlap - 1)^2 rows) and the map: its own names, the position-index buffers dropped."""
    if "absolute_pos_embed" in shapes:
        raise ConversionError(f"{path}: a HAT with an absolute position embedding, which runs only at its training "
                              "size; mlx-sd runs HAT models without one (all published ones)")  # fmt: skip
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    num_feat = shapes["conv_last.weight"][1]
    block = "layers.{}.residual_group.blocks.{}."
    layers = indices(shapes, r"layers\.(\d+)\.residual_group\.blocks\.0\.norm1\.weight")
    depths = tuple(len(indices(shapes, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
    heads = tuple(shapes[f"layers.{i}.residual_group.overlap_attn.relative_position_bias_table"][1] for i in layers)
    window = (math.isqrt(shapes[block.format(0, 0) + "attn.relative_position_bias_table"][0]) + 1) // 2
    overlap = math.isqrt(shapes["layers.0.residual_group.overlap_attn.relative_position_bias_table"][0]) - window + 1
    if (overlap - window) % 2:
        raise ConversionError(f"{path}: a HAT whose overlapping windows ({overlap}) exceed its windows ({window}) by "
                              "an odd count, which the original cannot run either")  # fmt: skip
    convs = indices(shapes, r"upsample\.(\d+)\.weight")  # one 9x conv for 3x, else one 4x conv per octave
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


def atd_config(path: Path, shapes: dict) -> tuple[ATDConfig, list[Rule]]:
    """ATD's configuration from its shapes (spandrel's rules: the window from the position-index buffer, the category
    size 128 for the light models, 256 otherwise) and the map: its own names, the index buffer dropped."""
    if "absolute_pos_embed" in shapes:
        raise ConversionError(f"{path}: an ATD with an absolute position embedding, which runs only at its training "
                              "size; mlx-sd runs ATD models without one (all published ones)")  # fmt: skip
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = indices(shapes, r"layers\.(\d+)\.residual_group\.td")
    layer = "layers.{}.residual_group.layers.{}."
    depths = tuple(len(indices(shapes, rf"layers\.{i}\.residual_group\.layers\.(\d+)\.norm1\.weight")) for i in layers)
    upsampler, upscale = _head(shapes, in_channels, "conv_up1.weight")
    first = layer.format(0, 0)
    config = ATDConfig(
        in_channels=in_channels, embed_dim=embed_dim, depths=depths,
        num_heads=tuple(shapes[layer.format(i, 0) + "attn_win.relative_position_bias_table"][1] for i in layers),
        window_size=math.isqrt(shapes["relative_position_index_SA"][0]),
        category_size=128 if upsampler == "pixelshuffledirect" and embed_dim == 48 else 256,
        num_tokens=shapes[first + "attn_atd.scale"][0], reducted_dim=shapes[first + "attn_atd.wq.weight"][0],
        convffn_kernel_size=shapes[first + "convffn.dwconv.depthwise_conv.0.weight"][2],
        mlp_ratio=shapes[first + "convffn.fc1.weight"][0] / embed_dim, qkv_bias=first + "wqkv.bias" in shapes,
        patch_norm="patch_embed.norm.weight" in shapes, upscale=upscale, upsampler=upsampler,
        resi_connection="1conv" if "layers.0.conv.weight" in shapes else "3conv", norm="no_norm" not in shapes,
        num_feat=shapes["conv_before_upsample.0.weight"][0] if "conv_before_upsample.0.weight" in shapes else 64,
    )  # fmt: skip
    rules = [
        Rule(r"(?:module\.)?relative_position_index_SA", None, "recomputed from the window size"),
        Rule(r"(?:module\.)?no_norm", None, "a flag (ATDConfig.norm)"),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]
    return config, rules


def _head(shapes: dict, in_channels: int, nearest_key: str) -> tuple[str, int]:
    """SwinIR's four heads as ATD and SRFormer store them (spandrel's rules): nearest+conv (4x; its last conv is
    `nearest_key`), pixelshuffle (the factor of each upsample conv multiplied), pixelshuffledirect (one conv straight
    to the image), or none (a 1x restoration model)."""
    if nearest_key in shapes:
        return "nearest+conv", 4
    if "conv_before_upsample.0.weight" in shapes:
        upscale = 1
        for i in indices(shapes, r"upsample\.(\d+)\.weight"):
            out, feat = shapes[f"upsample.{i}.weight"][:2]
            upscale *= math.isqrt(out // feat)
        return "pixelshuffle", upscale
    if "upsample.0.weight" in shapes:
        return "pixelshuffledirect", math.isqrt(shapes["upsample.0.weight"][0] // in_channels)
    return "", 1


def drct_config(path: Path, shapes: dict) -> tuple[DRCTConfig, list[Rule]]:
    """DRCT's configuration (spandrel's rules: the window from the bias table's (2 window - 1)^2 rows, the training
    size from a shifted block's mask, heads per block) and the map: its own names, the buffers dropped."""
    if "conv_last.weight" not in shapes:
        raise ConversionError(f"{path}: a DRCT without an upsampler, whose forward returns its input unchanged")
    if "layers.0.swin1.attn.qkv.bias" not in shapes or "absolute_pos_embed" in shapes:
        raise ConversionError(f"{path}: a DRCT without qkv biases or with an absolute position embedding, which "
                              "mlx-sd does not run (no published model has either)")  # fmt: skip
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = indices(shapes, r"layers\.(\d+)\.swin1\.norm1\.weight")
    heads = tuple(tuple(shapes[f"layers.{i}.swin{k}.attn.relative_position_bias_table"][1] for k in range(1, 6))
                  for i in layers)  # fmt: skip
    window = (math.isqrt(shapes["layers.0.swin1.attn.relative_position_bias_table"][0]) + 1) // 2
    mask = shapes.get("layers.0.swin2.attn_mask")
    num_feat = shapes["conv_last.weight"][1]
    convs = indices(shapes, r"upsample\.(\d+)\.weight")  # one 9x conv for 3x, else one 4x conv per octave
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


def swin2sr_config(path: Path, shapes: dict) -> tuple[Swin2SRConfig, list[Rule]]:
    """Swin2SR's configuration from its shapes (spandrel's rules) and the map: its own names, the buffers dropped."""
    block = "layers.0.residual_group.blocks.0."
    if "conv_bicubic.weight" in shapes or "conv_after_body_hf.weight" in shapes:
        raise ConversionError(
            f"{path}: a Swin2SR with the auxiliary or high-frequency head (compressed-image SR), "
            "which mlx-sd does not run (it runs the classical, lightweight and real-world heads)"
        )
    unusual = shapes["patch_embed.proj.weight"][2] != 1 or "absolute_pos_embed" in shapes
    if unusual or block + "attn.q_bias" not in shapes:
        raise ConversionError(
            f"{path}: a Swin2SR with patches larger than a pixel, an absolute position embedding "
            "or no qkv biases, which mlx-sd does not run (no published model has one)"
        )
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = indices(shapes, r"layers\.(\d+)\.residual_group\.blocks\.0\.norm1\.weight")
    depths = tuple(len(indices(shapes, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.norm1\.weight")) for i in layers)
    heads = tuple(shapes[f"layers.{i}.residual_group.blocks.0.attn.logit_scale"][0] for i in layers)
    if "conv_hr.weight" in shapes:
        upsampler, upscale = "nearest+conv", 4
    elif "conv_before_upsample.0.weight" in shapes:
        upsampler, num = "pixelshuffle", shapes["conv_last.weight"][1]
        convs = indices(shapes, r"upsample\.(\d+)\.weight")
        upscale = 3 if shapes["upsample.0.weight"][0] == 9 * num else 2 ** len(convs)
    elif "upsample.0.weight" in shapes:
        upsampler, upscale = "pixelshuffledirect", math.isqrt(shapes["upsample.0.weight"][0] // in_channels)
    else:
        upsampler, upscale = "", 1
    window = math.isqrt(shapes[block + "attn.relative_position_index"][0])
    mask = shapes.get("layers.0.residual_group.blocks.1.attn_mask")
    config = Swin2SRConfig(
        in_channels=in_channels, embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
        mlp_ratio=shapes[block + "mlp.fc1.weight"][0] / embed_dim, upsampler=upsampler, upscale=upscale,
        resi_connection="3conv" if "conv_after_body.0.weight" in shapes else "1conv",
        num_feat=shapes["conv_before_upsample.0.weight"][0] if "conv_before_upsample.0.weight" in shapes else 64,
        img_size=round(math.sqrt(mask[0]) * window) if mask else 64,
    )  # fmt: skip
    buffers = "recomputed from the window and the image (relative_position_index, relative_coords_table, attn_mask)"
    rules = [
        Rule(r"(?:module\.)?layers\.\d+\.residual_group\.blocks\.\d+\.(?:attn\.relative_position_index"
             r"|attn\.relative_coords_table|attn_mask)", None, buffers),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]  # fmt: skip
    return config, rules


def srformer_config(path: Path, shapes: dict) -> tuple[SRFormerConfig, list[Rule]]:
    """SRFormer's configuration from its shapes (spandrel_extra_arches' rules: the window from the bias table's
    (window - 1)^2 rows, the training size from a shifted block's mask, which without one leaves every block
    unshifted) and the map: its own names, the buffers dropped."""
    if "absolute_pos_embed" in shapes:
        raise ConversionError(
            f"{path}: an SRFormer with an absolute position embedding, which runs only at its "
            "training size; mlx-sd runs SRFormer models without one (all published ones)"
        )
    block = "layers.0.residual_group.blocks.0."
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = range(max(indices(shapes, r"layers\.(\d+)\..+")) + 1)  # spandrel counts to the highest index
    depths = tuple(max(indices(shapes, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\..+")) + 1 for i in layers)
    heads = tuple(shapes[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"][1] for i in layers)
    upsampler, upscale = _head(shapes, in_channels, "conv_hr.weight")
    window = math.isqrt(shapes[block + "attn.relative_position_bias_table"][0]) + 1
    mask = shapes.get("layers.0.residual_group.blocks.1.attn_mask")
    config = SRFormerConfig(
        in_channels=in_channels, embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
        mlp_ratio=shapes[block + "mlp.fc1.weight"][0] / embed_dim, qkv_bias=block + "attn.q.bias" in shapes,
        patch_norm="patch_embed.norm.weight" in shapes, upsampler=upsampler, upscale=upscale,
        resi_connection="1conv" if "conv_after_body.weight" in shapes else "3conv",
        img_size=math.isqrt(mask[0]) * window if mask else window,
    )  # fmt: skip
    buffers = "recomputed from the window size and the image (aligned_relative_position_index, attn_mask)"
    rules = [
        Rule(r"(?:module\.)?layers\.\d+\.residual_group\.blocks\.\d+\.(?:attn\.aligned_relative_position_index"
             r"|attn_mask)", None, buffers),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]  # fmt: skip
    return config, rules


def craft_config(path: Path, shapes: dict) -> tuple[CRAFTConfig, list[Rule]]:
    """CRAFT's configuration from its shapes (spandrel's rules) and the map: its own names, the position buffers
    (recomputed) dropped. The window pair comes from the index buffer's s0 x s1 rows and the offsets' (2 s0 - 1) x
    (2 s1 - 1); which side is which the shapes cannot tell, and spandrel takes s0 <= s1, as here."""
    embed_dim, in_channels = shapes["conv_first.weight"][:2]
    layers = range(max(indices(shapes, r"layers\.(\d+)\..+")) + 1)  # spandrel counts to the highest index
    depths = tuple(max(indices(shapes, rf"layers\.{i}\.residual_group\.hf_blocks\.(\d+)\..+")) + 1 for i in layers)
    heads = tuple(shapes[f"layers.{i}.residual_group.hf_blocks.0.attn.temperature"][0] for i in layers)
    cells, offsets = shapes["relative_position_index_h"][0], shapes["biases_v"][0]
    sides = [s for s in range(1, cells + 1) if cells % s == 0 and (2 * s - 1) * (2 * cells // s - 1) == offsets]
    if not sides:
        raise ConversionError(f"{path}: a CRAFT whose position buffers ({cells} window cells, {offsets} offsets) fit "
                              "no rectangular window")  # fmt: skip
    block = "layers.0.residual_group.srwa_blocks.0."
    config = CRAFTConfig(
        in_channels=in_channels, embed_dim=embed_dim, depths=depths, num_heads=heads,
        split_size=(sides[0], cells // sides[0]), mlp_ratio=shapes[block + "mlp.fc1.bias"][0] / embed_dim,
        qkv_bias=block + "qkv.bias" in shapes, upscale=math.isqrt(shapes["upsample.0.bias"][0] // in_channels),
        resi_connection="1conv" if "conv_after_body.weight" in shapes else "identity",
    )  # fmt: skip
    rules = [
        Rule(r"(?:module\.)?(?:relative_position_index_[hv]|biases_[hv])", None,
             "recomputed from the window pair (the position index and offsets)"),
        Rule(r"(?:module\.)?(.+)", r"\1"),
    ]  # fmt: skip
    return config, rules
