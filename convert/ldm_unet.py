"""The original (CompVis/Stability `ldm`) UNet layout -> mlx_sd's UNet: config from tensor shapes, key map.

The original `openaimodel.UNetModel` numbers its blocks in flat lists, where diffusers (and we) nest them by stage:

    input_blocks.0                         conv_in
    input_blocks.{1 + s*(L+1) + j}.0|.1    down_blocks.{s}.resnets.{j} | .attentions.{j}     j < L
    input_blocks.{1 + s*(L+1) + L}.0.op    down_blocks.{s}.downsamplers.0.conv               s < n-1
    middle_block.0|1|2                     mid_block.resnets.0 | attentions.0 | resnets.1
    output_blocks.{i*(L+1) + j}.0|.1       up_blocks.{i}.resnets.{j} | .attentions.{j}       j <= L
    output_blocks.{i*(L+1) + L}.{1|2}.conv up_blocks.{i}.upsamplers.0.conv (index 2 after an attention)
    time_embed.0|2, out.0|2, label_emb.0.0|2   time_embedding.linear_1|2, conv_norm_out|conv_out, add_embedding

for n stages of L resnets each. `block_table` writes that arithmetic out once as a table; the rules are generated
from it. Inside a block only the resnet leaves are renamed (`in_layers.0` -> `norm1`, ...); transformer blocks
already use diffusers' names, and SD1's 1x1-conv `proj_in`/`proj_out` become linears in `keymap.to_mlx_layout`.
Keys here are relative to the UNet (`model.diffusion_model.` stripped by the caller).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from mlx_sd.models import UNetConfig

from .keymap import ConversionError, Rule

# ldm ResBlock leaves -> diffusers ResnetBlock2D leaves.
RESNET_LEAVES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
# SD2 and SDXL use 64-channel attention heads (`num_head_channels: 64` in their yaml files); SD1 uses 8 heads
# at every stage (`num_heads: 8`).
HEAD_CHANNELS = 64
SD1_HEADS = 8

_FIXED = [
    Rule(r"time_embed\.0\.(weight|bias)", r"time_embedding.linear_1.\1"),
    Rule(r"time_embed\.2\.(weight|bias)", r"time_embedding.linear_2.\1"),
    Rule(r"out\.0\.(weight|bias)", r"conv_norm_out.\1"),
    Rule(r"out\.2\.(weight|bias)", r"conv_out.\1"),
    # SDXL's added text-time embedding (`num_classes: sequential`); absent from SD1/SD2 files.
    Rule(r"label_emb\.0\.0\.(weight|bias)", r"add_embedding.linear_1.\1"),
    Rule(r"label_emb\.0\.2\.(weight|bias)", r"add_embedding.linear_2.\1"),
]


def block_table(config: UNetConfig) -> list[tuple[str, str, str]]:
    """(original prefix, our prefix, kind) for every block; kind is "resnet", "attention" or "conv"."""
    n, L = len(config.block_out_channels), config.layers_per_block
    rows = [("input_blocks.0.0", "conv_in", "conv")]
    for s in range(n):
        for j in range(L):
            k = 1 + s * (L + 1) + j
            rows.append((f"input_blocks.{k}.0", f"down_blocks.{s}.resnets.{j}", "resnet"))
            if config.transformer_depth[s]:
                rows.append((f"input_blocks.{k}.1", f"down_blocks.{s}.attentions.{j}", "attention"))
        if s < n - 1:
            rows.append((f"input_blocks.{1 + s * (L + 1) + L}.0.op", f"down_blocks.{s}.downsamplers.0.conv", "conv"))
    rows += [
        ("middle_block.0", "mid_block.resnets.0", "resnet"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    for i in range(n):
        has_attention = bool(config.transformer_depth[n - 1 - i])  # up stage i mirrors down stage n-1-i
        for j in range(L + 1):
            k = i * (L + 1) + j
            rows.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if has_attention:
                rows.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
        if i < n - 1:
            src = f"output_blocks.{i * (L + 1) + L}.{2 if has_attention else 1}.conv"
            rows.append((src, f"up_blocks.{i}.upsamplers.0.conv", "conv"))
    return rows


def unet_rules(config: UNetConfig) -> list[Rule]:
    """The key map for an original-layout UNet of this architecture (one rule per block leaf)."""
    rules = list(_FIXED)
    for src, dst, kind in block_table(config):
        src = re.escape(src)
        if kind == "resnet":
            for leaf, ours in RESNET_LEAVES.items():
                rules.append(Rule(rf"{src}\.{re.escape(leaf)}\.(weight|bias)", rf"{dst}.{ours}.\1"))
        elif kind == "attention":
            rules.append(Rule(rf"{src}\.(.+)", rf"{dst}.\1"))  # SpatialTransformer names match diffusers'
        else:
            rules.append(Rule(rf"{src}\.(weight|bias)", rf"{dst}.\1"))
    return rules


# --- config from shapes -----------------------------------------------------------------------------------

_INPUT = re.compile(r"input_blocks\.(\d+)\.")


def _need(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    try:
        return tuple(shapes[key])
    except KeyError:
        raise ConversionError(
            f"unet: tensor model.diffusion_model.{key} not found; this is not an original-layout SD UNet "
            "(or the file is truncated)"
        ) from None


def unet_config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    head_channels: int | None = None,
    num_heads: int | tuple[int, ...] | None = None,
    encoder_only: bool = False,
) -> UNetConfig:
    """Infer the UNet architecture from an original-layout UNet's tensor shapes (keys without prefix).

    Shapes fix every width and depth but not the attention head count, which the family decides: pass
    `num_heads` (SD1: 8 at every stage) or `head_channels` (SD2/SDXL: 64 channels per head). `encoder_only`: the
    tensors are a ControlNet's (no output blocks; out_channels stays 4).
    """
    if (num_heads is None) == (head_channels is None):
        raise ValueError("pass exactly one of num_heads (SD1) or head_channels (SD2, SDXL)")
    conv_in = _need(shapes, "input_blocks.0.0.weight")  # (C0, in_channels, 3, 3)
    in_channels = conv_in[1]
    out_channels = 4 if encoder_only else _need(shapes, "out.2.weight")[0]
    n_input = 1 + max(int(m.group(1)) for k in shapes if (m := _INPUT.match(k)))
    n_down = sum(1 for k in shapes if re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k))
    n = n_down + 1
    # input blocks: conv_in, n*L resnets, n-1 downsamplers
    layers, rest = divmod(n_input - 1 - n_down, n)
    if rest or layers < 1:
        raise ConversionError(
            f"unet: {n_input} input blocks with {n_down} downsamplers fit no UNet layout; the file may be damaged"
        )
    chans, depth = [], []
    for s in range(n):
        first = 1 + s * (layers + 1)
        chans.append(_need(shapes, f"input_blocks.{first}.0.out_layers.3.weight")[0])
        depth.append(_depth(shapes, f"input_blocks.{first}.1"))
    mid_depth = _depth(shapes, "middle_block.1")
    if not mid_depth:
        raise ConversionError("unet: the middle block has no transformer; not a Stable Diffusion UNet")
    context = next((v[1] for k, v in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    if context is None:
        raise ConversionError("unet: no cross-attention (attn2.to_k) tensors; not a text-conditioned SD UNet")
    if head_channels is not None:
        heads = tuple(c // head_channels for c in chans)
    else:
        heads = (num_heads,) * n if isinstance(num_heads, int) else tuple(num_heads)
    label = shapes.get("label_emb.0.0.weight")
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(chans),
        layers_per_block=layers,
        transformer_depth=tuple(depth),
        num_heads=heads,
        mid_transformer_depth=mid_depth,
        cross_attention_dim=context,
        projection_class_embeddings_input_dim=None if label is None else label[1],
        # The SDXL family sets addition_time_embed_dim (256); shapes alone cannot split label_emb's input.
        addition_time_embed_dim=None,
    )


def _depth(shapes: Mapping[str, tuple[int, ...]], block: str) -> int:
    """Number of transformer blocks in the SpatialTransformer at `block` (0 when the stage has no attention)."""
    pattern = re.compile(rf"{re.escape(block)}\.transformer_blocks\.(\d+)\.")
    indices = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return 1 + max(indices) if indices else 0


def uses_linear_projection(shapes: Mapping[str, tuple[int, ...]]) -> bool | None:
    """True for SD2/SDXL (`use_linear_in_transformer`), False for SD1's 1x1 convs, None without attention."""
    proj = next((v for k, v in shapes.items() if k.endswith(".1.proj_in.weight")), None)
    return None if proj is None else len(proj) == 2
