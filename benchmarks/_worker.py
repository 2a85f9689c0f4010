"""One side of a side-by-side benchmark: mlx-sd ("mlx") or diffusers/transformers on torch ("torch").

    python benchmarks/_worker.py mlx|torch [cpu|gpu] [float32|float16]   (started by benchmarks/components.py)

Reads one JSON command per line on stdin and answers one JSON line on stdout. Each side runs in its own process so
that neither's thread pool (OpenBLAS for MLX, OpenMP for torch) spins on cores the other is timing; the driver asks
them in turn (A, B, A, B, ...). The torch side builds random-weight models from the published configs and writes
their weights; the mlx side converts those same weights, so both compute the same function on the same inputs.
On a GPU ("gpu": MLX's CUDA or Metal backend, torch's CUDA, or MPS on a Mac) both run the UNet and the text towers
in the dtype asked for and the VAE in float32 (`run_dtype`), and time to the end of the device's work (mx.eval returns
when the arrays are computed; torch.cuda / torch.mps.synchronize).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

_GIVEN = sys.argv[1:4] if __name__ == "__main__" else []
SIDE, DEVICE, DTYPE = _GIVEN + ["mlx", "cpu", "float32"][len(_GIVEN) :]
if SIDE == "mlx":
    # isort: off
    import mlx_sd  # noqa: F401  (before mlx.core: BLAS preload, malloc tuning)
    import mlx.core as mx

    # isort: on

from mlx_sd_convert.families import FAMILIES, SD3_TRANSFORMERS, TEXT_TOWERS, family_config  # noqa: E402

TEXT_TOKENS = 77
T5_TOKENS = 256  # diffusers' SD3 pipelines' max_sequence_length (mlx_sd.t5_tokenizer.MAX_LENGTH)
SD3_CLIP_WIDTH = 768 + 1280  # SD3's CLIP tokens: CLIP-L's and bigG's states side by side
# Benchmark family -> its MMDiT in SD3_TRANSFORMERS. SD3.5's releases share SD3's text towers and VAE
# (FAMILIES["sd3"]) and differ in the MMDiT alone; "sd3" is SD3 medium.
SD3_RELEASES = {"sd3": "sd3-medium", "sd3.5-medium": "sd3.5-medium", "sd3.5-large": "sd3.5-large"}
FAMILY_NAMES = list(dict.fromkeys([*FAMILIES, *SD3_RELEASES]))


def model_config(family: str, model: str) -> dict:
    """The published diffusers config of one model of a benchmark family (family_config, plus SD3.5's MMDiTs)."""
    if family in SD3_RELEASES:
        if model == "transformer":
            return copy.deepcopy(SD3_TRANSFORMERS[SD3_RELEASES[family]])
        family = "sd3"
    return family_config(family, model)


def denoiser(family: str) -> str:
    """The model a family's denoising step runs: SD3's MMDiT ("transformer") or the UNet."""
    return "transformer" if family in SD3_RELEASES else "unet"


def text_encoders(family: str) -> list[str]:
    """The family's text encoders: its CLIP towers, then SD3's T5 (text_encoder_3)."""
    towers = [encoder for encoder, _, _ in TEXT_TOWERS["sd3" if family in SD3_RELEASES else family]]
    return towers + (["text_encoder_3"] if family in SD3_RELEASES else [])


def run_dtype(component: str, dtype: str) -> str:
    """The dtype a component runs in on both sides: the one asked for, but the VAE in float32 (mlx-sd's default, as
    diffusers upcasts SDXL's VAE: float16 overflows in its decoder)."""
    return "float32" if component in ("vae", "vae_decode", "vae_encode") else dtype


# --- inputs shared by both sides (numpy, seeded, channels-last) ------------------------------------------------


def unet_inputs(family: str, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A classifier-free-guidance batch: the same latents twice, text and empty-text conditioning."""
    cfg = model_config(family, "unet")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, latent, latent, cfg.get("in_channels", 4)), dtype=np.float32)
    inputs = {
        "x": np.concatenate([x, x]),
        "t": np.array([500.0, 500.0], dtype=np.float32),
        "context": rng.standard_normal((2, TEXT_TOKENS, cfg["cross_attention_dim"]), dtype=np.float32),
    }
    if cfg.get("addition_embed_type") == "text_time":
        pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        inputs["pooled"] = rng.standard_normal((2, pooled_dim), dtype=np.float32)
        size = 8.0 * latent
        inputs["time_ids"] = np.array([[size, size, 0, 0, size, size]] * 2, dtype=np.float32)
    return inputs


def transformer_inputs(family: str, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
    """SD3's guided batch as its pipeline builds it: the same latents twice; 77 CLIP tokens (CLIP-L's 768 and bigG's
    1280 features side by side, zero-padded to T5's width) then 256 T5 tokens; pooled CLIP-L + bigG (2048)."""
    cfg = model_config(family, "transformer")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, latent, latent, cfg["in_channels"]), dtype=np.float32)
    width = cfg["joint_attention_dim"]
    clip = rng.standard_normal((2, TEXT_TOKENS, SD3_CLIP_WIDTH), dtype=np.float32)
    t5 = rng.standard_normal((2, T5_TOKENS, width), dtype=np.float32)
    return {
        "x": np.concatenate([x, x]),
        "t": np.array([500.0, 500.0], dtype=np.float32),  # sigma * 1000, as diffusers passes it
        "context": np.concatenate([np.pad(clip, ((0, 0), (0, 0), (0, width - SD3_CLIP_WIDTH))), t5], axis=1),
        "pooled": rng.standard_normal((2, cfg["pooled_projection_dim"]), dtype=np.float32),
    }


