"""Attention kernels at the shapes Stable Diffusion runs, side by side with torch's scaled_dot_product_attention.

    python benchmarks/attention.py               # SD1.5/SD2.1/SDXL UNet and VAE shapes at 512x512, 5 repeats
    python benchmarks/attention.py --large       # adds 1024x1024 shapes (16,384 tokens)

Times mlx-sd's "blocked" CPU path and MLX's "fused" kernel in one worker process and torch (as diffusers calls it)
in another, asked in turn (A, B, C, C, B, A, ...); prints medians and ratios to torch.
"""

from __future__ import annotations

import argparse

from components import KernelSide, Worker, median_seconds

# (name, B, N, M, C, heads)
SHAPES = [
    ("unet self 64x64, SD1 (8 x 40)", 2, 4096, 4096, 320, 8),
    ("unet self 64x64, SD2 (5 x 64)", 2, 4096, 4096, 320, 5),
    ("unet cross 64x64 (77 tokens)", 2, 4096, 77, 320, 8),
    ("unet self 32x32, SD1 (8 x 80)", 2, 1024, 1024, 640, 8),
    ("unet self 32x32, SDXL (10 x 64)", 2, 1024, 1024, 640, 10),
    ("unet self 16x16, SD2/SDXL (20 x 64)", 2, 256, 256, 1280, 20),
    ("unet cross 16x16, SDXL (20 x 64, 77 tokens)", 2, 256, 77, 1280, 20),
    ("vae mid 64x64 (1 x 512)", 1, 4096, 4096, 512, 1),
]
LARGE = [
    ("unet self 128x128, SD1 (8 x 40)", 2, 16384, 16384, 320, 8),
    ("vae mid 128x128 (1 x 512)", 1, 16384, 16384, 512, 1),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--large", action="store_true", help="also 1024x1024 shapes (~1 GB of scores per head)")
    p.add_argument("--no-fused", action="store_true", help="skip MLX's fused kernel (slow on x86 CPUs)")
    args = p.parse_args()
    mlx, torch = Worker("mlx"), Worker("torch")
    sides = {"blocked": KernelSide(mlx, "blocked"), "torch": KernelSide(torch, "torch")}
    if not args.no_fused:
        sides["fused"] = KernelSide(mlx, "fused")
    try:
        for name, B, N, M, C, heads in SHAPES + (LARGE if args.large else []):
            med = median_seconds(sides, args.repeats, "attention", B=B, N=N, M=M, C=C, heads=heads)
            cols = "  ".join(f"{k} {v:7.3f} s ({v / med['torch']:.2f}x)" for k, v in med.items())
            print(f"{name:34s} {cols}", flush=True)
    finally:
        mlx.close()
        torch.close()


if __name__ == "__main__":
    main()
