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
  other PLKSR models with the plain large kernel, DySample heads included (the sparse-kernel ablations are refused);
- DRCT (`layers.N.swinK...`, `layers.N.adjustK`): DRCT, DRCT-L and the community DRCT models; heads read per block,
  the position-index and mask buffers recomputed;
- Real-CUGAN (`unet1.conv1.conv.0`, `unet2...`, `conv_final`): bilibili's up2x / up3x / up4x anime models, the
  "pro" ones (the `pro` flag read from the file) and the fast 2x;
- SAFMN (`to_feat`, `feats.N.safm.mfr.K`, `to_img.0`): the SAFMN models; SAFMN BCIE (`to_feat.1`,
  `feats.N.layers.M.safm`, `feats.N.conv`): the 1x compression-artefact models with the 2x unshuffle;
- RCAN (`head`, `body.N.body.M.body.3.conv_du`, `tail`): the RCAN models, the pixel-unshuffled 1x / 2x ones too;
- Swin2SR (SwinIR's names with Swin V2's `logit_scale`, `cpb_mlp`, `q_bias` / `v_bias`): the classical, lightweight
  and real-world models (the compressed-SR auxiliary heads are refused);
- MoSR (`gblocks.N.fc1`, `shortcut`, `upsampler`): 4xNomos2_hq_mosr and the other MoSR models, with any of its heads
  (pixel shuffle, geometric ensemble, DySample); DySample's `init_pos` is recomputed;
- RGT (DAT's names with `blocks.N.gamma`, RG-SA's `reduction1`, `cpe`, L-SA's `get_v`): the RGT and RGT-S models;
  the window read from the position-bias offsets as for DAT, the other buffers recomputed;
- ATD (`layers.N.residual_group.td`, `...layers.M.attn_win`, `attn_atd`, `attn_aca`, `convffn`): ATD and
  ATD-light and the community ATD models, with any of SwinIR's heads; the window read from the position-index
  buffer (which is recomputed), the `no_norm` flag read;
- FDAT (`groups.N.blocks.M.attn`, `inter.cg`, `upsampler.MetaUpsample`) and MoESR (`blocks.N.blocks.M.conv.dwconv_hw`,
  `blocks.N.msg`, `upscale.MetaUpsample`): neosr's networks, the upsampler (any of neosr's UniUpsample heads but the
  LDA one, refused by name) read from the file's record, FDAT's "unshuffle" 1x / 2x models too;
- Swift-SRGAN (`initial.cnn.depthwise`, `residual.N.block1`, `upsampler.N`, `final_conv`): the Swift-SRGAN models,
  BatchNorm with its running statistics;
- SeemoRe (`body.N.local_block.block.moe_layer.experts.M`, `global_block`): the Tiny, Big and Large models;
- DITN (`sft`, `UFONE.N.ITLs.M`, `UFONE.N.SALs.M`, `upsample.0`): the DITN models (8-pixel patches);
- OmniSR (`input`, `residual_layer.N.residual_layer.M.layer.K`, `esa`, `up.0`): the OmniSR models, with or without
  the position bias (the window read from its table); thop's `total_ops` / `total_params` counters are skipped;
