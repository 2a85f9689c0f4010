"""Peak memory of a full-size generation (random weights): SDXL at 1024x1024, SD 1.5 / 2.1 at 512x512; memory plans.

    python benchmarks/memory.py --vae                         # SDXL base, 1024x1024, 1 step, float32 (this CPU)
    python benchmarks/memory.py --family sd1 --vae            # SD 1.5 at 512x512
    python benchmarks/memory.py --steps 2 --folder DIR        # keep the random model (~7 GB for SDXL) for reruns

A random-weight model of the published configs (convert/families.py; SDXL: base 1.0) is written as an mlx-sd model
folder: weights in float16 as `mlx-sd convert` stores them, the VAE in float32. Each measurement runs in a fresh
interpreter that loads the folder with `StableDiffusion(folder, dtype=...)` and generates through `Pipeline` with
classifier-free guidance (batch 2 through the UNet), Euler, low_memory=True (text encoders freed after encoding).
It reports MLX's allocator peak per stage (`mx.get_peak_memory`: text encoding + first UNet step, then the other
steps + VAE decode) and the process's peak RSS (VmHWM). MLX reads weights lazily, at their first use, so the
text encoders are gone before the UNet's weights are read.

From the measured activation peaks and exact parameter counts it then computes what float16 weights, the 8-bit
UNet (`mlx-sd convert --quantize 8`: mlx_sd/quantization.py's selection) and releasing the text encoders take, for a
16 GB Mac. SDXL at 1024 is ~9 TFLOP per guided step: one step is enough for a peak.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_sd  # noqa: F401  (first: OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
from mlx.utils import tree_flatten

GIB = 2**30

_CHILD = r"""
import json, sys, time
import mlx_sd
import mlx.core as mx
from mlx_sd.model import StableDiffusion
from mlx_sd.params import GenerationRequest
from mlx_sd.pipeline import Pipeline, Progress, Result

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

