"""3x3 convolutions at the shapes Stable Diffusion runs, side by side with torch's conv2d (oneDNN).

    python benchmarks/convolutions.py            # SD1.5 UNet (batch 2) and VAE decoder (batch 1) shapes at 512x512

Times mlx-sd's CPU Winograd convolution (`winograd.conv3x3_winograd`, F(4x4, 3x3)), its tap convolution
(`layers.conv3x3_taps`: nine products over the padded input's rows) and MLX's own conv as is (it unfolds the input
into a 9x buffer; mlx-sd's row strips for large unfolds are not applied here) in one worker process and torch (NCHW,
as diffusers calls it) in another, asked in turn after a warm-up round; prints medians, GFLOP/s and ratios to torch.
"""

from __future__ import annotations

import argparse

from components import KernelSide, Worker, median_seconds

# (name, B, H, W, C in, C out)
SHAPES = [
    ("unet 64x64, 320 -> 320", 2, 64, 64, 320, 320),
    ("unet 64x64, 640 -> 320", 2, 64, 64, 640, 320),
    ("unet 32x32, 640 -> 640", 2, 32, 32, 640, 640),
    ("vae 64x64, 512 -> 512", 1, 64, 64, 512, 512),
    ("vae 128x128, 512 -> 512", 1, 128, 128, 512, 512),
    ("vae 256x256, 256 -> 256", 1, 256, 256, 256, 256),
    ("vae 512x512, 256 -> 128", 1, 512, 512, 256, 128),
    ("vae 512x512, 128 -> 128", 1, 512, 512, 128, 128),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    mlx, torch = Worker("mlx"), Worker("torch")
    sides = {
        "winograd": KernelSide(mlx, "winograd"),
        "taps": KernelSide(mlx, "taps"),
        "unfold": KernelSide(mlx, "unfold"),
        "torch": KernelSide(torch, "torch"),
    }
    try:
        for name, B, H, W, C, O in SHAPES:
            med = median_seconds(sides, args.repeats, "conv", warmup=True, B=B, H=H, W=W, C=C, O=O)
            gflop = 2 * B * H * W * 9 * C * O / 1e9
            cols = "  ".join(f"{k} {v:6.3f} s {gflop / v:4.0f} GF/s ({v / med['torch']:.2f}x)" for k, v in med.items())
            print(f"{name:26s} {cols}", flush=True)
    finally:
        mlx.close()
        torch.close()


if __name__ == "__main__":
    main()
