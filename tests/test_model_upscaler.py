"""Model upscalers (ESRGAN family) against spandrel, the loader AUTOMATIC1111 runs them with, and A1111's tiling.

Fixtures are random-weight spandrel networks saved in each published key layout (original ESRGAN, BasicSR /
Real-ESRGAN under `params_ema`, BSRGAN, ESRGAN+, Real-ESRGAN's pixel-unshuffled 2x/1x, the compact network under
`params`); the reference for each file is spandrel's own reading of it. The A1111 path (BGR 8-bit tiles, overlaps
blended in Pillow, the upscale loop) is checked against tests/a1111_upscale.py.
"""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from a1111_upscale import extras_upscale as a1111_extras
from a1111_upscale import load_descriptor, resize_image, spandrel, spandrel_extra, upscale_with_model
from PIL import Image
from safetensors.torch import save_file

from mlx_sd.upscale import upscale_image
from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.library import UpscalerLibrary
from mlx_sd_convert.upscaler import SUPPORTED, read_upscaler

TOLERANCE = 5e-6  # float32 network outputs in [0, 1]


def _random(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random, scaled by its fan-in so that activations stay of order one."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 16
            p.copy_(torch.randn(p.shape, generator=generator) / fan_in**0.5)
    return module.eval()


def _random_statistics(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every BatchNorm's running statistics random too (means ~0.1, variances 0.5-1.5), so that inference uses them."""
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in module.named_buffers():
        if name.endswith("running_mean"):
            buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
        elif name.endswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    return module


def esrgan_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel ESRGAN's state dict, in the original ESRGAN layout (`model.N...`), its output centred on
    mid-grey (else most pixels clamp, and a wrong network could still match)."""
    state = _random(spandrel("ESRGAN").ESRGAN(**kwargs), seed).state_dict()
    last = max(int(k.split(".")[1]) for k in state)
    state[f"model.{last}.bias"] += 0.5
    return state


def basicsr_names(state: dict, bsrgan: bool = False) -> dict:
    """The original layout renamed as BasicSR (Real-ESRGAN) or BSRGAN name it."""
    last = max(int(k.split(".")[1]) for k in state)
    ups = (last + 1 - 5) // 3
    nb = max(int(m.group(1)) for k in state if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    names = {"model.0": "conv_first", f"model.1.sub.{nb}": "trunk_conv" if bsrgan else "conv_body",
             f"model.{3 * ups + 2}": "HRconv" if bsrgan else "conv_hr", f"model.{last}": "conv_last"}  # fmt: skip
    names |= {f"model.{3 * (i + 1)}": f"upconv{i + 1}" if bsrgan else f"conv_up{i + 1}" for i in range(ups)}
    out = {}
    for key, value in state.items():
        m = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(\w+)", key)
        if m:
            i, r, c, kind = m.groups()
            key = f"RRDB_trunk.{i}.RDB{r}.conv{c}.{kind}" if bsrgan else f"body.{i}.rdb{r}.conv{c}.{kind}"
        else:
            stem, kind = key.rsplit(".", 1)
            key = f"{names[stem]}.{kind}"
        out[key] = value
    return out


def swinir_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel SwinIR's state dict (tiny: 24 channels, two groups of two blocks)."""
    kwargs = {"img_size": 16, "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 3], "window_size": 4,
              "mlp_ratio": 2.0, **kwargs}  # fmt: skip
    return _random(spandrel("SwinIR").SwinIR(**kwargs), seed).state_dict()


def dat_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel DAT's state dict (tiny: 32 channels, groups of three and two blocks, so that both kinds of
    shifted block run), its BatchNorm statistics random too."""
    kwargs = {"img_size": 16, "embed_dim": 32, "split_size": [2, 4], "depth": [3, 2], "num_heads": [2, 4],
              "expansion_factor": 2.0, **kwargs}  # fmt: skip
    network = _random(spandrel("DAT").DAT(**kwargs), seed)
    return _random_statistics(network, seed + 1).state_dict()


def rgt_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel RGT's state dict (tiny: 32 channels, groups of three and two blocks, so that both kinds of
    shifted block run, and RG-SA in each)."""
    kwargs = {"img_size": 16, "embed_dim": 32, "split_size": [2, 4], "depth": [3, 2], "num_heads": [2, 4],
              "mlp_ratio": 2.0, **kwargs}  # fmt: skip
    return _random(spandrel("RGT").RGT(**kwargs), seed).state_dict()


def atd_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel ATD's state dict (tiny: 24 channels, 4-pixel windows, groups of two and three layers, 8
    dictionary tokens), its dictionaries random as trained ones are."""
    kwargs = {"img_size": 16, "embed_dim": 24, "depths": [2, 3], "num_heads": [2, 3], "window_size": 4,
              "num_tokens": 8, "reducted_dim": 6, "convffn_kernel_size": 3, "mlp_ratio": 2.0, **kwargs}  # fmt: skip
    return _random(spandrel("ATD").ATD(**kwargs), seed).state_dict()


def fdat_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel FDAT's state dict (tiny: 24 channels, two groups of a spatial and a channel block, 4-pixel
    windows)."""
    kwargs = {"embed_dim": 24, "num_groups": 2, "depth_per_group": 1, "num_heads": 2, "window_size": 4,
              "aim_reduction_ratio": 4, "mid_dim": 16, **kwargs}  # fmt: skip
    return _random(spandrel("FDAT").FDAT(**kwargs), seed).state_dict()