folder, dtype, steps, low_memory = sys.argv[1], getattr(mx, sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
size = int(sys.argv[5])
start = time.perf_counter()
pipeline = Pipeline(StableDiffusion(folder, dtype=dtype))
out = {"load_s": time.perf_counter() - start, "after_load_active": mx.get_active_memory()}
mx.reset_peak_memory()
request = GenerationRequest(prompt="a lighthouse on a cliff at dusk, oil painting", negative_prompt="blurry",
                            width=size, height=size, steps=steps, guidance=5.0, sampler="Euler", seed=0,
                            low_memory=low_memory)
marks = [time.perf_counter()]
for event in pipeline.stream(request):
    if isinstance(event, Progress):
        marks.append(time.perf_counter())
        if event.step == 1:
            out["text_and_step1_peak"] = mx.get_peak_memory()
            out["weights_resident_at_step1"] = mx.get_active_memory()
            mx.reset_peak_memory()
    elif isinstance(event, Result):
        out["rest_and_decode_peak"] = mx.get_peak_memory()
        out["timings"] = event.timings
# step i's time: between Progress events (the first also holds the text encoding, subtracted)
out["step_s"] = [b - a for a, b in zip(marks, marks[1:])]
out["step_s"][0] -= out["timings"]["text"]
out["peak_rss"] = hwm()
print(json.dumps(out))
"""

_VAE_CHILD = r"""
import json, sys
import mlx_sd
import mlx.core as mx
from mlx_sd.components import load_component
from mlx_sd.tiling import tiled_decode
vae = load_component(sys.argv[1], mx.float32)
mx.eval(vae.parameters())
z = mx.random.normal((1, int(sys.argv[2]) // 8, int(sys.argv[2]) // 8, 4), key=mx.random.key(0))
mx.eval(z)
out = {}
for name, decode in (("whole", vae.decode), ("tiled", lambda z: tiled_decode(vae, z))):
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(decode(z))
    out[name] = mx.get_peak_memory() - base
print(json.dumps(out))
"""


SIZES = {"sd1": 512, "sd2": 512, "sdxl": 1024}  # SD 2.1-base's size for sd2


def published_configs(family: str) -> dict:
    """Our configs of the published components of `family` (SDXL: base 1.0)."""
    from mlx_sd_convert.diffusers import clip_config, unet_config, vae_config
    from mlx_sd_convert.families import family_config

    configs = {
        "unet": unet_config(family_config(family, "unet")),
        "vae": vae_config(family_config(family, "vae")),
        "text_encoder": clip_config(family_config(family, "text_encoder"), with_projection=False),
    }
    if family == "sdxl":
        configs["text_encoder_2"] = clip_config(family_config(family, "text_encoder_2"), with_projection=True)
    return configs


def write_random_model(folder: Path, family: str) -> None:
    """A full-size model folder with random weights (float16; the VAE float32, as the converter writes)."""
    from mlx_sd.components import build, save_component
    from mlx_sd.model import MANIFEST, ModelInfo
    from mlx_sd.tokenizer import CLIPTokenizer
    from mlx_sd_convert.families import family_config

    for name, config in published_configs(family).items():
        dtype = mx.float32 if name == "vae" else mx.float16
        shapes = {k: v.shape for k, v in tree_flatten(build(config).parameters())}  # lazy init: nothing allocated
        keys = mx.random.split(mx.random.key(len(name)), len(shapes))
        weights = {}
        for key, (k, shape) in zip(keys, sorted(shapes.items())):
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            weights[k] = (mx.random.normal(shape, key=key) * fan_in**-0.5).astype(dtype)
            mx.eval(weights[k])  # one float32 draw at a time
        save_component(folder / name, config, weights)
        del weights
        mx.clear_cache()
    CLIPTokenizer.bundled(pad_token_id=0 if family == "sd2" else 49407).save(folder / "tokenizer")
    if family == "sdxl":
        CLIPTokenizer.bundled(pad_token_id=0).save(folder / "tokenizer_2")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(family_config(family, "scheduler")))
    info = ModelInfo(family=family, prediction_type="epsilon", name=f"{family}-random", dtype="float16",
                     force_zeros_for_empty_prompt=family == "sdxl")  # fmt: skip
    (folder / MANIFEST).write_text(info.to_json())


def quantize_unet(folder: Path, out: Path, bits: int) -> None:
    """`out`: the model folder with its UNet quantized to `bits` bits as `mlx-sd convert --quantize` stores it."""
    import shutil

    from mlx_sd.components import WEIGHTS_FILE, load_component, write_config
    from mlx_sd.quantization import QuantizationConfig, quantize_model

    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(WEIGHTS_FILE), dirs_exist_ok=True)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if (folder / name).is_dir():
            shutil.copy(folder / name / WEIGHTS_FILE, out / name / WEIGHTS_FILE)
    unet = load_component(folder / "unet")  # float16, read lazily
    quantization = QuantizationConfig(bits=bits)
    quantize_model("unet", unet, quantization)  # nn.quantize: the selected Linear layers, from their weights
    weights = dict(tree_flatten(unet.parameters()))
    for value in weights.values():
        mx.eval(value)  # one layer at a time
    write_config(out / "unet", unet.config, quantization)
    mx.save_safetensors(str(out / "unet" / WEIGHTS_FILE), weights)


def weight_bytes(family: str) -> dict[str, dict[str, float]]:
    """Bytes of each component's weights in float32, float16 and (UNet, text encoders) 8-bit quantized."""
    from mlx_sd.components import build, kind_of
    from mlx_sd.quantization import QuantizationConfig, quantized_layers

    q8 = QuantizationConfig(bits=8)
    out = {}
    for name, config in published_configs(family).items():
        model = build(config)
        params = dict(tree_flatten(model.parameters()))
        total = sum(v.size for v in params.values())
        layers = set(quantized_layers(kind_of(config), model, q8)) if name != "vae" else set()
        in_quantized = sum(v.size for k, v in params.items() if k.rsplit(".", 1)[0] in layers and k.endswith("weight"))
        # 8-bit affine: 1 byte per weight + a float16 scale and bias per group of 64; the rest stays float16.
        q8_bytes = in_quantized * (1 + 4 / q8.group_size) + (total - in_quantized) * 2
        out[name] = {"params": total, "float32": total * 4, "float16": total * 2, "q8": q8_bytes,
                     "quantized_share": in_quantized / total}  # fmt: skip
    return out


def run(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement failed (exit {done.returncode}): {done.stdout[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def plan(weights: dict, measured: dict, vae: dict | None) -> list[tuple[str, float]]:
    """Peak memory (bytes) of a generation for each plan, from exact weight sizes and the measured
    activations. The UNet stays resident while the VAE decodes, so a plan's peak is its resident weights plus the
    larger of the UNet step's activations (halved in float16) and the decode's (VAE weights and activations, float32
    as the pipeline runs the VAE)."""
    resident = measured["weights_resident_at_step1"]  # the measured UNet's weights (text encoders released)
    unet_acts = measured["text_and_step1_peak"] - resident
    decode = measured["rest_and_decode_peak"] - resident
    tiled = decode - vae["whole"] + vae["tiled"] if vae else None
    text32 = sum(w["float32"] for name, w in weights.items() if name.startswith("text_encoder"))
    u32, u16, u8 = (weights["unet"][k] for k in ("float32", "float16", "q8"))
    rows = [
        ("float32, text encoders kept", u32 + text32 + max(unet_acts, decode)),
        ("float32, text encoders released", u32 + max(unet_acts, decode)),
        ("float16, text encoders kept", u16 + text32 / 2 + max(unet_acts / 2, decode)),
        ("float16, text encoders released", u16 + max(unet_acts / 2, decode)),
    ]
    if tiled is not None:
        rows += [
            ("float16, text encoders released, tiled VAE", u16 + max(unet_acts / 2, tiled)),
            ("8-bit UNet, text encoders released, tiled VAE", u8 + max(unet_acts / 2, tiled)),
        ]
    else:
        rows.append(("8-bit UNet, text encoders released", u8 + max(unet_acts / 2, decode)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl", choices=sorted(SIZES))
    parser.add_argument("--size", type=int, help="image size in pixels (default: 1024 for SDXL, else 512)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 on CPU; float16 on a Mac)")
    parser.add_argument("--folder", type=Path, help="keep / reuse the random model folder here")
    parser.add_argument("--vae", action="store_true", help="also measure the VAE decode alone, whole and tiled")
    parser.add_argument("--unet-bits", type=int, choices=(8,), help="run with the 8-bit UNet (needs ~6 GB, not ~14)")
    options = parser.parse_args()
    family, px = options.family, options.size or SIZES[options.family]

    with tempfile.TemporaryDirectory(prefix="mlx-sd-memory-") as tmp:
        folder = options.folder or Path(tmp) / f"{family}-random"
        if not (folder / "mlx_sd.json").is_file():
            start = time.perf_counter()
            write_random_model(folder, family)
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            print(f"wrote a random {family} folder: {size / GIB:.2f} GiB in {time.perf_counter() - start:.0f} s")
        if options.unet_bits:
            quantized = folder.with_name(f"{folder.name}-q{options.unet_bits}")
            if not (quantized / "mlx_sd.json").is_file():
                quantize_unet(folder, quantized, options.unet_bits)
            folder = quantized
        measured = run(_CHILD, folder, options.dtype, options.steps, 1, px)
        vae = run(_VAE_CHILD, folder / "vae", px) if options.vae else None

    weights = weight_bytes(family)
    print(json.dumps({"measured": measured, "vae_decode_activation_peak": vae}, indent=2))
    print("\nweights (GiB):  " + ", ".join(
        f"{n} {w['float32'] / GIB:.2f} fp32 / {w['float16'] / GIB:.2f} fp16" for n, w in weights.items()))  # fmt: skip
    unet = weights["unet"]
    print(f"UNet 8-bit: {unet['q8'] / GIB:.2f} GiB ({unet['quantized_share']:.0%} of its parameters quantized)")
    unet_kind = f"{options.unet_bits}-bit UNet" if options.unet_bits else "float16-stored UNet"
    print(
        f"\nmeasured ({options.dtype} compute, {unet_kind}, {options.steps} step(s), {px}x{px}, guidance, low_memory):"
    )
    resident = measured["weights_resident_at_step1"]
    print(f"  weights resident during the UNet steps:      {resident / GIB:.2f} GiB (text encoders released)")
    print(f"  peak during text encoding + first UNet step: {measured['text_and_step1_peak'] / GIB:.2f} GiB")
    print(f"  peak during the other steps + VAE decode:    {measured['rest_and_decode_peak'] / GIB:.2f} GiB")
    print(f"  process peak RSS:                            {measured['peak_rss'] / GIB:.2f} GiB")
    steps = ", ".join(f"{t:.0f}" for t in measured["step_s"])
    timings = measured["timings"]
    print(f"  time: text {timings['text']:.0f} s, UNet steps {steps} s, decode {timings['decode']:.0f} s")
    if vae:
        print(
            f"  VAE decode activations at {px}: whole {vae['whole'] / GIB:.2f} GiB, tiled {vae['tiled'] / GIB:.2f} GiB"
        )
    print(f"\npeak of a {px}x{px} generation by plan (GiB; activations from this run, float16 ones halved):")
    for label, value in plan(weights, measured, vae):
        print(f"  {label:48s} {value / GIB:6.2f}")


if __name__ == "__main__":
    main()
