"""The original (`ldm.modules.diffusionmodules.model`) autoencoder layout -> mlx_sd's AutoencoderKL.

    encoder.down.{i}.block.{j}            encoder.down_blocks.{i}.resnets.{j}
    encoder.down.{i}.downsample.conv      encoder.down_blocks.{i}.downsamplers.0.conv
    decoder.up.{n-1-i}.block.{j}          decoder.up_blocks.{i}.resnets.{j}     (stored lowest resolution LAST)
    decoder.up.{n-1-i}.upsample.conv      decoder.up_blocks.{i}.upsamplers.0.conv
    *.mid.block_1 / attn_1 / block_2      *.mid_block.resnets.0 / attentions.0 / resnets.1
    *.mid.attn_1.{norm,q,k,v,proj_out}    *.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}  (1x1 convs -> linears)
    *.norm_out, nin_shortcut              *.conv_norm_out, conv_shortcut

The original decoder builds `up` from the lowest resolution up but stores it by resolution index, so `up.0` is
the LAST stage to run; diffusers' `up_blocks.0` is the first. The reversal needs the stage count, hence rules
generated per config. Keys are relative to the VAE (`first_stage_model.` stripped; separately published VAE files
such as vae-ft-mse-840000 use this layout without a prefix).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mlx_sd.models import VAEConfig

from .keymap import ConversionError, Rule

# What the original yaml files (v1-inference.yaml, v2-inference*.yaml) set as `scale_factor`.
SD_SCALING_FACTOR = 0.18215
_RESNET = r"(norm1|conv1|norm2|conv2)\.(weight|bias)"
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_rules(config: VAEConfig) -> list[Rule]:
    n = len(config.block_out_channels)
    rules = [
        Rule(r"loss\..+", None, "the training loss (LPIPS, discriminator) saved with some files; not the autoencoder"),
        Rule(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", r"\1.\2.\3"),
        Rule(r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.conv_norm_out.\2"),
        Rule(r"(quant_conv|post_quant_conv)\.(weight|bias)", r"\1.\2"),
        Rule(rf"encoder\.down\.(\d+)\.block\.(\d+)\.{_RESNET}", r"encoder.down_blocks.\1.resnets.\2.\3.\4"),
        Rule(
            r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.(weight|bias)",
            r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3",
        ),
        Rule(
            r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
            r"encoder.down_blocks.\1.downsamplers.0.conv.\2",
        ),
        Rule(rf"(encoder|decoder)\.mid\.block_1\.{_RESNET}", r"\1.mid_block.resnets.0.\2.\3"),
        Rule(rf"(encoder|decoder)\.mid\.block_2\.{_RESNET}", r"\1.mid_block.resnets.1.\2.\3"),
    ]
    for leaf, ours in _ATTENTION.items():
        rules.append(
            Rule(rf"(encoder|decoder)\.mid\.attn_1\.{leaf}\.(weight|bias)", rf"\1.mid_block.attentions.0.{ours}.\2")
        )
    for stored in range(n):
        up, ours = rf"decoder\.up\.{stored}", f"decoder.up_blocks.{n - 1 - stored}"  # up.0 runs last
        rules += [
            Rule(rf"{up}\.block\.(\d+)\.{_RESNET}", rf"{ours}.resnets.\1.\2.\3"),
            Rule(rf"{up}\.block\.(\d+)\.nin_shortcut\.(weight|bias)", rf"{ours}.resnets.\1.conv_shortcut.\2"),
            Rule(rf"{up}\.upsample\.conv\.(weight|bias)", rf"{ours}.upsamplers.0.conv.\1"),
        ]
    return rules


def vae_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], scaling_factor: float = SD_SCALING_FACTOR
) -> VAEConfig:
    """Infer the autoencoder from its tensor shapes (keys without prefix)."""
    try:
        conv_in = shapes["encoder.conv_in.weight"]  # (ch, in_channels, 3, 3)
        latent = shapes["decoder.conv_in.weight"][1]  # z_channels
        out_channels = shapes["decoder.conv_out.weight"][0]
    except KeyError as e:
        raise ConversionError(f"vae: tensor {e} not found; this is not an original-layout KL autoencoder") from None
    stages = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    if not stages or stages != list(range(len(stages))) or not blocks:
        raise ConversionError("vae: encoder.down.* blocks are missing or not numbered 0..n-1; the file may be damaged")
    chans = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in stages)
    return VAEConfig(
        in_channels=conv_in[1],
        out_channels=out_channels,
        latent_channels=latent,
        block_out_channels=chans,
        layers_per_block=len(blocks),
        norm_num_groups=32,  # the original code hard-codes GroupNorm(32, C)
        scaling_factor=scaling_factor,
        # SD3's autoencoder has neither 1x1 convolution around the latent (sd3_impls.py): its files lack them.
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
    )
