"""AUTOMATIC1111's model upscaling (1.10), transcribed as the reference for mlx-sd's: the network is spandrel's (the
loader A1111 runs), the rest follows A1111's code step by step in torch, numpy and Pillow:
`upscaler_utils.upscale_pil_patch` / `upscale_with_model` / `upscale_2`, `images.split_grid` / `combine_grid`,
`Upscaler.upscale` and the enlarging branch of `images.resize_image(0, ...)`.
"""

from __future__ import annotations

import importlib
import math
import warnings

import numpy as np
import torch
from PIL import Image

from oracles import _bare_package


def spandrel(architecture: str):
    """spandrel's module for an architecture ("ESRGAN", "Compact"), without its package __init__ (which imports
    every architecture, some needing torchvision)."""
    _bare_package("spandrel")
    return importlib.import_module(f"spandrel.architectures.{architecture}")


def spandrel_extra(architecture: str):
    """spandrel_extra_arches' module for an architecture ("SRFormer": the networks with restrictive licences that
    ComfyUI and chaiNNer add to spandrel's registry), without either package's __init__."""
    package = _bare_package("spandrel")
    descriptor = importlib.import_module("spandrel.__helpers.model_descriptor")
    for name in ("Architecture", "ImageModelDescriptor", "SizeRequirements", "StateDict"):
        setattr(package, name, getattr(descriptor, name))  # what its architectures import from spandrel's __init__
    _bare_package("spandrel_extra_arches")
    return importlib.import_module(f"spandrel_extra_arches.architectures.{architecture}")


def load_descriptor(state_dict: dict):
    """spandrel's ModelDescriptor for an ESRGAN-family, HAT, SwinIR, DAT, SCUNet, FBCNN, DnCNN, ... state dict (its
    canonicalisation and architecture detection; no two of these detect one file), spandrel_extra_arches' SRFormer
    registered after spandrel's own, as ComfyUI adds it."""
    _bare_package("spandrel")
    canonical = importlib.import_module("spandrel.__helpers.canonicalize").canonicalize_state_dict(state_dict)
    names = ("ESRGAN", "Compact", "HAT", "SPAN", "PLKSR", "DRCT", "MoSR", "RealCUGAN", "SAFMN", "Swin2SR", "RCAN",
             "SwinIR", "DAT", "SCUNet", "OmniSR", "RGT", "ATD", "FDAT",
             "MoESR", "SAFMNBCIE", "SwiftSRGAN", "DITN",
             "SeemoRe", "FBCNN", "NAFNet", "DRUNet", "DnCNN", "CRAFT", "DCTLSA")  # fmt: skip
    architectures = [spandrel(name).__dict__[f"{name}Arch"]() for name in names]
    architectures.append(spandrel_extra("SRFormer").SRFormerArch())
    for arch in architectures:
        if arch.detect(canonical):
            with warnings.catch_warnings():  # SwinIR's torch.meshgrid call without `indexing` (spandrel's, harmless)
                warnings.simplefilter("ignore", UserWarning)
                return arch.load(dict(canonical))  # SwinIR's loader renames keys in place
    raise ValueError("not an upscaler state dict mlx-sd runs")


