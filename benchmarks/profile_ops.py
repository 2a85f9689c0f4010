"""Where one mlx-sd UNet step or VAE decode spends its time, by operation type (random weights, no torch needed).

    python benchmarks/profile_ops.py                    # SD1.5 UNet, guided step (batch 2) at 512x512
    python benchmarks/profile_ops.py --family sd2 --size 768
    python benchmarks/profile_ops.py --component vae --size 512
    python benchmarks/profile_ops.py --torch            # the same step in diffusers, by torch's profiler

Every Conv2d, Linear, LayerNorm, GroupNorm, attention and activation call is evaluated on its own and timed; the
time of nested calls is subtracted from their parents ("self" time). Evaluating op by op removes MLX's overlap of
graph building and computing, so the total is a little above an unprofiled step, which is printed first. With
--torch, diffusers' UNet or VAE of the same configuration runs under torch.profiler instead, grouped by aten operation
(self CPU time), in a process without mlx_sd's BLAS preload and malloc tuning, as benchmarks/components.py runs it.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

# isort: off
import mlx_sd  # noqa: F401  (before mlx.core: BLAS preload)
import mlx.core as mx
import mlx.nn as nn

# isort: on
from mlx_sd import cpu_kernels
from mlx_sd.models import layers, unet, vae
from mlx_sd_convert.diffusers import unet_config, vae_config
from mlx_sd_convert.families import family_config


class SelfTimer:
    """Wraps callables so that each call is evaluated and its self time accumulated under a name."""

    def __init__(self):
        self.totals = collections.Counter()
        self.calls = collections.Counter()
        self._stack = [0.0]

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            mx.eval([a for a in args if isinstance(a, mx.array)])
            self._stack.append(0.0)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            mx.eval(out)
            elapsed = time.perf_counter() - start
            children = self._stack.pop()
            self.totals[name] += elapsed - children
            self.calls[name] += 1
            self._stack[-1] += elapsed
            return out

        return timed


def instrument(timer: SelfTimer) -> None:
    # mlx-sd's subclasses too: the strip convolutions and row-block LayerNorms bypass their parents' __call__.
    for cls in (nn.Conv2d, layers.Conv2d, nn.Linear, nn.LayerNorm, layers.LayerNorm, layers.GroupNorm):
        cls.__call__ = timer.wrap(cls.__name__, cls.__call__)
    layers.attention = timer.wrap("attention", layers.attention)
    # the output projections seeded with their residual call addmm directly, not a Linear
    layers.linear_plus = unet.linear_plus = timer.wrap("Linear", layers.linear_plus)
    unet.geglu = timer.wrap("geglu", unet.geglu)
    cpu_kernels.geglu = timer.wrap("geglu", cpu_kernels.geglu)
    cpu_kernels.product = timer.wrap("Linear", cpu_kernels.product)  # numba's path: products whose bias it adds
    layers.silu = timer.wrap("silu", layers.silu)
    layers.upsample_nearest = timer.wrap("upsample", layers.upsample_nearest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    p.add_argument("--component", default="unet", choices=["unet", "vae"])
    p.add_argument("--size", type=int, default=512, help="image size in pixels")
    p.add_argument("--torch", action="store_true", help="profile diffusers' model with torch.profiler instead")
    args = p.parse_args()
    latent = args.size // 8
    if args.torch:
        profile_torch(args.family, args.component, latent)
        return
    key = mx.random.key(0)
    if args.component == "unet":
        config = family_config(args.family, "unet")
        model = unet.UNet2DConditionModel(unet_config(config))
        x = mx.random.normal((2, latent, latent, 4), key=key)
        # as the pipeline passes it: the text's keys and values are computed at the first (warm-up) step and kept
        context = layers.TextContext(mx.random.normal((2, 77, config["cross_attention_dim"]), key=key))
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            extra = {"pooled": mx.zeros((2, 1280)), "time_ids": mx.full((2, 6), float(args.size))}

        def run():
            return model(x, mx.array([500.0, 500.0]), context, **extra)
    else:
        model = vae.AutoencoderKL(vae_config(family_config(args.family, "vae")))
        z = mx.random.normal((1, latent, latent, 4), key=key)

        def run():
            return model.decode(z)

    mx.eval(model.parameters())
    mx.eval(run())  # warm-up: compiled kernels, allocator
    start = time.perf_counter()
    mx.eval(run())
    print(f"{args.family} {args.component} {args.size}x{args.size}: unprofiled {time.perf_counter() - start:.2f} s")
    timer = SelfTimer()
    instrument(timer)
    start = time.perf_counter()
    mx.eval(run())
    total = time.perf_counter() - start
    print(f"profiled {total:.2f} s (self time per operation type)")
    for name, seconds in timer.totals.most_common():
        print(f"  {name:10s} {seconds:7.2f} s {100 * seconds / total:5.1f} %  {timer.calls[name]:4d} calls")
    rest = total - sum(timer.totals.values())
    print(f"  {'other':10s} {rest:7.2f} s {100 * rest / total:5.1f} %  (residual adds, concatenation, embeddings)")


def profile_torch(family: str, component: str, latent: int) -> None:
    if os.environ.get("MLX_SD_BLAS") != "mlx" or os.environ.get("MLX_SD_MALLOC") != "0":
        # mlx_sd (imported above) preloaded a BLAS, which would capture torch's BLAS calls: start afresh without it.
        env = {**os.environ, "MLX_SD_BLAS": "mlx", "MLX_SD_MALLOC": "0"}
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], env)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    config = family_config(family, component)
    if component == "unet":
        model = UNet2DConditionModel(**config).eval()
        x = torch.randn(2, config["in_channels"], latent, latent)
        context = torch.randn(2, 77, config["cross_attention_dim"])
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            size = float(latent * 8)
            extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280), "time_ids": torch.full((2, 6), size)}}

        def run():
            return model(x, torch.tensor([500.0, 500.0]), context, **extra)
    else:
        model = AutoencoderKL(**config).eval()
        z = torch.randn(1, config["latent_channels"], latent, latent)

        def run():
            return model.decode(z)

    run()  # warm-up
    start = time.perf_counter()
    run()
    print(f"{family} diffusers {component} {latent * 8}x{latent * 8}: unprofiled {time.perf_counter() - start:.2f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"profiled {total:.2f} s (self CPU time per aten operation)")
    for e in events[:12]:
        seconds = e.self_cpu_time_total / 1e6
        print(f"  {e.key:48s} {seconds:7.2f} s {100 * seconds / total:5.1f} %  {e.count:4d} calls")


if __name__ == "__main__":
    main()
