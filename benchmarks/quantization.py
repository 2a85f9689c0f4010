"""What 8-bit and 4-bit quantization costs: size, output error and speed of each quantized component (random weights).

    python benchmarks/quantization.py                      # SD1.5 UNet (64x64 latents, batch 2) and CLIP-L
    python benchmarks/quantization.py --family sd2 --seeds 3

Full-size components of the published configs (convert/families.py) with random weights (normal, std fan_in^-0.5
per layer, as torch's default initialisers scale them), quantized exactly as `mlx-sd convert --quantize N` does
(mlx_sd/quantization.py's layer selection, MLX affine quantization, group size 64), run on the same inputs as the
float32 model. Reports weight bytes, the output's RMS error relative to the float output's RMS, the PSNR of the output
over the float output's range, and the time of one call (float32 vs quantized, on this backend). Random weights
are not trained ones: read the errors as the cost the quantization grid imposes on weights of this scale.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import mlx_sd  # noqa: F401  (first: OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_sd.components import build, kind_of
from mlx_sd.quantization import QuantizationConfig, quantize_model
from mlx_sd_convert.diffusers import clip_config, unet_config
from mlx_sd_convert.families import family_config

MIB = 2**20


def random_model(config, seed: int):
    model = build(config)
    shapes = sorted((k, v.shape) for k, v in tree_flatten(model.parameters()))
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    weights = []
    for key, (name, shape) in zip(keys, shapes):
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        weights.append((name, mx.random.normal(shape, key=key) * fan_in**-0.5))
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


def compare(name: str, config, call, seeds: int, repeats: int) -> list[dict]:
    rows = []
    for seed in range(seeds):
        reference = random_model(config, seed)
        expected, float_s = timed(call, reference, repeats)
        float_bytes = nbytes(reference) // 2  # float32 here, float16 as the converter stores it
        expected = np.array(expected, dtype=np.float64)
        for bits in (8, 4):
            model = random_model(config, seed)
            quantize_model(kind_of(config), model, QuantizationConfig(bits=bits))
            got, quant_s = timed(call, model, repeats)
            err = np.array(got, dtype=np.float64) - expected
            rms = math.sqrt(np.mean(err**2)) / math.sqrt(np.mean(expected**2))
            peak = float(expected.max() - expected.min())
            psnr = 20 * math.log10(peak) - 10 * math.log10(np.mean(err**2))
            rows.append({"component": name, "seed": seed, "bits": bits, "float16_mib": float_bytes / MIB,
                         "quantized_mib": _stored_bytes(model) / MIB, "rel_rms": rms, "psnr_db": psnr,
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
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2", "sdxl"))
    parser.add_argument("--latent", type=int, default=64, help="UNet latent size (64 = 512x512 pixels)")
    parser.add_argument("--seeds", type=int, default=2, help="random models per component")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

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

    rows = compare("unet", unet_cfg, lambda m: m(x, t, context, **extra), args.seeds, args.repeats)
    rows += compare("text_encoder", text_cfg, lambda m: m(ids).last_hidden_state, args.seeds, args.repeats)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"family": args.family, "latent": args.latent, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