def moesr_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel MoESR's state dict (tiny: 16 channels, two stages of one gated block)."""
    kwargs = {"dim": 16, "n_blocks": 2, "n_block": 1, "upsample_dim": 16, **kwargs}
    return _random(spandrel("MoESR").MoESR(**kwargs), seed).state_dict()


def hat_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel HAT's state dict (tiny: 24 channels, 4-pixel windows, groups of two and three blocks)."""
    kwargs = {"img_size": 16, "embed_dim": 24, "depths": [2, 3], "num_heads": [2, 3], "window_size": 4,
              "compress_ratio": 3, "squeeze_factor": 6, "mlp_ratio": 2.0, **kwargs}  # fmt: skip
    return _random(spandrel("HAT").HAT(**kwargs), seed).state_dict()


def srformer_state(seed: int = 0, **kwargs) -> dict:
    """A random SRFormer's state dict (spandrel_extra_arches'; tiny: 24 channels, 8-pixel windows, so 4 x 4 key
    cells, groups of two and three blocks; trained at 16 pixels, so every second block shifts)."""
    kwargs = {"img_size": 16, "embed_dim": 24, "depths": [2, 3], "num_heads": [2, 3], "window_size": 8,
              "mlp_ratio": 2.0, **kwargs}  # fmt: skip
    return _random(spandrel_extra("SRFormer").SRFormer(**kwargs), seed).state_dict()


def span_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel SPAN's state dict (16 channels). Its input is x 255 (after the mean): the first conv is
    scaled down by 255 and the last to an output of about 0.5 +- 0.3, as trained networks behave, else activations
    reach the hundreds and most pixels clamp."""
    kwargs = {"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 16, **kwargs}
    network = _random(spandrel("SPAN").SPAN(**kwargs), seed)
    with torch.no_grad():
        if network.is_norm:
            first = network.conv_1
            for t in (first.sk.weight, first.sk.bias, first.conv[2].weight, first.conv[2].bias):
                t /= 255
        last = network.upsampler[0]
        spread = network(_pixels((1, 3, 32, 32))).std()
        last.weight *= 0.3 / spread
        last.bias.mul_(0.3 / spread).add_(0.5)
    return network.state_dict()


def plksr_state(real: bool = True, seed: int = 0, **kwargs) -> dict:
    """A random spandrel RealPLKSR's (or PLKSR's) state dict (16 channels, three blocks, 7x7 large kernels)."""
    module = spandrel("PLKSR").__dict__["RealPLKSR" if real else "PLKSR"]
    return _random(module(**{"dim": 16, "n_blocks": 3, "kernel_size": 7, **kwargs}), seed).state_dict()


def drct_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel DRCT's state dict (tiny: 24 channels, growth 8, 4-pixel windows, one dense group of five Swin
    blocks whose head counts differ: 3, 1, 2, 3, 1)."""
    kwargs = {"img_size": 16, "embed_dim": 24, "depths": [6], "num_heads": [3], "window_size": 4, "mlp_ratio": 2.0,
              "gc": 8, "upsampler": "pixelshuffle", **kwargs}  # fmt: skip
    return _random(spandrel("DRCT").DRCT(**kwargs), seed).state_dict()


def mosr_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel MoSR's state dict (16 channels, three gated blocks with 7x7 depthwise convs)."""
    kwargs = {"n_block": 3, "dim": 16, "kernel_size": 7, **kwargs}
    return _random(spandrel("MoSR").MoSR(**kwargs), seed).state_dict()


def cugan_state(variant: str, seed: int = 0, **kwargs) -> dict:
    """A random spandrel Real-CUGAN's state dict (`UpCunet2x`, `3x`, `4x`, `2x_fast`); the 2x and 3x outputs brought to
    about 0.5 +- 0.3 (their two UNets' last convs scaled, a bias added), else most pixels clamp."""
    network = _random(getattr(spandrel("RealCUGAN"), f"UpCunet{variant}")(**kwargs), seed)
    if variant in ("2x", "3x"):
        with torch.no_grad():
            spread = network(_pixels((1, 3, 40, 40))).std()
            for last in (network.unet1.conv_bottom, network.unet2.conv_bottom):
                last.weight *= 0.3 / spread
                last.bias *= 0.3 / spread
            network.unet2.conv_bottom.bias += 0.5
    return network.state_dict()


def safmn_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel SAFMN's state dict (16 channels, two blocks)."""
    kwargs = {"dim": 16, "n_blocks": 2, "ffn_scale": 2.0, **kwargs}
    return _random(spandrel("SAFMN").SAFMN(**kwargs), seed).state_dict()


def safmn_bcie_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel SAFMN BCIE's state dict (16 channels, two groups of two blocks)."""
    kwargs = {"dim": 16, "n_blocks": 2, "num_layers": 2, "ffn_scale": 2.0, **kwargs}
    return _random(spandrel("SAFMNBCIE").SAFMNBCIE(**kwargs), seed).state_dict()


def swiftsrgan_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel Swift-SRGAN's state dict (16 channels, two blocks), its BatchNorm statistics random too."""
    kwargs = {"num_channels": 16, "num_blocks": 2, **kwargs}
    network = _random(spandrel("SwiftSRGAN").SwiftSRGAN(**kwargs), seed)
    return _random_statistics(network, seed + 1).state_dict()