def vae_inputs(family: str, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    channels = model_config(family, "vae")["latent_channels"]
    return {
        "latents": rng.standard_normal((1, latent, latent, channels), dtype=np.float32),
        "image": rng.uniform(-1, 1, (1, 8 * latent, 8 * latent, 3)).astype(np.float32),
    }


def text_inputs(seed: int = 0) -> np.ndarray:
    """Two token rows (prompt and negative prompt) as a tokenizer pads them."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (20, 0):
        row = [49406, *rng.integers(0, 49406, size=n).tolist(), 49407]
        rows.append(row + [49407] * (TEXT_TOKENS - len(row)))
    return np.array(rows, dtype=np.int64)


def t5_inputs(seed: int = 0) -> np.ndarray:
    """Two T5 token rows as mlx_sd.t5_tokenizer pads them: pieces, eos (1), then padding (0) to 256."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in (20, 0):
        row = [*rng.integers(2, 32000, size=n).tolist(), 1]
        rows.append(row + [0] * (T5_TOKENS - len(row)))
    return np.array(rows, dtype=np.int64)


def attention_inputs(B: int, N: int, M: int, C: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, n, C), dtype=np.float32) for n in (N, M, M)]


def conv_inputs(B: int, H: int, W: int, C: int, O: int, seed: int = 0) -> list[np.ndarray]:
    """A channels-last activation, an (O, 3, 3, C) weight and a bias (MLX's layouts)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, W, C), dtype=np.float32)
    return [x, rng.standard_normal((O, 3, 3, C), dtype=np.float32) / (3 * C**0.5), np.zeros(O, np.float32)]


# --- memory -----------------------------------------------------------------------------------------------------


# Full-size upscalers as published (spandrel's module, constructor arguments and, where not the module's name, its
# class): A1111's "R-ESRGAN 4x+" (RRDBNet, 23 blocks), "R-ESRGAN General 4xV3" (compact, 32 convs), "SwinIR 4x"
# (SwinIR-L real-world x4), ...; the RealPLKSR is 4xNomos2_realplksr's shape
UPSCALERS = {
    "esrgan": ("ESRGAN", {"num_blocks": 23}),
    "compact": ("Compact", {"num_conv": 32, "num_feat": 64, "upscale": 4}),
    "swinir": ("SwinIR", {"img_size": 64, "embed_dim": 240, "depths": [6] * 9, "num_heads": [8] * 9, "window_size": 8,
                          "mlp_ratio": 2.0, "upscale": 4, "upsampler": "nearest+conv", "resi_connection": "3conv"}),
    "dat": ("DAT", {"img_size": 64, "embed_dim": 180, "split_size": [8, 32], "depth": [6] * 6, "num_heads": [6] * 6,
                    "expansion_factor": 2.0, "upscale": 4}),  # A1111's "DAT x4"
    "scunet": ("SCUNet", {"config": [4] * 7, "dim": 64}),  # A1111's "ScuNET" (1x)
    "hat": ("HAT", {"img_size": 64, "embed_dim": 180, "depths": [6] * 6, "num_heads": [6] * 6, "window_size": 16,
                    "compress_ratio": 3, "squeeze_factor": 30, "mlp_ratio": 2.0, "upscale": 4}),  # Real_HAT_GAN_SRx4
    "span": ("SPAN", {"num_in_ch": 3, "num_out_ch": 3, "feature_channels": 48, "upscale": 4}),  # 4xNomos8k_span_otf
    "plksr": ("PLKSR", {"dim": 64, "n_blocks": 28, "kernel_size": 17, "upscaling_factor": 4}, "RealPLKSR"),
    "drct": ("DRCT", {"img_size": 64, "embed_dim": 180, "depths": [6] * 6, "num_heads": [6] * 6, "window_size": 16,
                      "mlp_ratio": 2.0, "gc": 32, "upscale": 4, "upsampler": "pixelshuffle"}),  # DRCT (not -L)
    "mosr": ("MoSR", {"n_block": 24, "dim": 64, "upscale": 4}),  # spandrel's defaults (4xNomos2_hq_mosr's shape)
    "cugan": ("RealCUGAN", {}, "UpCunet2x"),  # Real-CUGAN up2x
    "safmn": ("SAFMN", {"dim": 36, "n_blocks": 8, "upscaling_factor": 4}),  # SAFMN's published x4 shape
    "swin2sr": ("Swin2SR", {"img_size": 64, "embed_dim": 180, "depths": [6] * 6, "num_heads": [6] * 6,
                            "window_size": 8, "mlp_ratio": 2.0, "upscale": 4, "upsampler": "nearest+conv",
                            "resi_connection": "1conv"}),  # Swin2SR real-world x4
    "rcan": ("RCAN", {"scale": 4}),  # RCAN's published shape: 10 groups of 20 blocks, 64 channels
    "rgt": ("RGT", {"img_size": 64, "embed_dim": 180, "depth": [6] * 8, "num_heads": [6] * 8, "mlp_ratio": 2.0,
                    "split_size": [8, 32], "c_ratio": 0.5, "upscale": 4}),  # RGT x4 (not -S)
    "atd": ("ATD", {"img_size": 64, "embed_dim": 210, "depths": [6] * 6, "num_heads": [6] * 6, "window_size": 16,
                    "category_size": 256, "num_tokens": 128, "reducted_dim": 20, "convffn_kernel_size": 5,
                    "mlp_ratio": 2.0, "upscale": 4, "upsampler": "pixelshuffle"}),  # ATD x4
    "fdat": ("FDAT", {"embed_dim": 120, "num_groups": 4, "depth_per_group": 3, "num_heads": 4, "window_size": 8,
                      "scale": 4}),  # FDAT "medium", transpose+conv head
    "moesr": ("MoESR", {"scale": 4}),  # spandrel's defaults: 64 channels, 9 stages of 4 blocks
    "swiftsrgan": ("SwiftSRGAN", {}),  # spandrel's defaults: 64 channels, 16 blocks, 4x
    "ditn": ("DITN", {"upscale": 4}),  # spandrel's defaults: 60 channels, 4 + 4 layers
    "seemore": ("SeemoRe", {"scale": 4}),  # spandrel's defaults: 64 channels, 6 groups of 6 experts
    "omnisr": ("OmniSR", {"num_feat": 64, "res_num": 5, "block_num": 1, "window_size": 8, "up_scale": 4}),  # x4 DIV2K
    "srformer": ("SRFormer", {"img_size": 64, "embed_dim": 180, "depths": [6] * 6, "num_heads": [6] * 6,
                              "window_size": 22, "mlp_ratio": 2.0, "upscale": 4,
                              "upsampler": "pixelshuffle"}),  # SRFormer_SRx4_DF2K
    "fbcnn": ("FBCNN", {}),  # spandrel's defaults: fbcnn_color's shape (64 to 512 channels, 4 blocks a level)
    "dncnn": ("DnCNN", {"in_nc": 3, "out_nc": 3, "nc": 64, "nb": 20, "act_mode": "R"}),  # dncnn_color_blind
    "drunet": ("DRUNet", {"in_nc": 4, "out_nc": 3}),  # drunet_color (64 to 512 channels, 4 blocks a level)
    "nafnet": ("NAFNet", {"width": 32, "enc_blk_nums": [2, 2, 4, 8], "middle_blk_num": 12,
                          "dec_blk_nums": [2, 2, 2, 2]}),  # NAFNet-SIDD-width32
}  # fmt: skip
EXTRA_ARCHITECTURES = ("SRFormer",)  # spandrel_extra_arches' (tests/a1111_upscale.py's `spandrel_extra`)


def tile_input(tile: int, seed: int = 0) -> np.ndarray:
    """(1, tile, tile, 3) pixels in [0, 1]."""
    return np.random.default_rng(seed).random((1, tile, tile, 3), dtype=np.float32)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads: less sensitive than wall time to other programs' load
    (though BLAS and OpenMP threads that spin while waiting count as busy)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss() -> None:
    """Reset the kernel's resident-set high-water mark (Linux: clear_refs 5), so each stage reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (current) from /proc/self/status, in MB; NaN where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# --- the two sides ----------------------------------------------------------------------------------------------