- SRFormer (SwinIR's names with the permuted attention's `attn.q`, `attn.kv`, `aligned_relative_position_index` and
  ATD's `mlp.dwconv`): SRFormer, SRFormer-light and the real-world models, with any of SwinIR's heads; the window
  read from the bias table, the shift from a mask's presence, the index and mask buffers recomputed;
- CRAFT (`layers.N.residual_group.srwa_blocks.M`, `hfer_blocks.M`, `hf_blocks.M.attn.temperature`): the CRAFT
  models; the window pair read from the position buffers (`relative_position_index_h`, `biases_v`; recomputed), the
  smaller side first as spandrel assumes;
- DCTLSA (`fea_conv`, `BK.body.N.transformer_body.0.blocks.M.attn.local`, `c`, `c1`..`c5`, `LR_conv`, `upsampler.0`):
  the DCTLSA models, BatchNorm with its running statistics (five heads, spandrel's number: files do not record it);
- spandrel's 1x restoration networks (`upscaler_restoration.py`), recognised by the keys spandrel's detection asks
  for: FBCNN (`m_head`, `m_down1.N.res.M`, `m_body_encoder`, `qf_pred.N`, `m_up3.N`, `to_gamma_3.0`): fbcnn_color,
  fbcnn_gray, fbcnn_gray_double, with each of KAIR's down- and upsamplings; DnCNN (`model.N`: convs at 0, 2, 4, ...,
  or with BatchNorm at 3, 6, ...; spandrel's key sets, which no original-layout ESRGAN matches): dncnn_15 / 25 / 50,
  dncnn_color_blind, dncnn_gray_blind and FDnCNN's fdncnn_gray / color (a noise-map channel in); DRUNet (`m_head`,
  `m_body.N.res.M`, `m_up3.N`): drunet_color and drunet_gray; NAFNet (`intro`, `encoders.N.M`, `downs.N`,
  `middle_blks.N`, `ups.N.0`, `decoders.N.M`, `ending`, under `params` as published): NAFNet-SIDD, -GoPro, -REDS.

The configuration is read from the shapes (width, blocks, growth, upsampling stages; in/out channels give the
unshuffle factor; SwinIR's, DAT's and HAT's head, depths, heads and window), as spandrel decides it, and the file is
mapped strictly. Other architectures (GRL, LDSR, GFPGAN, ...) are refused by name. A grey model (one input channel)
runs on the image's luma (`mlx_sd.model_upscaler`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_sd.model_upscaler import ModelUpscaler
from mlx_sd.models.atd import ATD, ATDConfig
from mlx_sd.models.craft import CRAFT, CRAFTConfig
from mlx_sd.models.cugan import CUGAN, CUGANConfig
from mlx_sd.models.dat import DAT, DATConfig
from mlx_sd.models.dctlsa import DCTLSA, DCTLSAConfig
from mlx_sd.models.dctlsa import MODULES as DCTLSA_MODULES
from mlx_sd.models.ditn import DITN, DITNConfig
from mlx_sd.models.dncnn import DnCNN, DnCNNConfig
from mlx_sd.models.drct import DRCT, DRCTConfig
from mlx_sd.models.drunet import DRUNet, DRUNetConfig
from mlx_sd.models.esrgan import CompactConfig, ESRGANConfig, RRDBNet, SRVGGNetCompact
from mlx_sd.models.fbcnn import FBCNN, FBCNNConfig
from mlx_sd.models.fdat import FDAT, FDATConfig
from mlx_sd.models.hat import HAT, HATConfig
from mlx_sd.models.moesr import MoESR, MoESRConfig
from mlx_sd.models.mosr import MoSR, MoSRConfig
from mlx_sd.models.nafnet import NAFNet, NAFNetConfig
from mlx_sd.models.omnisr import OmniSR, OmniSRConfig
from mlx_sd.models.plksr import PLKSR, PLKSRConfig
from mlx_sd.models.rcan import RCAN, RCANConfig
from mlx_sd.models.rgt import RGT, RGTConfig
from mlx_sd.models.safmn import SAFMN, SAFMNBCIE, SAFMNBCIEConfig, SAFMNConfig
from mlx_sd.models.scunet import SCUNet, SCUNetConfig
from mlx_sd.models.seemore import SeemoRe, SeemoReConfig
from mlx_sd.models.span import SPAN, SPANConfig
from mlx_sd.models.srformer import SRFormer, SRFormerConfig
from mlx_sd.models.swiftsrgan import SwiftSRGAN, SwiftSRGANConfig
from mlx_sd.models.swin2sr import Swin2SR, Swin2SRConfig
from mlx_sd.models.swinir import SwinIR, SwinIRConfig

from .keymap import ConversionError, Rule, load_mapped, tensor_shapes
from .readers import open_checkpoint
from .upscaler_neosr import FDAT_KEY, MOESR_KEY, fdat_config, moesr_config
from .upscaler_restoration import (
    DNCNN_KEYS,
    DRUNET_KEYS,
    FBCNN_KEYS,
    NAFNET_KEYS,
    dncnn_config,
    drunet_config,
    fbcnn_config,
    nafnet_config,
)
from .upscaler_transformers import (
    ATD_KEY,
    CRAFT_KEY,
    DAT_KEY,
    HAT_KEY,
    RGT_KEY,
    SRFORMER_KEY,
    SWIN2SR_KEY,
    SWINIR_KEY,
    atd_config,
    craft_config,
    dat_config,
    drct_config,
    hat_config,
    indices,
    rgt_config,
    srformer_config,
    swin2sr_config,
    swinir_config,
)

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
SUPPORTED = (
    "ESRGAN, Real-ESRGAN (RRDBNet and compact), BSRGAN, SwinIR, DAT, ScuNET, HAT, SPAN, PLKSR, DRCT, MoSR, Real-CUGAN, "
    "SAFMN (and SAFMN BCIE), Swin2SR, RCAN, OmniSR, RGT, ATD, FDAT, MoESR, Swift-SRGAN, DITN, SeemoRe, SRFormer, "
    "CRAFT, DCTLSA and the 1x restoration networks FBCNN, DnCNN (and FDnCNN), DRUNet, NAFNet"
)
NETWORKS = {ESRGANConfig: RRDBNet, CompactConfig: SRVGGNetCompact, SwinIRConfig: SwinIR, DATConfig: DAT,
            SCUNetConfig: SCUNet, HATConfig: HAT, SPANConfig: SPAN, PLKSRConfig: PLKSR, DRCTConfig: DRCT,
            MoSRConfig: MoSR, CUGANConfig: CUGAN, SAFMNConfig: SAFMN, Swin2SRConfig: Swin2SR,
            RCANConfig: RCAN, OmniSRConfig: OmniSR,
            RGTConfig: RGT, ATDConfig: ATD, FDATConfig: FDAT, MoESRConfig: MoESR,
            SAFMNBCIEConfig: SAFMNBCIE, SwiftSRGANConfig: SwiftSRGAN, DITNConfig: DITN,
            SeemoReConfig: SeemoRe, SRFormerConfig: SRFormer, FBCNNConfig: FBCNN, DnCNNConfig: DnCNN,
            DRUNetConfig: DRUNet, NAFNetConfig: NAFNet, CRAFTConfig: CRAFT,
            DCTLSAConfig: DCTLSA}  # fmt: skip
# spandrel never runs these in half precision
FLOAT32_ONLY = (SwinIRConfig, Swin2SRConfig, DATConfig, SCUNetConfig, HATConfig, DRCTConfig, SAFMNConfig, ATDConfig,
                SAFMNBCIEConfig, SeemoReConfig, SRFormerConfig, DnCNNConfig, DRUNetConfig, NAFNetConfig,
                DCTLSAConfig)  # fmt: skip
# DySample's sub-pixel grid, a buffer its module computes (mlx_sd.models.dysample.initial_positions)
INIT_POS = Rule(r"(?:module\.)?(?:to_img|upsampler)\.init_pos", None, "recomputed from the scale (DySample's grid)")
DCTLSA_KEY = "B1.body.0.transformer_body.0.blocks.0.attn.local.pointwise_prenorm_1.weight"
OMNISR_KEY = "residual_layer.0.residual_layer.0.layer.0.fn.0.weight"
# thop's profiling counters, which some OmniSR releases were saved with (spandrel deletes them)
OMNISR_JUNK = Rule(r"(?:module\.)?(?:.+\.)?(?:total_ops|total_params)", None, "a profiler's counter")
_OTHER_ARCHITECTURES = (  # (a key only that architecture has, its name) for the refusal
    ("conv_after_body.weight", "transformer (GRL, ...)"),
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
    if SWIN2SR_KEY in stripped:
        return swin2sr_config(path, stripped)
    if SRFORMER_KEY in stripped:
        return srformer_config(path, stripped)
    if ATD_KEY in stripped and "relative_position_index_SA" in stripped:
        return atd_config(path, stripped)
    if FDAT_KEY in stripped and "upsampler.MetaUpsample" in stripped:
        return fdat_config(path, stripped, _tensor(state, "upsampler.MetaUpsample"))
    if MOESR_KEY in stripped and "upscale.MetaUpsample" in stripped:
        return moesr_config(path, stripped, _tensor(state, "upscale.MetaUpsample"))
    if SWINIR_KEY in stripped and HAT_KEY not in stripped:
        return swinir_config(stripped)
    if HAT_KEY in stripped:
        return hat_config(path, stripped)
    if "layers.0.swin1.norm1.weight" in stripped and "layers.0.adjust1.weight" in stripped:
        return drct_config(path, stripped)
    if "conv_1.sk.weight" in stripped and "block_1.c1_r.sk.weight" in stripped:
        return _span_config(path, stripped)
    if "unet1.conv1.conv.0.weight" in stripped and "unet2.conv_bottom.weight" in stripped:
        return _cugan_config(stripped), [Rule(r"(?:module\.)?pro", None, "a flag (CUGANConfig.pro)"),
                                         Rule(r"(?:module\.)?(.+)", r"\1")]  # fmt: skip
    if "body.0.body.0.body.3.conv_du.0.weight" in stripped and "tail.1.weight" in stripped:
        return _rcan_config(stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if OMNISR_KEY in stripped and "input.weight" in stripped:
        return _omnisr_config(path, stripped), [OMNISR_JUNK, Rule(r"(?:module\.)?(.+)", r"\1")]
    if "body.0.local_block.block.moe_layer.experts.0.conv_1.weight" in stripped:
        return _seemore_config(path, stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if "sft.weight" in stripped and "UFONE.0.ITLs.0.attn.temperature" in stripped:
        return _ditn_config(stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if "initial.cnn.depthwise.weight" in stripped and "final_conv.pointwise.weight" in stripped:
        return _swiftsrgan_config(stripped), [
            Rule(r"(?:module\.)?.+\.num_batches_tracked", None, "BatchNorm's training counter"),
            Rule(r"(?:module\.)?(.+)", r"\1"),
        ]
    if "to_feat.1.weight" in stripped and "feats.0.layers.0.safm.aggr.weight" in stripped:
        return _safmn_bcie_config(path, stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if "to_feat.weight" in stripped and "feats.0.safm.aggr.weight" in stripped:
        return _safmn_config(stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if "fea_conv.weight" in stripped and DCTLSA_KEY in stripped:  # after SAFMN BCIE, as spandrel
        return _dctlsa_config(path, stripped), [
            Rule(r"(?:module\.)?.+\.num_batches_tracked", None, "BatchNorm's training counter"),
            Rule(r"(?:module\.)?(.+)", r"\1"),
        ]
    if "gblocks.0.weight" in stripped and "gblocks.1.fc1.weight" in stripped:
        return _mosr_config(path, stripped), [INIT_POS, Rule(r"(?:module\.)?(.+)", r"\1")]
    if "feats.0.weight" in stripped and "feats.1.refine.weight" in stripped:
        return _plksr_config(path, stripped), [INIT_POS, Rule(r"(?:module\.)?(.+)", r"\1")]
    if "m_head.0.weight" in stripped and "m_tail.0.weight" in stripped:
        return _scunet_config(stripped), [Rule(r"(?:module\.)?(.+)", r"\1")]
    if all(k in stripped for k in FBCNN_KEYS):
        return fbcnn_config(path, stripped)
    if all(k in stripped for k in NAFNET_KEYS):
        return nafnet_config(stripped)
    if all(k in stripped for k in DRUNET_KEYS):
        return drunet_config(path, stripped)
    if any(all(k in stripped for k in keys) for keys in DNCNN_KEYS):  # before ESRGAN's `model.0`, as spandrel
        return dncnn_config(stripped)
    if DAT_KEY in stripped:  # DAT or RGT: the first window from its last position offset
        offsets = _tensor(state, DAT_KEY)
        window = tuple(int(v) + 1 for v in offsets[-1])
        return rgt_config(stripped, window) if RGT_KEY in stripped else dat_config(stripped, window)
    if CRAFT_KEY in stripped and "conv_first.weight" in stripped:  # after DAT, as spandrel
        return craft_config(path, stripped)
    other = next((name for key, name in _OTHER_ARCHITECTURES if key in stripped), None)
    if other:
        raise ConversionError(f"{path}: a {other} model; mlx-sd runs {SUPPORTED} upscalers")
    if "body.1.weight" in stripped and "conv_first.weight" not in stripped:
        return _compact_config(stripped), [Rule(r"(?:module\.)?(body\.\d+\.(?:weight|bias))", r"\1")]
    if any(k in stripped for k in ("conv_first.weight", "model.0.weight")):
        return _esrgan_config(path, stripped)
    raise ConversionError(f"{path}: {_not_esrgan(stripped)}")


def _tensor(state, key: str):
    """The tensor stored as `key` (prefix "module." or not)."""
    return next(state[k] for k in state if _strip(k) == key)


def _strip(key: str) -> str:
    return key.removeprefix("module.")  # DataParallel's wrapper, as spandrel removes it


def _not_esrgan(shapes: dict) -> str:
    keys = ", ".join(list(shapes)[:6])
    return f"not an upscaler mlx-sd runs (keys: {keys}, ...); it runs {SUPPORTED}"


def _esrgan_config(path: Path, shapes: dict) -> tuple[ESRGANConfig, list[Rule]]:
    """The RRDBNet configuration and the key map onto its (BasicSR) names, for all three layouts."""
    prefix = r"(?:module\.)?"
    if "model.0.weight" in shapes:  # original ESRGAN: a flat nn.Sequential
        blocks = indices(shapes, r"model\.1\.sub\.(\d+)\.RDB1\.conv1\.0\.weight")
        last = max(indices(shapes, r"model\.(\d+)\.weight"))
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
        blocks = indices(shapes, r"(?:body|RRDB_trunk)\.(\d+)\.(?:rdb|RDB)1\.conv1\.weight")
        upsamples = len(indices(shapes, r"(?:conv_up|upconv)(\d+)\.weight"))
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
    last = max(indices(shapes, r"body\.(\d+)\.weight"))
    num_feat, in_channels = shapes["body.0.weight"][:2]
    # the last conv makes out * scale^2 channels, which the pixel shuffle turns into scale x the size; the nearest-
    # upsampled input is added, so out = in
    scale = math.isqrt(shapes[f"body.{last}.weight"][0] // in_channels)
    return CompactConfig(in_channels=in_channels, out_channels=in_channels, num_feat=num_feat,
                         num_conv=(last - 2) // 2, scale=scale)  # fmt: skip


def _scunet_config(shapes: dict) -> SCUNetConfig:
    """SCUNet's width and blocks per level (the down stages end in their strided conv, the up stages start with
    their transposed one), as spandrel reads them."""
    dim, in_channels = shapes["m_head.0.weight"][:2]
    count = {name: len(indices(shapes, rf"{name}\.(\d+)\..+")) for name in
             ("m_down1", "m_down2", "m_down3", "m_body", "m_up3", "m_up2", "m_up1")}  # fmt: skip
    blocks = tuple(n if name == "m_body" else n - 1 for name, n in count.items())
    return SCUNetConfig(in_channels=in_channels, dim=dim, config=blocks)


def _span_config(path: Path, shapes: dict) -> tuple[SPANConfig, list[Rule]]:
    """SPAN's configuration (spandrel's rules: the upsampler's channels are out x scale^2, out = in where it can
    be) and the map onto the fused convs `_fused_span` makes."""
    features, in_channels = shapes["conv_1.sk.weight"][:2]
    upscale, out_channels = _shuffle(path, "SPAN", shapes["upsampler.0.weight"][0], in_channels)
    norm = "no_norm" not in shapes
    if norm and in_channels != 3:
        raise ConversionError(f"{path}: a {in_channels}-channel SPAN that normalises by the RGB mean, which the "
                              "original cannot run either")  # fmt: skip
    config = SPANConfig(in_channels=in_channels, out_channels=out_channels, feature_channels=features,
                        upscale=upscale, norm=norm)  # fmt: skip
    return config, [Rule(r"no_norm", None, "a flag (SPANConfig.norm)"), Rule(r"(.+)", r"\1")]


def _shuffle(path: Path, network: str, shuffled: int, in_channels: int) -> tuple[int, int]:
    """(scale, output channels) of a pixel-shuffle head whose conv makes `shuffled` channels, as spandrel guesses
    them (`get_scale_and_output_channels`): out = in where it can be, else 3, 4 or 1."""
    fits = [c for c in (in_channels, 3, 4, 1) if shuffled % c == 0 and math.isqrt(shuffled // c) ** 2 * c == shuffled]
    if not fits:
        raise ConversionError(f"{path}: a {network} whose last conv makes {shuffled} channels, no pixel shuffle of 1, "
                              "3 or 4 channels")  # fmt: skip
    return math.isqrt(shuffled // fits[0]), fits[0]


def _dctlsa_config(path: Path, shapes: dict) -> DCTLSAConfig:
    """DCTLSA's configuration (spandrel's rules: the width from the first conv, the head's scale and channels as for
    every pixel shuffle); the module count the last fusion conv records must be the six the network runs."""
    nf, in_channels = shapes["fea_conv.weight"][:2]
    if shapes["c.0.weight"][1] != nf * DCTLSA_MODULES:
        raise ConversionError(f"{path}: a DCTLSA fusing {shapes['c.0.weight'][1] // nf} modules; the network (and "
                              f"spandrel's) runs {DCTLSA_MODULES}")  # fmt: skip
    upscale, out_channels = _shuffle(path, "DCTLSA", shapes["upsampler.0.weight"][0], in_channels)
    return DCTLSAConfig(in_channels=in_channels, out_channels=out_channels, nf=nf, upscale=upscale)


def _omnisr_config(path: Path, shapes: dict) -> OmniSRConfig:
    """OmniSR's configuration from its shapes, as spandrel reads it (the window from the position-bias table; 8
    without one)."""
    num_feat, in_channels = shapes["input.weight"][:2]
    upscale, out_channels = _shuffle(path, "OmniSR", shapes["up.0.weight"][0], in_channels)
    table = shapes.get("residual_layer.0.residual_layer.0.layer.2.fn.rel_pos_bias.weight")
    return OmniSRConfig(
        in_channels=in_channels, out_channels=out_channels, num_feat=num_feat,
        block_num=len(indices(shapes, r"residual_layer\.0\.residual_layer\.(\d+)\..+")) - 1,
        res_num=len(indices(shapes, r"residual_layer\.(\d+)\..+")),
        window_size=(math.isqrt(table[0]) + 1) // 2 if table else 8, pe=table is not None, upscale=upscale,
        bias="input.bias" in shapes,
    )  # fmt: skip


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
    for key, what in (("feats.1.lk.convs.0.weight", "sparse large kernels"),
                      ("feats.1.lk.mn_conv.weight", "rectangular sparse large kernels")):  # fmt: skip
        if key in shapes:
            raise ConversionError(f"{path}: a PLKSR with {what}, which mlx-sd does not run (it runs the published "
                                  "PLKSR and RealPLKSR models: plain large kernels)")  # fmt: skip
    real = "feats.1.channel_mixer.0.weight" in shapes
    mixer = "feats.1.channel_mixer." if real else "feats.1.channe_mixer."
    kinds = {(3, 3): "DCCM", (3, 1): "CCM", (1, 3): "ICCM"}
    mixer_kind = kinds.get((shapes[mixer + "0.weight"][2], shapes[mixer + "2.weight"][2]))
    if mixer_kind is None or (real and mixer_kind != "DCCM"):
        raise ConversionError(f"{path}: a PLKSR channel mixer of kernels {shapes[mixer + '0.weight'][2:]} and "
                              f"{shapes[mixer + '2.weight'][2:]}, not one the architecture has")  # fmt: skip
    last = max(indices(shapes, r"feats\.(\d+)\.weight"))
    large = shapes["feats.1.lk.conv.weight"]
    return PLKSRConfig(
        dim=shapes["feats.0.weight"][0], n_blocks=last - (2 if real else 1),
        upscale=math.isqrt(shapes[f"feats.{last}.weight"][0] // 3), kernel_size=large[2], partial=large[0], real=real,
        mixer=mixer_kind, use_ea="feats.1.attn.f.0.weight" in shapes, layer_norm="feats.1.layer_norm.bias" in shapes,
        dysample="to_img.init_pos" in shapes,
    )  # fmt: skip


def _mosr_config(path: Path, shapes: dict) -> MoSRConfig:
    """MoSR's configuration from its shapes, as spandrel reads it (`gblocks`: a conv, the blocks, then five layers)."""
    dim, in_channels = shapes["gblocks.0.weight"][:2]
    depthwise = shapes["gblocks.1.conv.weight"]
    out_channels = in_channels
    if "upsampler.init_pos" in shapes:  # DySample: 2 x 4 groups x scale^2 offsets
        upsampler, upscale = "dys", math.isqrt(shapes["upsampler.offset.weight"][0] // 8)
        out_channels = shapes["upsampler.end_conv.weight"][0]
    elif "upsampler.in_to_k.weight" in shapes:
        upsampler, upscale = "gps", math.isqrt(shapes["upsampler.in_to_k.weight"][0] // 8 // in_channels)
    else:
        upsampler, upscale = "ps", math.isqrt(shapes["upsampler.0.weight"][0] // in_channels)
    return MoSRConfig(
        in_channels=in_channels, dim=dim, n_blocks=max(indices(shapes, r"gblocks\.(\d+)\..+")) + 1 - 6,
        hidden=shapes["gblocks.1.fc1.weight"][0] // 2, conv_channels=depthwise[0], kernel_size=depthwise[2],
        upscale=upscale, upsampler=upsampler, out_channels=out_channels,
    )  # fmt: skip


def _cugan_config(shapes: dict) -> CUGANConfig:
    """Real-CUGAN's variant, as spandrel tells them apart: `conv_final` means 4x, or the fast 2x when the first conv
    takes 4x the output channels (pixel-unshuffled); a 5x5 transposed conv ends the 3x model's first UNet."""
    in_channels = shapes["unet1.conv1.conv.0.weight"][1]
    pro = "pro" in shapes
    if "conv_final.weight" in shapes:
        out_channels = shapes["conv_final.weight"][0] // 4
        if out_channels * 4 == in_channels:
            return CUGANConfig(in_channels=in_channels // 4, out_channels=out_channels, upscale=2, fast=True)
        return CUGANConfig(in_channels=in_channels, out_channels=out_channels, upscale=4, pro=pro)
    upscale = 3 if shapes["unet1.conv_bottom.weight"][2] == 5 else 2  # the file's (in, out, k, k)
    return CUGANConfig(in_channels=in_channels, out_channels=shapes["unet2.conv_bottom.weight"][0], upscale=upscale,
                       pro=pro)  # fmt: skip


def _safmn_config(shapes: dict) -> SAFMNConfig:
    """SAFMN's width, blocks, feed-forward width and scale from its shapes, as spandrel reads them."""
    return SAFMNConfig(
        dim=shapes["to_feat.weight"][0], n_blocks=len(indices(shapes, r"feats\.(\d+)\.norm1\.weight")),
        hidden=shapes["feats.0.ccm.ccm.0.weight"][0], upscale=math.isqrt(shapes["to_img.0.weight"][0] // 3),
    )  # fmt: skip


def _safmn_bcie_config(path: Path, shapes: dict) -> SAFMNBCIEConfig:
    """SAFMN BCIE's configuration from its shapes, as spandrel reads it; only the 2x unshuffle (the published
    models'), where spandrel's 16-pixel padding makes every pooling window whole."""
    dim, shuffled = shapes["to_feat.1.weight"][:2]
    unshuffle = math.isqrt(shuffled // 3)
    if unshuffle != 2:
        raise ConversionError(f"{path}: a SAFMN BCIE with a {unshuffle}x pixel unshuffle; mlx-sd runs the 2x one "
                              "(the published models)")  # fmt: skip
    hidden = shapes["feats.0.layers.0.ccm.ccm.0.weight"][0]
    return SAFMNBCIEConfig(
        dim=dim, n_blocks=len(indices(shapes, r"feats\.(\d+)\.conv\.weight")),
        num_layers=len(indices(shapes, r"feats\.0\.layers\.(\d+)\.norm1\.weight")), hidden=int(dim * (hidden / dim)),
        unshuffle=unshuffle,
    )  # fmt: skip


def _seemore_config(path: Path, shapes: dict) -> SeemoReConfig:
    """SeemoRe's configuration from its shapes, as spandrel reads it: the experts' ranks tell the rank schedule; the
    top-k, recursion and channel shuffle follow the published sizes (Large: 16 layers of 48, no shuffle, one
    recursion; the others shuffle and recurse twice), as no shape shows them."""
    dim, in_channels = shapes["conv_1.weight"][:2]
    layers = len(indices(shapes, r"body\.(\d+)\..+"))
    expert = "body.0.local_block.block.moe_layer.experts.{}.conv_1.weight"
    lr_space = "linear"
    if expert.format(2) in shapes:
        lr_space = {4: "linear", 6: "double", 8: "exp"}.get(shapes[expert.format(2)][0])
    elif expert.format(1) in shapes:
        lr_space = {3: "linear", 4: "double"}.get(shapes[expert.format(1)][0])
    if lr_space is None:
        raise ConversionError(f"{path}: a SeemoRe whose experts' ranks follow no schedule the original has")
    large = layers == 16 and dim == 48
    return SeemoReConfig(
        in_channels=in_channels, embedding_dim=dim, num_layers=layers,
        num_experts=len(indices(shapes, r"body\.0\.local_block\.block\.moe_layer\.experts\.(\d+)\..+")),
        lr_space=lr_space, recursive=1 if large else 2, use_shuffle=not large,
        global_kernel_size=shapes["body.0.global_block.block.attn.conv.0.weight"][3],
        upscale=math.isqrt(shapes["upsampler.0.weight"][0] // in_channels),
    )  # fmt: skip


def _ditn_config(shapes: dict) -> DITNConfig:
    """DITN's configuration from its shapes, as spandrel reads it (its patches are 8 pixels, which no shape shows)."""
    dim, in_channels = shapes["sft.weight"][:2]
    unit = "UFONE.0."
    return DITNConfig(
        in_channels=in_channels, dim=dim, itl_blocks=len(indices(shapes, rf"{unit}ITLs\.(\d+)\..+")),
        sal_blocks=len(indices(shapes, rf"{unit}SALs\.(\d+)\..+")),
        ufone_blocks=len(indices(shapes, r"UFONE\.(\d+)\..+")),
        hidden=int(dim * (shapes[unit + "ITLs.0.ffn.project_in.weight"][0] / 2 / dim)),
        bias=unit + "ITLs.0.attn.project_out.bias" in shapes, upscale=math.isqrt(shapes["upsample.0.weight"][0] // 3),
    )  # fmt: skip


def _swiftsrgan_config(shapes: dict) -> SwiftSRGANConfig:
    """Swift-SRGAN's configuration from its shapes, as spandrel reads it."""
    return SwiftSRGANConfig(
        in_channels=shapes["initial.cnn.depthwise.weight"][0], num_channels=shapes["initial.cnn.pointwise.weight"][0],
        num_blocks=len(indices(shapes, r"residual\.(\d+)\..+")),
        upscale=2 ** len(indices(shapes, r"upsampler\.(\d+)\..+")),
    )  # fmt: skip


def _rcan_config(shapes: dict) -> RCANConfig:
    """RCAN's configuration from its shapes, as spandrel reads it: a second `head` layer means a pixel-unshuffled
    model (4x inside, 4 // its scale the unshuffle)."""
    colors, n_feats = shapes["tail.1.weight"][:2]
    convs = indices(shapes, r"tail\.0\.(\d+)\.weight")
    upscale = 3 if convs and shapes["tail.0.0.weight"][0] == 9 * n_feats else 2 ** len(convs)
    head = "head.1.weight" if "head.1.weight" in shapes else "head.0.weight"
    unshuffle = math.isqrt(shapes[head][1] // colors)
    return RCANConfig(
        colors=colors, n_feats=n_feats, n_resgroups=max(indices(shapes, r"body\.(\d+)\..+")),
        n_resblocks=max(indices(shapes, r"body\.0\.body\.(\d+)\..+")), kernel_size=shapes[head][-1],
        squeeze=shapes["body.0.body.0.body.3.conv_du.0.weight"][0], upscale=upscale, unshuffle=unshuffle,
        norm="sub_mean.weight" in shapes,
    )  # fmt: skip