def seemore_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel SeemoRe's state dict (16 channels, two groups of three experts)."""
    kwargs = {"embedding_dim": 16, "num_layers": 2, "num_experts": 3, "global_kernel_size": 5, **kwargs}
    return _random(spandrel("SeemoRe").SeemoRe(**kwargs), seed).state_dict()


def ditn_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel DITN's state dict (16 channels, two inner-patch and two spatial layers per unit)."""
    kwargs = {"dim": 16, "ITL_blocks": 2, "SAL_blocks": 2, **kwargs}
    return _random(spandrel("DITN").DITN(**kwargs), seed).state_dict()


def swin2sr_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel Swin2SR's state dict (tiny: 24 channels, two groups of two Swin V2 blocks)."""
    kwargs = {"img_size": 16, "embed_dim": 24, "depths": [2, 2], "num_heads": [2, 3], "window_size": 4,
              "mlp_ratio": 2.0, **kwargs}  # fmt: skip
    return _random(spandrel("Swin2SR").Swin2SR(**kwargs), seed).state_dict()


def rcan_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel RCAN's state dict (16 channels, two groups of two blocks), its mean-shift convs random too."""
    kwargs = {"n_resgroups": 2, "n_resblocks": 2, "n_feats": 16, "reduction": 4, **kwargs}
    return _random(spandrel("RCAN").RCAN(**kwargs), seed).state_dict()


def omnisr_state(seed: int = 0, counters: bool = False, **kwargs) -> dict:
    """A random spandrel OmniSR's state dict (16 channels, two groups of one block), optionally with thop's profiling
    counters (`total_ops`, `total_params`) as some releases were saved."""
    kwargs = {"num_feat": 16, "res_num": 2, "block_num": 1, "window_size": 4, **kwargs}
    state = _random(spandrel("OmniSR").OmniSR(**kwargs), seed).state_dict()
    if counters:
        state |= {"total_ops": torch.zeros(1, dtype=torch.float64), "input.total_params": torch.ones(1)}
    return state


def scunet_state(seed: int = 0) -> dict:
    """A random spandrel SCUNet's state dict (64 channels, the least its 32-wide heads allow; two blocks a level, so
    that shifted windows run at every level)."""
    network = _random(spandrel("SCUNet").SCUNet(config=[2, 2, 2, 2, 2, 2, 2], dim=64), seed)
    with torch.no_grad():  # outputs of about 0.3 around 0 (it has no input skip): most pixels within [0, 1]
        network.m_tail[0].weight *= 0.3 / network(_pixels((1, 3, 64, 64))).std()
    return network.state_dict()


def compact_state(seed: int = 0, **kwargs) -> dict:
    return _random(spandrel("Compact").Compact(**kwargs), seed).state_dict()