def without_tiling(model, img: Image.Image) -> Image.Image:
    """`upscale_pil_patch` (`pil_image_to_torch_bgr`, the model, `torch_bgr_to_pil_image`)."""
    x = np.array(img.convert("RGB"))[:, :, ::-1]
    x = np.ascontiguousarray(np.transpose(x, (2, 0, 1))) / 255
    with torch.inference_mode():  # spandrel's descriptors return inference tensors: clamp in place inside
        x = torch.from_numpy(x).unsqueeze(0).to(dtype=torch.float32)
        out = model(x).squeeze(0).float().cpu().clamp_(0, 1).numpy()
    out = (255.0 * np.moveaxis(out, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(out, "RGB")


def split_grid(image, tile_w, tile_h, overlap):
    w, h = image.size
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    tiles = []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row_images = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row_images.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        tiles.append([y, tile_h, row_images])
    return tiles


def combine_grid(tiles, tile_h, image_w, image_h, overlap):
    def mask(r):
        return Image.fromarray((r * 255 / overlap).astype(np.uint8), "L")

    mask_w = mask(np.arange(overlap, dtype=np.float32).reshape((1, overlap)).repeat(tile_h, axis=0))
    mask_h = mask(np.arange(overlap, dtype=np.float32).reshape((overlap, 1)).repeat(image_w, axis=1))
    combined = Image.new("RGB", (image_w, image_h))
    for y, h, row in tiles:
        line = Image.new("RGB", (image_w, h))
        for x, w, tile in row:
            if x == 0:
                line.paste(tile, (0, 0))
                continue
            line.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            line.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(line, (0, 0))
            continue
        combined.paste(line.crop((0, 0, line.width, overlap)), (0, y), mask=mask_h)
        combined.paste(line.crop((0, overlap, line.width, h)), (0, y + overlap))
    return combined


def upscale_with_model(model, img, tile_size, tile_overlap):
    if tile_size <= 0:
        return without_tiling(model, img)
    grid = split_grid(img, tile_size, tile_size, tile_overlap)
    new_tiles = []
    for y, h, row in grid:
        new_row = []
        for x, w, tile in row:
            output = without_tiling(model, tile)
            scale = output.width // tile.width
            new_row.append([x * scale, w * scale, output])
        new_tiles.append([y * scale, h * scale, new_row])
    return combine_grid(new_tiles, tile_size * scale, img.width * scale, img.height * scale, tile_overlap * scale)


def upscale_2(model, img: Image.Image, tile_size: int, tile_overlap: int) -> Image.Image:
    """`upscale_2` with `tiled_upscale_2` (SwinIR's path): tiles averaged in torch, rounded once."""
    x = np.ascontiguousarray(np.transpose(np.array(img.convert("RGB"))[:, :, ::-1], (2, 0, 1))) / 255
    with torch.inference_mode():
        img = torch.from_numpy(x).to(dtype=torch.float32).unsqueeze(0)
        b, c, h, w = img.size()
        scale = model.scale
        tile_size = min(tile_size, h, w)
        if tile_size <= 0:
            output = model(img)
        else:
            stride = tile_size - tile_overlap
            h_idx_list = list(range(0, h - tile_size, stride)) + [h - tile_size]
            w_idx_list = list(range(0, w - tile_size, stride)) + [w - tile_size]
            result = torch.zeros(b, c, h * scale, w * scale, dtype=img.dtype)
            weights = torch.zeros_like(result)
            for h_idx in h_idx_list:
                for w_idx in w_idx_list:
                    out_patch = model(img[..., h_idx : h_idx + tile_size, w_idx : w_idx + tile_size])
                    cells = (..., slice(h_idx * scale, (h_idx + tile_size) * scale),
                             slice(w_idx * scale, (w_idx + tile_size) * scale))  # fmt: skip
                    result[cells].add_(out_patch)
                    weights[cells].add_(torch.ones_like(out_patch))
            output = result.div_(weights)
        arr = output.squeeze(0).float().cpu().clamp_(0, 1).numpy()
    arr = (255.0 * np.moveaxis(arr, 0, 2)).round().astype(np.uint8)[:, :, ::-1]
    return Image.fromarray(arr, "RGB")


def upscale(img, scale, do_upscale):
    """`Upscaler.upscale`."""
    dest_w = int((img.width * scale) // 8 * 8)
    dest_h = int((img.height * scale) // 8 * 8)
    for i in range(3):
        if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = (img.width, img.height)
        img = do_upscale(img)
        if shape == (img.width, img.height):
            break
    if img.width != dest_w or img.height != dest_h:
        img = img.resize((int(dest_w), int(dest_h)), resample=Image.LANCZOS)
    return img


def resize_image(im, w, h, upscaler, tile_size=192, tile_overlap=8):
    """`images.resize_image(0, im, w, h, upscaler)`: "None", "Lanczos", "Nearest" (`UpscalerLanczos` /
    `UpscalerNearest`: one resize by the scale per pass) or a spandrel model (SwinIR and ScuNET through `upscale_2`,
    the others through `upscale_with_model`)."""
    if upscaler == "None":
        return im.resize((w, h), resample=Image.LANCZOS)
    scale = max(w / im.width, h / im.height)
    if isinstance(upscaler, str):
        resample = Image.LANCZOS if upscaler == "Lanczos" else Image.NEAREST
        step = lambda img: img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)  # noqa: E731
    else:
        run = upscale_2 if upscaler.architecture.id in ("SwinIR", "SCUNet") else upscale_with_model
        step = lambda img: run(upscaler, img, tile_size, tile_overlap)  # noqa: E731
    if scale > 1.0:
        im = upscale(im, scale, step)
    if im.width != w or im.height != h:
        im = im.resize((w, h), resample=Image.LANCZOS)
    return im


def extras_upscale(image, do_upscale_1, do_upscale_2=None, mode=0, upscale_by=2.0, max_side_length=0, to_width=None,
                   to_height=None, crop=False, visibility=0.0):  # fmt: skip
    """`ScriptPostprocessingUpscale.process` with its `upscale` (`scripts/postprocessing_upscale.py`), the upscalers
    given as their `do_upscale`; returns (image, info)."""
    info = {}

    def one(do_upscale, mode, upscale_by, to_width, to_height, crop):
        if mode == 1:
            upscale_by = max(to_width / image.width, to_height / image.height)
            info["Postprocess upscale to"] = f"{to_width}x{to_height}"
        else:
            info["Postprocess upscale by"] = upscale_by
            if max_side_length != 0 and max(*image.size) * upscale_by > max_side_length:
                mode, crop = 1, False
                w, h = image.width * upscale_by, image.height * upscale_by
                if h > w and h > max_side_length:
                    w, h = max_side_length * w // h, max_side_length
                elif w > max_side_length:
                    w, h = max_side_length, max_side_length * h // w
                to_width, to_height = int(w), int(h)
                upscale_by = max(to_width / image.width, to_height / image.height)
                info["Max side length"] = max_side_length
        out = upscale(image, upscale_by, do_upscale)
        if mode == 1 and crop:
            cropped = Image.new("RGB", (to_width, to_height))
            cropped.paste(out, box=(to_width // 2 - out.width // 2, to_height // 2 - out.height // 2))
            out = cropped
            info["Postprocess crop to"] = f"{out.width}x{out.height}"
        return out

    result = one(do_upscale_1, mode, upscale_by, to_width, to_height, crop)
    if do_upscale_2 is not None and visibility > 0:
        second = one(do_upscale_2, mode, upscale_by, to_width, to_height, crop)
        result = Image.blend(result, second, visibility)
    return result, info
