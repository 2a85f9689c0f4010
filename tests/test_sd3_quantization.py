"""SD3 quantization (`mlx-sd convert --quantize 8|4`): the MMDiT's and T5's layer selection, the converted folder
(manifest and component configs), a strict load and a generation whose image is measured against the float model's.

The tiny pipeline is as wide as the group size needs: every Linear the selection picks takes an input width that is
a multiple of 64, so nothing is kept float by width alone and the selection is what `mlx_sd/quantization.py` says.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import pytest
from test_pipeline import as_array
from tiny_sd3 import tiny_sd3

from mlx_sd.components import load_component
from mlx_sd.pipeline import Pipeline
from mlx_sd_convert import convert
from oracles import psnr

CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, projection_dim=64)
CLIP_L, CLIP_G = dict(CLIP, hidden_act="quick_gelu"), dict(CLIP, hidden_act="gelu")
T5 = dict(vocab_size=300, d_model=128, d_kv=32, d_ff=128, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
          relative_attention_num_buckets=8, relative_attention_max_distance=20)  # fmt: skip
# SD3.5 medium's layout (qk norms, a dual-attention block) at 64-channel heads.
TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
    joint_attention_dim=T5["d_model"], caption_projection_dim=128, pooled_projection_dim=128, out_channels=16,
    pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0,),
)  # fmt: skip
QUANTIZED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
# The MMDiT's Linear layers kept float (mlx_sd/quantization.py: KEEP_FLOAT["mmdit"]); T5 keeps none.
MMDIT_FLOAT = {
    "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
    "context_embedder", "proj_out",
}  # fmt: skip
PROMPT = "a red lighthouse on mars, photo"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny pipeline's diffusers folder converted at float32, and quantized to 8 and 4 bits (float32 scales)."""
    tmp = tmp_path_factory.mktemp("sd3-quantized")
    tiny_sd3(tmp, seed=5, transformer=TRANSFORMER, clip_l=CLIP_L, clip_g=CLIP_G, t5_config=T5).save_pretrained(
        tmp / "src"
    )
    folders = {}
    for bits in (None, 8, 4):
        folders[bits] = tmp / f"q{bits}"
        convert(tmp / "src", folders[bits], dtype="float32", quantize=bits)
    return folders


def linear_layers(model: nn.Module) -> dict[str, str]:
    layers = (nn.Linear, nn.QuantizedLinear)
    return {path: type(m).__name__ for path, m in model.named_modules() if isinstance(m, layers)}


def test_converter_records_sd3_quantization(converted):
    for bits in (8, 4):
        expected = {"bits": bits, "group_size": 64, "mode": "affine"}
        manifest = json.loads((converted[bits] / "mlx_sd.json").read_text())
        assert manifest["family"] == "sd3" and manifest["quantization"] == expected
        for name in QUANTIZED:
            assert json.loads((converted[bits] / name / "config.json").read_text())["quantization"] == expected, name
        assert "quantization" not in json.loads((converted[bits] / "vae" / "config.json").read_text())
        for name in ("transformer", "text_encoder_3"):
            sizes = [(converted[b] / name / "weights.safetensors").stat().st_size for b in (None, bits)]
            assert sizes[1] < sizes[0] / 2, f"{name} {bits}-bit: {sizes}"


def test_mmdit_and_t5_layer_selection(converted):
    """By path: the MMDiT keeps its timestep/pooled-text embedder, context_embedder and proj_out float and
    quantizes every block's projections, the adaLN modulations (norm1, norm1_context, norm_out) included; T5
    quantizes every Linear, `wo` included; embeddings and the patch convolution are untouched."""
    mmdit = load_component(converted[8] / "transformer")
    layers = linear_layers(mmdit)
    assert {p for p, kind in layers.items() if kind == "Linear"} == MMDIT_FLOAT
    quantized = {p for p, kind in layers.items() if kind == "QuantizedLinear"}
    blocks = ("0.norm1.linear", "2.norm1_context.linear", "0.attn.to_q", "0.attn.add_k_proj", "0.attn2.to_v",
              "1.attn.to_add_out", "1.ff.net.0.proj", "1.ff_context.net.2", "2.attn.to_out.0")  # fmt: skip
    expected = {"norm_out.linear", *(f"transformer_blocks.{p}" for p in blocks)}
    assert expected <= quantized and len(quantized) == len(layers) - len(MMDIT_FLOAT)
    assert type(mmdit.pos_embed.proj) is nn.Conv2d and mmdit.pos_embed.pos_embed.dtype == mx.float32

    t5 = load_component(converted[8] / "text_encoder_3")
    layers = linear_layers(t5)
    assert set(layers.values()) == {"QuantizedLinear"}
    suffixes = {"SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o",
                "DenseReluDense.wi_0", "DenseReluDense.wi_1", "DenseReluDense.wo"}  # fmt: skip
    assert {p.split(".layer.")[1][2:] for p in layers} == suffixes  # encoder.block.{i}.layer.{j}.<suffix>
    assert len(layers) == len(suffixes) * T5["num_layers"]
    assert type(t5.shared) is nn.Embedding
    assert type(t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias) is nn.Embedding

    clip = load_component(converted[8] / "text_encoder")
    assert type(clip.text_projection) is nn.Linear
    assert type(clip.encoder.layers[0].mlp.fc2) is nn.QuantizedLinear


def test_t5_wo_stays_float32_when_quantized(converted):
    """t5.py runs `wo` on a float32 product into a float32 residual stream; quantized, with half-precision scales,
    it must still return float32 (a float16 `wo` output is what overflows in T5 v1.1)."""
    t5 = load_component(converted[8] / "text_encoder_3", dtype=mx.float16)
    ff = t5.encoder.block[0].layer[1].DenseReluDense
    assert ff.wo.scales.dtype == mx.float16 and ff.wo.weight.dtype == mx.uint32
    h = mx.full((1, 3, T5["d_model"]), 300.0, dtype=mx.float16)
    out = ff(h)
    assert out.dtype == mx.float32 and bool(mx.isfinite(out).all())
    assert float(mx.abs(out).max()) > 65504  # beyond float16's range, and kept


# Measured: 8-bit 43.8 dB, 4-bit 20.5 dB (random weights: a trained model's image is smoother than this noise).
@pytest.mark.parametrize("bits, min_psnr", [(8, 38.0), (4, 17.0)])
def test_quantized_sd3_generates_close_to_float(converted, bits, min_psnr):
    """The quantized folder loads strictly through the pipeline and generates; its image against the float model's
    (same seed) is the measured quality cost."""
    kwargs = dict(prompt=PROMPT, negative_prompt="blurry", width=64, height=64, steps=4, guidance=4.0, seed=3)
    reference = as_array(Pipeline(converted[None]).generate(**kwargs).images)
    ours = Pipeline(converted[bits])
    assert type(ours.model.unet.transformer_blocks[0].attn.to_q) is nn.QuantizedLinear
    image = as_array(ours.generate(**kwargs).images)
    value = psnr(image, reference, data_range=1.0)
    print(f"SD3 {bits}-bit vs float32: image PSNR {value:.1f} dB")
    assert value > min_psnr