class MLXSide:
    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        if device == "gpu" and not mx.is_available(mx.gpu):
            raise SystemExit("no MLX GPU here: on Linux pip install 'mlx[cuda]' (CUDA 12) or 'mlx-cuda-13'")
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.dtype = dtype
        self.models = {}
        self.text = None  # (context, its TextContext) last seen, as the pipeline keeps one per request

    def _dtype(self, component: str) -> mx.Dtype:
        return getattr(mx, run_dtype(component, self.dtype))

    @staticmethod
    def _config(component: str, family: str):
        """Our config for one of the family's models, translated from the published diffusers one."""
        from mlx_sd_convert import diffusers as d

        config = model_config(family, component)
        translate = {
            "unet": d.unet_config,
            "transformer": d.mmdit_config,
            "vae": d.vae_config,
            "text_encoder_3": d.t5_config,
        }.get(component)
        return translate(config) if translate else d.clip_config(config, with_projection=False)

    def parameters(self, component: str, family: str) -> dict:
        """The model's parameter count (from its lazily initialised arrays' shapes: nothing is allocated)."""
        from mlx.utils import tree_flatten

        from mlx_sd.components import build

        model = build(self._config(component, family))
        return {"parameters": sum(v.size for _, v in tree_flatten(model.parameters()))}

    def setup(self, component: str, family: str, weights: str, folder: str, save: bool = True) -> dict:
        from mlx.utils import tree_flatten
        from safetensors.numpy import load_file

        from mlx_sd.components import build, load_component, save_component
        from mlx_sd_convert.diffusers import convert_weights

        cfg = self._config(component, family)
        model = build(cfg)  # random initialisation: what the mlx-only runs use
        if Path(weights).exists():
            converted = convert_weights(component, cfg, load_file(weights))
            # one tensor at a time from numpy into MLX, so that the two copies of a 10 GB SDXL UNet never coexist
            pairs = []
            while converted:
                key, value = converted.popitem()
                pairs.append((key, mx.array(value)))
                del value
            model.load_weights(pairs, strict=True)
            del pairs
        mx.eval(model.parameters())
        if save:  # component folders for the load-time probe; the model is then loaded from the float32 one
            weights = dict(tree_flatten(model.parameters()))
            save_component(f"{folder}-fp32", cfg, weights)
            save_component(f"{folder}-fp16", cfg, {k: v.astype(mx.float16) for k, v in weights.items()})
            del weights, model
            model = load_component(f"{folder}-fp32", self._dtype(component))
        else:
            model.set_dtype(self._dtype(component))
        self.models[component] = model
        mx.eval(self.models[component].parameters())
        mlx_sd.backend.release_cpu_memory()  # the conversion's transient copies, kept by the tuned malloc
        return {"rss_mb": rss_mb("VmRSS")}

    def park(self, component: str, folder: str) -> dict:
        """Drop the model, first saving it as a component folder that `unpark` loads (one model at a time)."""
        from mlx.utils import tree_flatten

        from mlx_sd.components import save_component

        model = self.models.pop(component)
        if not Path(folder).exists():
            save_component(folder, model.config, dict(tree_flatten(model.parameters())))
        del model
        self.text = None  # the TextContext is keyed by the layers' ids, which a reloaded model may reuse
        mlx_sd.backend.release_cpu_memory()
        return {"rss_mb": rss_mb("VmRSS")}

    def unpark(self, component: str, folder: str, family: str) -> dict:
        from mlx_sd.components import load_component

        self.models[component] = load_component(folder, self._dtype(component))
        mx.eval(self.models[component].parameters())
        return {"rss_mb": rss_mb("VmRSS")}

    def forward(self, component: str, inputs: dict[str, np.ndarray]):
        dtype = self._dtype(component)
        a = {k: mx.array(v).astype(dtype) if v.dtype.kind == "f" else mx.array(v) for k, v in inputs.items()}
        if component == "unet":
            from mlx_sd.models.layers import TextContext

            # Repeats of a step are the steps of one request: the text's keys and values are computed at the first
            # and kept (TextContext), as in a generation.
            if self.text is None or not np.array_equal(self.text[0], inputs["context"]):
                self.text = (inputs["context"], TextContext(a["context"]))
            unet = self.models["unet"]
            return unet(a["x"], a["t"], self.text[1], pooled=a.get("pooled"), time_ids=a.get("time_ids"))
        if component == "transformer":  # SD3's MMDiT: its text tokens change in every block, nothing to keep
            return self.models["transformer"](a["x"], a["t"], a["context"], a["pooled"])
        if component == "vae_decode":
            return self.models["vae"].decode(a["latents"])
        if component == "vae_encode":
            return self.models["vae"].encode_moments(a["image"])
        if component == "text_encoder_3":
            return self.models[component](a["ids"])  # T5's last hidden state
        return self.models[component](a["ids"]).last_hidden_state  # a text tower

    def run(self, component: str, inputs: dict[str, np.ndarray], save: str | None) -> dict:
        mx.reset_peak_memory()
        reset_peak_rss()
        cpu, start = cpu_seconds(), time.perf_counter()
        out = self.forward(component, inputs)
        mx.eval(out)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        if save:
            np.save(save, np.array(out.astype(mx.float32)))
        return {
            "seconds": seconds,
            "cpu_s": cpu,
            "peak_rss_mb": rss_mb("VmHWM"),
            "mlx_peak_mb": mx.get_peak_memory() / 2**20,
        }

    def attention(self, B: int, N: int, M: int, C: int, heads: int, kernel: str) -> dict:
        from mlx_sd import attention as attention_module

        q, k, v = (mx.array(x) for x in attention_inputs(B, N, M, C))
        run = attention_module._blocked if kernel == "blocked" else attention_module._fused
        start = time.perf_counter()
        mx.eval(run(q, k, v, heads) if kernel == "blocked" else run(q, k, v, heads, None))
        return {"seconds": time.perf_counter() - start}

    def conv(self, B: int, H: int, W: int, C: int, O: int, kernel: str) -> dict:
        from mlx_sd.models import layers, winograd

        x, w, b = (mx.array(a) for a in conv_inputs(B, H, W, C, O))
        mx.eval(x, w, b)
        run = {
            "winograd": winograd.conv3x3_winograd,
            "taps": layers.conv3x3_taps,
            "unfold": lambda x, w, b: mx.conv2d(x, w, padding=1) + b,
        }[kernel]
        start = time.perf_counter()
        mx.eval(run(x, w, b))
        return {"seconds": time.perf_counter() - start}

    def upscaler(self, path: str, tile: int) -> dict:
        """One tile through the upscaler file at `path` (read once, in the run's dtype; SwinIR in float32)."""
        from mlx_sd_convert.upscaler import read_upscaler

        if self.models.get("upscaler", (None,))[0] != path:
            self.models["upscaler"] = (path, read_upscaler(path, getattr(mx, self.dtype)))
        x = mx.array(tile_input(tile))
        mx.eval(x)
        start = time.perf_counter()
        mx.eval(self.models["upscaler"][1].run(x))
        return {"seconds": time.perf_counter() - start}

    def sgemm(self, n: int = 2048, reps: int = 5) -> dict:
        """The matrix-product rate in the run's dtype (n = 8192 on a GPU, which 2048 would not fill)."""
        n = 8192 if mlx_sd.backend.on_gpu() else n
        a, b = (mx.random.normal((n, n)).astype(getattr(mx, self.dtype)) for _ in range(2))
        mx.eval(a @ b)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            mx.eval(a @ b)
            times.append(time.perf_counter() - start)
        return {"gflops": 2 * n**3 / float(np.median(times)) / 1e9}