def _pixels(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


FILES = {  # file name -> its contents
    "ESRGAN_4x.pth": lambda: esrgan_state(num_blocks=2),
    "2x_narrow.safetensors": lambda: esrgan_state(num_blocks=1, scale=2, num_filters=32),
    "4x_plus.pth": lambda: esrgan_state(num_blocks=1, plus=True),
    "RealESRGAN_x4plus.pth": lambda: {"params_ema": basicsr_names(esrgan_state(num_blocks=2))},
    "RealESRGAN_x2plus.pth": lambda: {
        "params_ema": basicsr_names(esrgan_state(num_blocks=1, shuffle_factor=2, in_nc=12))
    },
    "1x_unshuffled.pth": lambda: {"params": basicsr_names(esrgan_state(num_blocks=1, shuffle_factor=4, in_nc=48))},
    "BSRGAN.pth": lambda: basicsr_names(esrgan_state(num_blocks=1), bsrgan=True),
    "1x_restore.pth": lambda: esrgan_state(num_blocks=1, scale=1, num_filters=32),  # no upsampling stage
    "8x_NMKD.pth": lambda: esrgan_state(num_blocks=1, scale=8, num_filters=32),  # three stages
    "realesr-general-x4v3.pth": lambda: {"params": compact_state(num_conv=4, num_feat=16)},
    # A1111's "SwinIR 4x" (SwinIR-L real-world: nearest+conv head, 3conv residuals), stored under params_ema
    "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth": lambda: {
        "params_ema": swinir_state(upsampler="nearest+conv", upscale=4, resi_connection="3conv")
    },
    "SwinIR_classical_x2.pth": lambda: {"params": swinir_state(upsampler="pixelshuffle", upscale=2)},
    "SwinIR_classical_x3.pth": lambda: swinir_state(upsampler="pixelshuffle", upscale=3),
    "SwinIR_lightweight_x3.pth": lambda: swinir_state(upsampler="pixelshuffledirect", upscale=3),
    "SwinIR_jpeg.pth": lambda: swinir_state(upsampler="", upscale=1, window_size=7, img_size=14),  # [0, 255]
    "DAT_x2.pth": lambda: dat_state(upscale=2),  # A1111's "DAT x2": pixel-shuffle head, 1conv residuals
    "DAT_x3.safetensors": lambda: dat_state(upscale=3, qkv_bias=False),
    "scunet_color_real_gan.pth": lambda: scunet_state(),  # A1111's "ScuNET" (1x)
    "Real_HAT_GAN_SRx4.pth": lambda: {"params_ema": hat_state(upscale=4)},  # overlap ratio 0.5: 4 -> 6-pixel windows
    "HAT-S_SRx3.safetensors": lambda: hat_state(upscale=3, compress_ratio=24, qkv_bias=False, patch_norm=False),
    "1x_HAT_denoise.pth": lambda: hat_state(upscale=1, overlap_ratio=1.0, resi_connection="identity"),
    "4xNomos8k_span_otf.pth": lambda: span_state(upscale=4),  # Conv3XC chains fused on reading, as spandrel runs them
    "2x_SPAN_no_norm.safetensors": lambda: span_state(upscale=2, norm=False),  # the `no_norm` buffer
    "4xNomos2_realplksr.pth": lambda: {"params_ema": plksr_state()},  # GroupNorm, element-wise attention
    "2x_realplksr_ln.safetensors": lambda: plksr_state(upscaling_factor=2, layer_norm=True, use_ea=False),
    "4x_PLKSR.pth": lambda: plksr_state(False, ccm_type="CCM"),  # the original PLKSR: `channe_mixer`, GELU
    "3x_PLKSR_ICCM.pth": lambda: plksr_state(False, ccm_type="ICCM", upscaling_factor=3),
    "4xNomos2_realplksr_dysample.pth": lambda: plksr_state(dysample=True),  # DySample head (4 groups)
    "3x_realplksr_dysample.pth": lambda: plksr_state(dysample=True, upscaling_factor=3, layer_norm=True),  # 3 groups
    "4xRealWebPhoto_drct-l.pth": lambda: {"params_ema": drct_state(upscale=4)},  # inputs padded to 16 (spandrel's)
    "DRCT_SRx3.safetensors": lambda: drct_state(upscale=3, num_heads=[4], resi_connection="identity", patch_norm=False),
    "4xNomos2_hq_mosr.pth": lambda: {"params_ema": mosr_state(upscale=4)},  # pixel-shuffle head
    "2x_MoSR_gps.safetensors": lambda: mosr_state(upscale=2, upsampler="gps", conv_ratio=0.5, expansion_ratio=2.0),
    "2x_MoSR_dys.pth": lambda: mosr_state(upscale=2, upsampler="dys"),
    "up2x-latest-conservative.pth": lambda: cugan_state("2x"),  # Real-CUGAN: inputs padded to 32 (spandrel's)
    "up3x-latest-denoise3x.pth": lambda: cugan_state("3x"),
    "up4x-latest-no-denoise.pth": lambda: cugan_state("4x"),
    "pro-conservative-up2x.pth": lambda: cugan_state("2x", pro=True),  # the `pro` flag: x 0.7 + 0.15 inside
    "up2x-fast.safetensors": lambda: cugan_state("2x_fast"),  # pixel-unshuffled, inputs padded to 40 (and 4s)
    "4x_SAFMN.pth": lambda: {"params": safmn_state(upscaling_factor=4)},  # inputs padded to multiples of 8
    "2x_SAFMN.safetensors": lambda: safmn_state(upscaling_factor=2, ffn_scale=1.5, n_blocks=3),
    "4x_SeemoRe.pth": lambda: seemore_state(scale=4),  # inputs padded to 16; one expert per image
    "2x_SeemoRe_exp.safetensors": lambda: seemore_state(scale=2, lr_space="exp"),
    "4x_DITN.pth": lambda: ditn_state(upscale=4),  # inputs padded by reflection to 8
    "2x_DITN_bias.safetensors": lambda: ditn_state(upscale=2, bias=True, UFONE_blocks=2, ffn_expansion_factor=1.5),
    "4x_SwiftSRGAN.pth": lambda: swiftsrgan_state(upscale_factor=4),
    "2x_SwiftSRGAN.safetensors": lambda: swiftsrgan_state(upscale_factor=2, num_blocks=1),
    "1x_SAFMN_BCIE.pth": lambda: safmn_bcie_state(),  # 2x unshuffle, inputs padded to multiples of 16
    "1x_SAFMN_BCIE_wide.safetensors": lambda: safmn_bcie_state(ffn_scale=1.5, n_blocks=1, num_layers=3),
    "Swin2SR_RealworldSR_X4_64_BSRGAN_PSNR.pth": lambda: {
        "params_ema": swin2sr_state(upsampler="nearest+conv", upscale=4, resi_connection="3conv")
    },
    "Swin2SR_ClassicalSR_X2_64.pth": lambda: swin2sr_state(upsampler="pixelshuffle", upscale=2),
    "Swin2SR_Lightweight_X3.safetensors": lambda: swin2sr_state(upsampler="pixelshuffledirect", upscale=3),
    "4x_RCAN.pth": lambda: {"params": rcan_state(scale=4)},
    "2x_RCAN_unshuffle.pth": lambda: rcan_state(scale=2, unshuffle_mod=True),  # 2x2 unshuffle, 4x inside
    "1x_RCAN_no_norm.safetensors": lambda: rcan_state(scale=1, unshuffle_mod=True, norm=False),  # [0, 1] inside
    "4x_OmniSR.pth": lambda: omnisr_state(up_scale=4, counters=True),  # inputs padded to the window with zeros
    "2x_OmniSR_no_pe.safetensors": lambda: omnisr_state(up_scale=2, pe=False, bias=False, block_num=2, window_size=8),
    "4x_RGT.pth": lambda: {"params": rgt_state(upscale=4)},
    "2x_RGT_S.safetensors": lambda: rgt_state(
        upscale=2, split_size=[4, 4], qkv_bias=False, c_ratio=0.25, resi_connection="3conv"
    ),  # fmt: skip
    "4x_ATD.pth": lambda: {"params_ema": atd_state(upscale=4, upsampler="pixelshuffle")},
    "2x_ATD_light.safetensors": lambda: atd_state(upscale=2, upsampler="pixelshuffledirect", qkv_bias=False),
    "4x_ATD_real.pth": lambda: atd_state(upscale=4, upsampler="nearest+conv", resi_connection="3conv", norm=False),
    "1x_ATD.pth": lambda: atd_state(upscale=1, upsampler="", patch_norm=False),
    "4x_FDAT.pth": lambda: fdat_state(scale=4),  # transpose+conv head
    "2x_FDAT_pa.safetensors": lambda: fdat_state(  # pa_up records its middle width as the input's: equal here
        scale=2, upsampler_type="pa_up", ffn_expansion_ratio=1.5, mid_dim=24
    ),
    "3x_FDAT_ps.pth": lambda: fdat_state(scale=3, upsampler_type="pixelshuffle"),
    "3x_FDAT.pth": lambda: fdat_state(scale=3, num_heads=3),  # one 3x3 transposed conv of stride 3
    "2x_FDAT.pth": lambda: fdat_state(scale=2, upsampler_type="transpose+conv"),
    "4x_FDAT_nearest.pth": lambda: fdat_state(scale=4, upsampler_type="nearest+conv"),
    "2x_FDAT_dysample.pth": lambda: fdat_state(scale=2, upsampler_type="dysample"),  # a conv to mid_dim first
    "1x_FDAT_unshuffle.pth": lambda: fdat_state(scale=1, unshuffle_mod=True, upsampler_type="pixelshuffledirect"),
    "2x_FDAT_unshuffle.pth": lambda: fdat_state(scale=2, unshuffle_mod=True),  # 2x2 unshuffle, 4x transposed convs
    "4x_MoESR.pth": lambda: moesr_state(scale=4),  # pixelshuffledirect head, inputs padded to even sizes
    "2x_MoESR_dysample.safetensors": lambda: moesr_state(scale=2, upsampler="dysample", expansion_factor=1.5),
    "1x_MoESR_conv.pth": lambda: moesr_state(upsampler="conv"),
    "SRFormer_SRx4_DF2K.pth": lambda: {"params": srformer_state(upscale=4, upsampler="pixelshuffle")},
    # 6-pixel windows: the shift (3) is odd, so the key cells' regions are cut at -2 on the half-size map
    "SRFormer_SRx2_DF2K.safetensors": lambda: srformer_state(
        upscale=2, upsampler="pixelshuffle", window_size=6, img_size=12, qkv_bias=False
    ),  # fmt: skip
    "SRFormerLight_SRx3_DIV2K.pth": lambda: srformer_state(upscale=3, upsampler="pixelshuffledirect", patch_norm=False),
    "4x_SRFormer_real.pth": lambda: {
        "params_ema": srformer_state(upscale=4, upsampler="nearest+conv", resi_connection="3conv")
    },  # fmt: skip
    "1x_SRFormer.pth": lambda: srformer_state(upsampler="", img_size=8),  # trained at the window: no block shifts
    "DAT_light_x4.pth": lambda: {
        "params": dat_state(upscale=4, upsampler="pixelshuffledirect", split_size=[4, 2], resi_connection="3conv")
    },  # fmt: skip
}


def _save(folder, name: str, state: dict):
    path = folder / name
    if name.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _stable_sort(x, dim=-1, descending=False, stable=None):
    """torch.sort with ties kept in order: ATD sorts pixels by category with `stable=False`, which leaves the order
    of a category's pixels to the sort implementation (torch's CPU, CUDA and MPS sorts differ); mlx-sd's is the
    stable order."""
    return _torch_sort(x, dim=dim, descending=descending, stable=True)


_torch_sort = torch.sort


def _unpinned_tensor(*args, pin_memory=False, **kwargs):
    """torch.tensor without `pin_memory`, which raises without CUDA: FDAT's DySample asks for it, so spandrel cannot
    run those models on a CPU (nor on a Mac's MPS)."""
    return _torch_tensor(*args, **kwargs)


_torch_tensor = torch.tensor


@pytest.mark.parametrize("name", list(FILES))
def test_each_layout_reads_and_runs_as_spandrel(tmp_path, monkeypatch, name):
    monkeypatch.setattr(torch, "sort", _stable_sort)  # ATD's category order (mlx_sd/models/atd.py)
    monkeypatch.setattr(torch, "tensor", _unpinned_tensor)  # FDAT's DySample pins memory, which needs CUDA
    state = FILES[name]()
    path = _save(tmp_path, name, state)
    reference = load_descriptor(state)
    ours = read_upscaler(path, mx.float32)
    assert ours.scale == reference.scale
    for size in ((20, 24), (21, 18)):  # odd sizes: the unshuffling models pad by reflection and crop
        x = _pixels((1, 3, *size))
        ours_in = mx.array(x.numpy().transpose(0, 2, 3, 1))  # first: spandrel's RCAN scales its input in place
        with torch.no_grad():
            expected = reference(x).numpy().transpose(0, 2, 3, 1)
        got = np.array(ours.run(ours_in))
        assert got.shape == expected.shape
        assert 0.05 < ((expected > 0) & (expected < 1)).mean()  # not a clamped, trivially equal output
        err = np.abs(got - expected).max()
        print(f"{name} {size}: {ours.network.config} max |diff| {err:.2e}")
        assert err < TOLERANCE


def test_hat_on_the_blocked_attention_path_matches_spandrel(tmp_path, monkeypatch):
    """At real sizes HAT's attention runs blocked (x86 CPU): its overlapping cross-attention (16 queries against 36
    keys per window here) read in place from the padded key/value windows."""
    import mlx_sd.attention as attention_module

    monkeypatch.setattr(attention_module, "BLOCKED_MIN_SCORES", 1)
    blocked = []
    run = attention_module._windows_blocked
    monkeypatch.setattr(attention_module, "_windows_blocked", lambda q, k, *a: blocked.append(k.shape) or run(q, k, *a))
    state = hat_state(upscale=2)
    ours = read_upscaler(_save(tmp_path, "HAT_SRx2.pth", state), mx.float32)
    x = _pixels((2, 3, 24, 20))
    with torch.no_grad():
        expected = load_descriptor(state)(x).numpy().transpose(0, 2, 3, 1)
    got = np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    assert (2 * 30, 36, 24) in blocked and (2 * 30, 16, 24) in blocked  # both attentions, both images
    assert np.abs(got - expected).max() < TOLERANCE


def test_srformer_on_the_blocked_attention_path_matches_spandrel(tmp_path, monkeypatch):
    """At real sizes SRFormer's permuted attention runs blocked (x86 CPU): each window's 64 queries against its 16
    key cells, keys and values read in place from the stacked projection, the shifted blocks' masks per window."""
    import mlx_sd.attention as attention_module

    monkeypatch.setattr(attention_module, "BLOCKED_MIN_SCORES", 1)
    blocked = []
    run = attention_module._windows_blocked
    monkeypatch.setattr(
        attention_module, "_windows_blocked", lambda q, k, v, h, b, mask, *a: blocked.append((k.shape, mask is None))
        or run(q, k, v, h, b, mask, *a)
    )  # fmt: skip
    state = srformer_state(upscale=2, upsampler="pixelshuffle")
    ours = read_upscaler(_save(tmp_path, "SRFormer_x2.pth", state), mx.float32)
    x = _pixels((2, 3, 24, 20))
    with torch.no_grad():
        expected = load_descriptor(state)(x).numpy().transpose(0, 2, 3, 1)
    got = np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    assert {((2 * 9, 16, 24), True), ((2 * 9, 16, 24), False)} <= set(blocked)  # 24 x 24 padded: 9 windows an image
    assert np.abs(got - expected).max() < TOLERANCE


@pytest.mark.parametrize("size", [(40, 56), (1024, 64)])
def test_rgt_recursive_attention_over_several_tokens_matches_spandrel(tmp_path, size):
    """RG-SA's queries meet 2 x 3 tokens (below 32 pixels there is one, and the attention is its value), and from
    1024-pixel sides the recursion runs three times."""
    state = rgt_state(upscale=2)
    ours = read_upscaler(_save(tmp_path, "RGT_x2.pth", state), mx.float32)
    x = _pixels((1, 3, *size))
    with torch.no_grad():
        expected = load_descriptor(state)(x).numpy().transpose(0, 2, 3, 1)
    got = np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    assert np.abs(got - expected).max() < TOLERANCE
    if size[0] == 1024:  # where a side is below 64 the original's strided convs fail: refused by name here
        with pytest.raises(ValueError, match="RGT cannot run a 1024x36 tile: .* use tiles of at most 1023 pixels"):
            ours.run(mx.zeros((1, 1024, 36, 3)))


def test_seemore_picks_each_images_experts_in_a_batch(tmp_path):
    """A batch of tiles (A1111's tiles run a few at a time here): each image gets its own router's top experts, as
    the original's inference path runs one image (its batched path indexes the experts with a 2-D tensor)."""
    state = seemore_state(seed=3, scale=2, topk=1)
    ours = read_upscaler(_save(tmp_path, "2x_SeemoRe.pth", state), mx.float32)
    reference = load_descriptor(state)
    x = torch.full((2, 3, 20, 24), 0.1)
    x[1, 1:] = 0.9  # (with these weights the second group's router picks expert 1 for one image, 0 for the other)
    with torch.no_grad():
        expected = np.concatenate([reference(x[i : i + 1]).numpy() for i in range(2)]).transpose(0, 2, 3, 1)
    got = np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    assert np.abs(got - expected).max() < TOLERANCE


def test_dysample_grid_sample_matches_torch():
    """DySample's sampler against torch's grid_sample (bilinear, align_corners=False, border): points inside, on the
    edges and far outside (clamped to the border), non-square images, several channels."""
    from mlx_sd.models.dysample import grid_sample

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 7, 9, generator=generator)  # (N, C, H, W)
    grid = torch.rand(3, 11, 13, 2, generator=generator) * 3 - 1.5  # a third of the points outside [-1, 1]
    grid[0, 0, :4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, 1.0], [1.0, -1.0]])
    expected = F.grid_sample(x, grid, mode="bilinear", align_corners=False, padding_mode="border")
    got = grid_sample(mx.array(x.permute(0, 2, 3, 1).numpy()), mx.array(grid.numpy()))
    assert np.abs(np.array(got) - expected.permute(0, 2, 3, 1).numpy()).max() < 3e-6  # float32 lerp order


