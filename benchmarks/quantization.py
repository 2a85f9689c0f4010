"""What 8-bit and 4-bit quantization costs: size, output error and speed of each quantized component (random weights).

    python benchmarks/quantization.py                      # SD1.5 UNet (64x64 latents, batch 2) and CLIP-L
    python benchmarks/quantization.py --family sd2 --seeds 3
    python benchmarks/quantization.py --family sd3 --layers 4 --latent 32 --simulate   # MMDiT and T5, 4 blocks each

Full-size components of the published configs (convert/families.py) with random weights (normal, std fan_in^-0.5
per layer, as torch's default initialisers scale them), quantized exactly as `mlx-sd convert --quantize N` does
(mlx_sd/quantization.py's layer selection, MLX affine quantization, group size 64), run on the same inputs as the
float32 model. Reports weight bytes, the output's RMS error relative to the float output's RMS, the PSNR of the output
over the float output's range, and the time of one call (float32 vs quantized, on this backend). Random weights
are not trained ones: read the errors as the cost the quantization grid imposes on weights of this scale.

SD3 (`--family sd3`): the MMDiT of `--transformer` (one image, 333 text tokens) and the T5-XXL encoder (256 tokens),
optionally cut to `--layers` blocks each (full width, less depth: the full models hold 2-8B and 4.7B float32 weights).
T5's query weights get transformers' extra d_kv^-0.5 (T5 folds the attention scale into them; without it random
attention logits saturate). `--simulate` runs each quantized layer as a float Linear holding its dequantized weights:
the same values, so the same errors to rounding, at BLAS speed (MLX's CPU quantized matmul is ~40x slower than
float32 BLAS); its quantized times are then float times.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import mlx_sd  # noqa: F401  (first: OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_sd.components import build, kind_of
from mlx_sd.quantization import QuantizationConfig, quantize_model
from mlx_sd_convert.diffusers import clip_config, mmdit_config, t5_config, unet_config
from mlx_sd_convert.families import SD3_TRANSFORMERS, family_config

MIB = 2**20


def random_model(config, seed: int):
    model = build(config)
    shapes = sorted((k, v.shape) for k, v in tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = []
    for key, (name, shape) in zip(keys, shapes):
        std = (math.prod(shape[1:]) if len(shape) > 1 else 1) ** -0.5
        if name.endswith("SelfAttention.q.weight"):  # T5: the attention's 1/sqrt(d_kv) lives in q's weights
            std *= config.d_kv**-0.5
        weights.append((name, mx.random.normal(shape, key=key) * std))
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def nbytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def timed(call, model, repeats: int):
    mx.eval(call(model))  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call(model)
        mx.eval(out)
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def dequantize_layers(model) -> None:
    """Replace every QuantizedLinear with a float Linear holding its dequantized weights (the same values)."""
    layers = []
    for path, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            weight = mx.dequantize(m.weight, m.scales, m.biases, group_size=m.group_size, bits=m.bits)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in m)
            layer.update({"weight": weight, **({"bias": m.bias} if "bias" in m else {})})
            layers.append((path, layer))
    model.update_modules(tree_unflatten(layers))


def compare(name: str, config, call, seeds: int, repeats: int, simulate: bool = False) -> list[dict]:
    rows = []
    for seed in range(seeds):
        reference = random_model(config, seed)
        expected, float_s = timed(call, reference, repeats)
        float_bytes = nbytes(reference) // 2  # float32 here, float16 as the converter stores it
        expected = np.array(expected, dtype=np.float64)
        for bits in (8, 4):
            model = random_model(config, seed)
            quantize_model(kind_of(config), model, QuantizationConfig(bits=bits))
            stored = _stored_bytes(model)
            if simulate:
                dequantize_layers(model)
            got, quant_s = timed(call, model, repeats)
            err = np.array(got, dtype=np.float64) - expected
            rms = math.sqrt(np.mean(err**2)) / math.sqrt(np.mean(expected**2))
            peak = float(expected.max() - expected.min())
            psnr = 20 * math.log10(peak) - 10 * math.log10(np.mean(err**2))
            rows.append({"component": name, "seed": seed, "bits": bits, "float16_mib": float_bytes / MIB,
                         "quantized_mib": stored / MIB, "rel_rms": rms, "psnr_db": psnr,
                         "float32_s": float_s, "quantized_s": quant_s})  # fmt: skip
            r = rows[-1]
            sizes = f"{r['float16_mib']:6.0f} -> {r['quantized_mib']:6.0f} MiB"
            print(f"{name:12s} seed {seed} {bits}-bit: {sizes}, RMS error {rms:.2%}, PSNR {psnr:.1f} dB, "
                  f"{float_s:.2f} s -> {quant_s:.2f} s", flush=True)  # fmt: skip
            del model
        del reference
        mx.clear_cache()
    return rows


def _stored_bytes(model) -> int:
    """Bytes as the converter stores a quantized model: packed weights, float16 scales/biases and float layers."""
    total = 0
    for _, v in tree_flatten(model.parameters()):
        total += v.nbytes if v.dtype == mx.uint32 else v.size * 2
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl", "sd3"))
    parser.add_argument("--transformer", default="sd3-medium", choices=sorted(SD3_TRANSFORMERS), help="SD3's MMDiT")
    parser.add_argument("--layers", type=int, help="SD3: blocks of the MMDiT and of T5 (default: all)")
    parser.add_argument("--simulate", action="store_true", help="run quantized layers as dequantized float ones")
    parser.add_argument("--latent", type=int, default=64, help="UNet latent size (64 = 512x512 pixels)")
    parser.add_argument("--seeds", type=int, default=2, help="random models per component")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.family == "sd3":
        rows = compare_sd3(args)
    else:
        rows = compare_unet_and_clip(args)
    if args.out:
        with open(args.out, "w") as f:
            sd3 = {"transformer": args.transformer, "layers": args.layers} if args.family == "sd3" else {}
            run = {"family": args.family, "latent": args.latent, **sd3, "simulated": args.simulate, "rows": rows}
            json.dump(run, f, indent=1)


def compare_sd3(args) -> list[dict]:
    depth = {} if args.layers is None else {"num_layers": args.layers}
    mmdit_cfg = mmdit_config({**SD3_TRANSFORMERS[args.transformer], **depth})
    t5_cfg = t5_config({**family_config("sd3", "text_encoder_3"), **depth})
    k1, k2, k3 = mx.random.split(mx.random.key(1234), 3)
    x = mx.random.normal((1, args.latent, args.latent, mmdit_cfg.in_channels), key=k1)
    context = mx.random.normal((1, 77 + 256, mmdit_cfg.joint_attention_dim), key=k2)  # CLIP rows, then T5's
    pooled = mx.random.normal((1, mmdit_cfg.pooled_projection_dim), key=k3)
    ids = mx.array(np.random.default_rng(0).integers(1, 32000, (1, 256)), dtype=mx.int32)
    call = lambda m: m(x, mx.array([500.0]), context, pooled)  # noqa: E731
    rows = compare("mmdit", mmdit_cfg, call, args.seeds, args.repeats, args.simulate)
    return rows + compare("t5", t5_cfg, lambda m: m(ids), args.seeds, args.repeats, args.simulate)


def compare_unet_and_clip(args) -> list[dict]:

    unet_cfg = unet_config(family_config(args.family, "unet"))
    text_cfg = clip_config(family_config(args.family, "text_encoder"), with_projection=False)
    key = mx.random.key(1234)
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((2, args.latent, args.latent, unet_cfg.in_channels), key=k1)
    context = mx.random.normal((2, 77, unet_cfg.cross_attention_dim), key=k2)
    t = mx.array([981.0, 501.0])
    extra = {}
    if unet_cfg.addition_time_embed_dim:  # SDXL: pooled text embedding and time ids
        extra = {"pooled": mx.random.normal((2, 1280), key=k3),
                 "time_ids": mx.array([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)}  # fmt: skip
    ids = mx.array(np.random.default_rng(0).integers(1, 49406, (2, 77)), dtype=mx.int32)

    rows = compare("unet", unet_cfg, lambda m: m(x, t, context, **extra), args.seeds, args.repeats, args.simulate)
    text = lambda m: m(ids).last_hidden_state  # noqa: E731
    return rows + compare("text_encoder", text_cfg, text, args.seeds, args.repeats, args.simulate)


if __name__ == "__main__":
    main()