class TorchSide:
    def __init__(self, device: str = "cpu", dtype: str = "float32"):
        import torch
        from diffusers.utils import logging

        self.device = "cpu"
        if device == "gpu":
            self.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else ""
            if not self.device:
                raise SystemExit("torch sees no GPU here (neither CUDA nor MPS)")
        logging.set_verbosity_error()  # `.to(dtype)` warns about modules to keep in float32 (none in these models)
        torch.set_grad_enabled(False)
        self.torch = torch
        self.dtype = dtype
        self.models = {}
        self.written = {}  # component -> the weights file `setup` wrote
        self.buffers = {}  # component -> its buffers outside the state dict, kept while it is parked

    def _placed(self, model, component: str):
        return model.to(self.device, getattr(self.torch, run_dtype(component, self.dtype)))

    def _sync(self) -> None:
        if self.device != "cpu":
            getattr(self.torch, self.device).synchronize()

    def _build(self, component: str, family: str, device: str = "cpu"):
        torch = self.torch
        config = model_config(family, component)
        with torch.device(device):
            if component == "unet":
                from diffusers import UNet2DConditionModel

                return UNet2DConditionModel(**config).eval()
            if component == "transformer":
                from diffusers import SD3Transformer2DModel

                return SD3Transformer2DModel(**config).eval()
            if component == "vae":
                from diffusers import AutoencoderKL

                return AutoencoderKL(**config).eval()
            if component == "text_encoder_3":
                from transformers import T5Config, T5EncoderModel

                return T5EncoderModel(T5Config(**config)).eval()
            from transformers import CLIPTextConfig, CLIPTextModel

            return CLIPTextModel(CLIPTextConfig(**config)).eval()

    def setup(self, component: str, family: str, weights: str, folder: str, save: bool = True) -> dict:
        from safetensors.torch import save_file

        self.torch.manual_seed(0)
        model = self._build(component, family)
        tied = _tied_parameters(model)  # written once (safetensors refuses shared tensors), as save_pretrained does
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, weights)
        self.models[component] = self._placed(model, component)
        self.written[component] = weights
        return {"rss_mb": rss_mb("VmRSS")}

    def park(self, component: str, folder: str) -> dict:
        """Drop the model, first saving its weights where `unpark` reads them (one model at a time)."""
        import gc

        from safetensors.torch import save_file

        model = self.models.pop(component)
        # buffers outside the state dict (CLIP's position ids), which a model built on the meta device lacks
        kept = model.state_dict().keys()
        self.buffers[component] = {n: b for n, b in model.named_buffers() if n not in kept}
        saved = Path(f"{folder}.safetensors")
        if not saved.exists():
            try:  # the model is unchanged since `setup` wrote it: a second name for that file, not a 10 GB rewrite
                os.link(self.written[component], saved)
            except (KeyError, OSError):
                save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(saved))
        del model
        gc.collect()
        return {"rss_mb": rss_mb("VmRSS")}

    def unpark(self, component: str, folder: str, family: str) -> dict:
        from safetensors.torch import load_file

        model = self._build(component, family, "meta")  # no initialisation: the weights are assigned
        state = load_file(f"{folder}.safetensors")
        state.update({name: state[first] for name, first in _tied_parameters(model).items()})
        model.load_state_dict(state, assign=True)
        for name, buffer in self.buffers.get(component, {}).items():
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_buffer(leaf, buffer, persistent=False)
        self.models[component] = self._placed(model, component)
        return {"rss_mb": rss_mb("VmRSS")}

    def _tensors(self, inputs, component: str):
        dtype = getattr(self.torch, run_dtype(component, self.dtype))
        t = {k: self.torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
        return {k: v.permute(0, 3, 1, 2).contiguous() if v.ndim == 4 else v for k, v in t.items()}

    def forward(self, component: str, inputs: dict[str, np.ndarray], models: dict | None = None):
        """One forward on numpy inputs (or, for counting, on ready meta tensors) -> channels-last output."""
        models = models or self.models
        t = inputs if models is not self.models else self._tensors(inputs, component)
        if component == "unet":
            added = {"text_embeds": t["pooled"], "time_ids": t["time_ids"]} if "pooled" in t else None
            out = models["unet"](t["x"], t["t"], encoder_hidden_states=t["context"], added_cond_kwargs=added).sample
        elif component == "transformer":
            text = {"encoder_hidden_states": t["context"], "pooled_projections": t["pooled"]}
            out = models["transformer"](t["x"], timestep=t["t"], **text).sample
        elif component == "vae_decode":
            out = models["vae"].decode(t["latents"]).sample
        elif component == "vae_encode":
            vae = models["vae"]
            out = vae.encoder(t["image"])
            out = vae.quant_conv(out) if vae.quant_conv is not None else out  # SD3's VAE has none
        else:
            return models[component](t["ids"]).last_hidden_state  # a text tower
        return out.permute(0, 2, 3, 1)

    def run(self, component: str, inputs: dict[str, np.ndarray], save: str | None) -> dict:
        cuda = self.torch.cuda if self.device == "cuda" else None
        if cuda:
            cuda.reset_peak_memory_stats()
        reset_peak_rss()
        self._sync()
        cpu, start = cpu_seconds(), time.perf_counter()
        out = self.forward(component, inputs)
        self._sync()
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        if save:
            np.save(save, out.float().cpu().contiguous().numpy())
        reply = {"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": rss_mb("VmHWM")}
        if cuda:
            reply["cuda_peak_mb"] = cuda.max_memory_allocated() / 2**20
        return reply

    def attention(self, B: int, N: int, M: int, C: int, heads: int, kernel: str) -> dict:
        import torch.nn.functional as F

        q, k, v = (self.torch.from_numpy(x).reshape(B, -1, heads, C // heads) for x in attention_inputs(B, N, M, C))
        start = time.perf_counter()
        # diffusers' AttnProcessor2_0: heads split by a transposed view, sdpa, merged back contiguous
        F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2).reshape(B, N, C)
        return {"seconds": time.perf_counter() - start}

    def conv(self, B: int, H: int, W: int, C: int, O: int, kernel: str) -> dict:
        import torch.nn.functional as F

        x, w, b = conv_inputs(B, H, W, C, O)
        x = self.torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # diffusers' NCHW
        w, b = self.torch.from_numpy(w).permute(0, 3, 1, 2).contiguous(), self.torch.from_numpy(b)
        start = time.perf_counter()
        F.conv2d(x, w, b, padding=1)
        return {"seconds": time.perf_counter() - start}

    def upscaler_setup(self, arch: str, path: str, tile: int) -> dict:
        """Build a random full-size spandrel upscaler and write its state dict to `path`; returns its FLOPs per
        tile. spandrel comes with the test oracles (tests/oracles.txt)."""
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from a1111_upscale import load_descriptor, spandrel, spandrel_extra
        from torch.utils.flop_counter import FlopCounterMode

        name, kwargs, *network_class = UPSCALERS[arch]  # the module's own class, unless named
        generator = self.torch.Generator().manual_seed(0)
        module = (spandrel_extra if name in EXTRA_ARCHITECTURES else spandrel)(name)
        network = getattr(module, network_class[0] if network_class else name)(**kwargs)
        for p in network.parameters():  # scaled by fan-in, so activations stay of order one
            p.data.copy_(self.torch.randn(p.shape, generator=generator) / max(int(np.prod(p.shape[1:])), 16) ** 0.5)
        self.torch.save(network.state_dict(), path)
        self.models["upscaler"] = load_descriptor(network.state_dict())
        self.models["upscaler"].model.to(self.device).requires_grad_(False)  # FlopCounterMode hooks grads (ATD's)
        with FlopCounterMode(display=False) as counter:
            self.upscaler(path, tile)
        return {"flops": counter.get_total_flops()}

    def upscaler(self, path: str, tile: int) -> dict:
        x = self.torch.from_numpy(tile_input(tile)).permute(0, 3, 1, 2).contiguous().to(self.device)
        with self.torch.inference_mode():
            self._sync()
            start = time.perf_counter()
            self.models["upscaler"](x)
            self._sync()
        return {"seconds": time.perf_counter() - start}

    def sgemm(self, n: int = 2048, reps: int = 5) -> dict:
        """The matrix-product rate in the run's dtype (n = 8192 on a GPU, which 2048 would not fill)."""
        torch = self.torch
        n = 8192 if self.device != "cpu" else n
        a, b = (torch.randn(n, n, device=self.device, dtype=getattr(torch, self.dtype)) for _ in range(2))
        a @ b
        times = []
        for _ in range(reps):
            self._sync()
            start = time.perf_counter()
            a @ b
            self._sync()
            times.append(time.perf_counter() - start)
        return {"gflops": 2 * n**3 / float(np.median(times)) / 1e9, "threads": torch.get_num_threads()}

    def flops(self, component: str, family: str, latent: int) -> dict:
        """FLOPs of one forward (multiply-add = 2), counted by torch's FlopCounterMode on a meta-device model."""
        from torch.utils.flop_counter import FlopCounterMode

        torch = self.torch
        model_key = "vae" if component.startswith("vae") else component
        dtype = getattr(torch, run_dtype(component, self.dtype))
        meta_models = {model_key: self._build(model_key, family, "meta").to(dtype)}
        inputs = _inputs(component, family, latent)
        meta = {k: v.to("meta") for k, v in self._tensors(inputs, component).items()}
        with FlopCounterMode(display=False) as counter, torch.device("meta"):
            self.forward(component, meta, meta_models)
        return {"flops": counter.get_total_flops()}


def _tied_parameters(model) -> dict[str, str]:
    """Second names of a torch model's shared parameters -> the first (T5's encoder.embed_tokens -> shared)."""
    first, tied = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            tied[name] = first[id(p)]
    return tied


def _inputs(component: str, family: str, latent: int) -> dict[str, np.ndarray]:
    if component == "unet":
        return unet_inputs(family, latent)
    if component == "transformer":
        return transformer_inputs(family, latent)
    if component == "vae_decode":
        return {"latents": vae_inputs(family, latent)["latents"]}
    if component == "vae_encode":
        return {"image": vae_inputs(family, latent)["image"]}
    return {"ids": t5_inputs() if component == "text_encoder_3" else text_inputs()}


def main() -> None:
    side = (MLXSide if SIDE == "mlx" else TorchSide)(DEVICE, DTYPE)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "run":
                inputs = _inputs(cmd["component"], cmd["family"], cmd.get("latent", 0))
                reply = side.run(cmd["component"], inputs, cmd.get("save"))
            else:
                reply = getattr(side, op)(**cmd)
            reply["ok"] = True
        except Exception as e:  # report and keep serving: the driver decides what a failure means
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
