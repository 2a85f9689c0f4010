"""Model upscalers (A1111's "R-ESRGAN 4x+", "General 4xV3", "SwinIR 4x", "DAT x4", "ScuNET"; Real_HAT_GAN_SRx4, a
48-channel SPAN, a RealPLKSR, DRCT, MoSR, Real-CUGAN up2x, SAFMN, Swin2SR, RCAN,
OmniSR, RGT, ATD, FDAT, MoESR, Swift-SRGAN, DITN, SeemoRe, SRFormer; the 1x restoration networks FBCNN, DnCNN,
DRUNet, NAFNet) beside spandrel/torch.

    python benchmarks/upscalers.py                  # one 192-pixel tile (A1111's tile) of each, 3 rounds
    python benchmarks/upscalers.py --tile 96 --arch esrgan,swinir --repeats 5

Full-size random-weight networks built by spandrel (the loader A1111 1.8+ and ComfyUI run, installed with the test
oracles), written as .pth and read by mlx-sd's reader, so both sides run the same weights on the same tile: mlx-sd
in one worker process, torch in another, asked in turn after an untimed warm-up. Prints each side's median seconds,
its FLOP rate (FLOPs counted by torch's `FlopCounterMode`) and the ratio to torch. `--device gpu` compares MLX's GPU
with torch CUDA / MPS (mlx-sd runs ESRGAN in float16 there with `--dtype float16`; SwinIR, DAT, ScuNET and HAT always
in float32). The tile is padded where a network needs it (ScuNET: to a multiple of 64; use --tile 128 for it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from components import Worker, median_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    every = "esrgan,compact,swinir,dat,scunet,hat,span,plksr,drct,mosr,cugan,safmn,swin2sr,rcan,omnisr,rgt,atd,fdat,"
    every += "moesr,swiftsrgan,ditn,seemore,srformer,fbcnn,dncnn,drunet,nafnet"
    p.add_argument("--arch", default=every, help=f"comma-separated, of {every}")
    p.add_argument("--tile", type=int, default=192, help="tile side in pixels (A1111's default: 192)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = p.parse_args()
    mlx, torch = Worker("mlx", args.device, args.dtype), Worker("torch", args.device, "float32")
    try:
        with tempfile.TemporaryDirectory() as folder:
            for arch in args.arch.split(","):
                path = str(Path(folder) / f"{arch}.pth")
                flops = torch("upscaler_setup", arch=arch, path=path, tile=args.tile)["flops"]
                sides = {"mlx-sd": mlx, "torch": torch}
                med = median_seconds(sides, args.repeats, "upscaler", warmup=True, path=path, tile=args.tile)
                cols = "  ".join(f"{k} {v:7.2f} s {flops / v / 1e9:4.0f} GF/s" for k, v in med.items())
                print(f"{arch:8s} {args.tile}x{args.tile} tile, {flops / 1e12:.2f} TFLOP: {cols}  "
                      f"(mlx-sd / torch {med['mlx-sd'] / med['torch']:.2f}x)", flush=True)  # fmt: skip
    finally:
        mlx.close()
        torch.close()


if __name__ == "__main__":
    main()