def test_plksr_precision_and_variants_mlx_sd_does_not_run(tmp_path):
    """RealPLKSR's GroupNorm variant runs in float32 whatever the default (spandrel: no half precision), its
    LayerNorm variant and PLKSR at the default; the sparse-kernel ablations are refused by name."""
    group = read_upscaler(_save(tmp_path, "a.pth", plksr_state()), mx.float16)
    layer = read_upscaler(_save(tmp_path, "b.pth", plksr_state(layer_norm=True)), mx.float16)
    assert (group.network.dtype, layer.network.dtype) == (mx.float32, mx.float16)
    sparse = plksr_state(False, lk_type="SparsePLK", kernel_size=9, sparse_kernels=[3, 3], sparse_dilations=[1, 2])
    with pytest.raises(ConversionError, match="sparse.pth: a PLKSR with sparse large kernels"):
        read_upscaler(_save(tmp_path, "sparse.pth", sparse))


def _close_images(got: Image.Image, expected: Image.Image, passes: int = 1):
    """8-bit images from float32 networks: rounding may flip a value by one where the float lands on a half
    (~1e-4 of the values per pass); a second pass sees those flips in its input and spreads them a little."""
    a, b = np.asarray(got, np.int16), np.asarray(expected, np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= passes and (diff > 0).mean() < 1e-3 * passes**3, (diff.max(), (diff > 0).mean())


@pytest.mark.parametrize("name,size,target,tile,passes", [
    ("ESRGAN_4x.pth", (70, 52), (280, 208), 32, 1),  # several tiles
    ("ESRGAN_4x.pth", (40, 30), (320, 240), 24, 2),  # 8x: the 4x model runs twice
    ("RealESRGAN_x2plus.pth", (36, 28), (100, 80), 16, 2),  # 2x model asked ~2.8x: twice, then Lanczos down
    ("realesr-general-x4v3.pth", (64, 20), (128, 40), 32, 1),  # tiles taller than the image: black-filled crops
    ("ESRGAN_4x.pth", (30, 30), (60, 60), 0, 1),  # no tiling
    ("003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth", (70, 52), (280, 208), 32, 1),  # SwinIR: averaged tiles
    ("SwinIR_classical_x2.pth", (36, 20), (72, 40), 32, 1),  # the tile shrinks to the shorter side
    ("DAT_x3.safetensors", (48, 40), (144, 120), 32, 1),  # DAT: A1111's grid, as ESRGAN
    ("scunet_color_real_gan.pth", (90, 70), (180, 140), 64, 1),  # ScuNET: averaged tiles, 1x, then Lanczos
    ("Real_HAT_GAN_SRx4.pth", (48, 40), (192, 160), 32, 1),  # HAT from models/ESRGAN: A1111's ESRGAN grid
    ("4xNomos8k_span_otf.pth", (70, 52), (280, 208), 32, 1),  # SPAN too
    ("4xNomos2_realplksr.pth", (48, 40), (192, 160), 32, 1),  # and PLKSR
    ("4xRealWebPhoto_drct-l.pth", (48, 40), (192, 160), 32, 1),  # and DRCT
    ("4xNomos2_hq_mosr.pth", (48, 40), (192, 160), 32, 1),  # and MoSR
    ("up2x-latest-conservative.pth", (70, 52), (140, 104), 48, 1),  # and Real-CUGAN
    ("SRFormer_SRx2_DF2K.safetensors", (70, 52), (140, 104), 32, 1),  # and SRFormer
])  # fmt: skip
def test_a1111_upscale_with_a_model_matches_a1111(tmp_path, name, size, target, tile, passes):
    state = FILES[name]()
    upscaler = read_upscaler(_save(tmp_path, name, state), mx.float32)
    upscaler.tile = tile
    image = Image.fromarray((_pixels((*size[::-1], 3)).numpy() * 255).astype(np.uint8))
    expected = resize_image(image, *target, load_descriptor(state), tile_size=tile, tile_overlap=8)
    _close_images(upscale_image(image, *target, upscaler), expected, passes)


def test_library_lists_a1111_names_and_refuses_what_it_cannot_run(tmp_path):
    swinir = "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth"
    dat, scunet, hat = "DAT_x2.pth", "scunet_color_real_gan.pth", "Real_HAT_GAN_SRx4.pth"
    for name in ("RealESRGAN_x4plus.pth", "ESRGAN_4x.pth", "realesr-general-x4v3.pth", swinir, dat, scunet, hat):
        _save(tmp_path, name, FILES[name]())
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub", "4x_GRL.pth", {"conv_first.weight": torch.zeros(8, 3, 3, 3),
                                            "conv_after_body.weight": torch.zeros(8, 8, 3, 3)})  # fmt: skip
    library = UpscalerLibrary(tmp_path, mx.float32)
    names = ["4x_GRL", "DAT x2", "ESRGAN_4x", "R-ESRGAN 4x+", "R-ESRGAN General 4xV3", "Real_HAT_GAN_SRx4",
             "ScuNET", "SwinIR 4x"]  # fmt: skip
    assert list(library.listing()) == names
    entries = {e["name"]: e for e in library.api_listing()}
    assert set(entries) == set(names) - {"4x_GRL"}  # the file it cannot run left out
    families = {name: (e["model_name"], e["scale"]) for name, e in entries.items()}
    assert families == {"ESRGAN_4x": ("ESRGAN", 4), "R-ESRGAN 4x+": ("RealESRGAN", 4), "DAT x2": ("DAT", 2),
                        "R-ESRGAN General 4xV3": ("RealESRGAN", 4), "SwinIR 4x": ("SwinIR", 4),
                        "ScuNET": ("ScuNET", 1), "Real_HAT_GAN_SRx4": ("ESRGAN", 4)}  # fmt: skip
    assert library("R-ESRGAN 4x+") is library("RealESRGAN_x4plus")  # by A1111's name or the file's, loaded once
    assert library("R-ESRGAN 4x+").name == "R-ESRGAN 4x+"
    assert library("DAT x2").network.dtype == library("Real_HAT_GAN_SRx4").network.dtype == mx.float32
    assert (library("ScuNET").tile, library("R-ESRGAN 4x+").tile) == (256, 192)  # A1111's SCUNET_tile, ESRGAN_tile
    with pytest.raises(ConversionError, match=rf"a transformer .*; mlx-sd runs {re.escape(SUPPORTED)} upscalers"):
        library("4x_GRL")
    with pytest.raises(ConversionError, match=r"'R-ESRGAN 2x\+' not found .*available: 4x_GRL, DAT x2"):
        library("R-ESRGAN 2x+")
    _save(tmp_path, "aux.pth", swin2sr_state(upsampler="pixelshuffle_aux", upscale=2))
    with pytest.raises(ConversionError, match="aux.pth: a Swin2SR with the auxiliary or high-frequency head"):
        read_upscaler(tmp_path / "aux.pth")
    _save(tmp_path, "BCIE_x4.pth", safmn_bcie_state(upscaling_factor=4))
    with pytest.raises(ConversionError, match="BCIE_x4.pth: a SAFMN BCIE with a 4x pixel unshuffle; mlx-sd runs"):
        read_upscaler(tmp_path / "BCIE_x4.pth")
    _save(tmp_path, "FDAT_lda.pth", fdat_state(scale=2, upsampler_type="lda"))
    with pytest.raises(ConversionError, match=r"FDAT_lda.pth: an upsampler mlx-sd does not run \(lda\); it runs conv,"):
        read_upscaler(tmp_path / "FDAT_lda.pth")
    _save(tmp_path, "HAT_ape.pth", hat_state(ape=True))
    with pytest.raises(ConversionError, match="HAT_ape.pth: a HAT with an absolute position embedding"):
        read_upscaler(tmp_path / "HAT_ape.pth")
    _save(tmp_path, "SRFormer_ape.pth", srformer_state(ape=True))
    with pytest.raises(ConversionError, match="SRFormer_ape.pth: an SRFormer with an absolute position embedding"):
        read_upscaler(tmp_path / "SRFormer_ape.pth")
    torch.save({"model.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "broken.pth")
    with pytest.raises(ConversionError, match="without residual dense blocks"):
        read_upscaler(tmp_path / "broken.pth")


def _lanczos(scale):
    return lambda im: im.resize((int(im.width * scale), int(im.height * scale)), Image.LANCZOS)


@pytest.mark.parametrize("settings", [
    dict(scale=2.5),  # scale by: the loop, then Lanczos to the size rounded down to multiples of 8
    dict(scale=4.0, max_side_length=150),  # capped: scale to fit 150 pixels, no crop
    dict(size=(200, 120), crop=True),  # scale to, centred on a canvas of that size
    dict(size=(200, 120), crop=False, second=0.3),  # a second upscaler (Lanczos) blended in
])  # fmt: skip
def test_extras_upscale_matches_a1111(tmp_path, settings):
    from mlx_sd.extras import extras_upscale

    state = FILES["ESRGAN_4x.pth"]()
    upscaler = read_upscaler(_save(tmp_path, "ESRGAN_4x.pth", state), mx.float32)
    upscaler.tile = 32
    descriptor = load_descriptor(state)
    image = Image.fromarray((_pixels((40, 52, 3)).numpy() * 255).astype(np.uint8))
    size, second = settings.get("size"), settings.get("second", 0.0)
    scale = settings.get("scale", 2.0)
    factor = max(size[0] / image.width, size[1] / image.height) if size else scale
    expected, expected_info = a1111_extras(
        image, lambda im: upscale_with_model(descriptor, im, 32, 8), _lanczos(factor) if second else None,
        mode=1 if size else 0, upscale_by=scale, max_side_length=settings.get("max_side_length", 0),
        to_width=size and size[0], to_height=size and size[1], crop=settings.get("crop", False), visibility=second,
    )  # fmt: skip
    got, info = extras_upscale(image, upscaler, scale=scale, size=size, crop=settings.get("crop", False),
                               max_side_length=settings.get("max_side_length", 0),
                               upscaler_2="Lanczos" if second else None, upscaler_2_visibility=second)  # fmt: skip
    _close_images(got, expected)
    assert {k: v for k, v in info.items() if "upscaler" not in k} == expected_info
    assert info["Postprocess upscaler"] == "ESRGAN_4x"
    assert info.get("Postprocess upscaler 2") == ("Lanczos" if second else None)
