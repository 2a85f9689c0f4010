"""The reference implementations, loaded offline, and the helpers every parity test shares.

References: diffusers and transformers (imported normally), open_clip's text tower and tokenizer, k-diffusion's
sampling functions, the original CompVis/Stability `ldm` code (stable-diffusion-sdkit) and spandrel's upscaler
networks. open_clip, k-diffusion and spandrel import torchvision and other heavy modules from their package
`__init__`; we register bare package modules instead so only the submodules the oracles need are executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import mlx_sd  # noqa: F401  (first: loads OpenBLAS before mlx.core)

# isort: split
import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_map

from mlx_sd.components import build

_STUBS = Path(__file__).parent / "_stubs"


def _bare_package(name: str):
    """Import `name` as a namespace-like package without running its __init__."""
    if name in sys.modules:
        return sys.modules[name]
    if str(_STUBS) not in sys.path:
        # transformers caches whether torchvision is installed; ask before the stand-in is on the path, or it takes
        # the stand-in for the real package and imports vision code from it (ldm's text encoders import transformers).
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        sys.path.insert(0, str(_STUBS))  # the torchvision stand-in
    spec = importlib.util.find_spec(name)
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    sys.modules[name] = module
    return module


def open_clip_module(submodule: str):
    """e.g. open_clip_module("transformer").TextTransformer, open_clip_module("tokenizer").SimpleTokenizer."""
    _bare_package("open_clip")
    return importlib.import_module(f"open_clip.{submodule}")


def ldm_module(submodule: str):
    """A module of the original CompVis/Stability code, e.g. ldm_module("modules.encoders.modules").

    `ldm.models.*` needs pytorch_lightning: use the modules under `ldm.modules` only.
    """
    _bare_package("open_clip")  # ldm's encoders import open_clip at module level
    return importlib.import_module(f"ldm.{submodule}")


def k_diffusion_sampling():
    _bare_package("k_diffusion")
    return importlib.import_module("k_diffusion.sampling")


def open_clip_vocab_path() -> Path:
    """The real CLIP BPE vocabulary shipped inside open_clip_torch (MIT, OpenAI)."""
    return Path(_bare_package("open_clip").__path__[0]) / "bpe_simple_vocab_16e6.txt.gz"


# --- random weights ---------------------------------------------------------------------------------------


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give *every* parameter of a reference model random values, norm affines and biases included.

    Fresh reference models zero-initialise several layers (the original code's `zero_module`, diffusers'
    ones/zeros norms), which would let parity pass without exercising them. Weights get a fan-in scaled
    normal so activations stay O(1) through deep stacks.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
        elif name.endswith("weight") and ("norm" in name or "ln" in name):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


# --- layouts and comparisons ------------------------------------------------------------------------------


def nchw_to_nhwc(x: torch.Tensor) -> mx.array:
    return mx.array(x.detach().permute(0, 2, 3, 1).contiguous().numpy())


def nhwc_to_nchw(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


def to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().float().numpy()
    return np.array(x.astype(mx.float32) if isinstance(x, mx.array) else x, dtype=np.float32)


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|: scaled by the reference's range, since plain rtol is useless near zero."""
    ours, ref = to_numpy(ours), to_numpy(ref)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference {ref.shape}"
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-12))


def assert_close(ours, ref, tol: float, what: str = "") -> float:
    err = relative_error(ours, ref)
    assert np.isfinite(err) and err <= tol, f"{what}: max|ours - ref| / max|ref| = {err:.3g} > {tol:g}"
    return err


def psnr(ours, ref, data_range: float = 2.0) -> float:
    """PSNR in dB; `data_range` is the images' peak-to-peak range (2 for [-1, 1], 255 for uint8)."""
    diff = to_numpy(ours).astype(np.float64) - to_numpy(ref).astype(np.float64)
    mse = np.mean(diff**2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


# --- loading our side --------------------------------------------------------------------------------------


def load_ours(config, weights, dtype=mx.float32):
    model = build(config)
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    model.update(tree_map(lambda p: p.astype(dtype), model.parameters()))
    return model.eval()


def token_batch(pad_id: int, lengths=(5, 77, 12), seed=0) -> np.ndarray:
    """Token rows as a tokenizer makes them: bos, words, eos, then padding; ids below eos."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        words = rng.integers(0, 49406, size=min(n, 75))
        row = [49406, *words, 49407]
        rows.append(row + [pad_id] * (77 - len(row)))
    return np.array(rows, dtype=np.int64)


# --- AUTOMATIC1111's prompt handling, written from its published description -------------------------------


def a1111_windows(weighted_tokens, break_positions, comma, size=75, backtrack=20):
    """A1111's long-prompt rule, written from its description.

    weighted_tokens: [(token, weight)]; break_positions: indices into weighted_tokens before which a BREAK stood.
    """
    windows, current = [], []
    for i in range(len(weighted_tokens) + 1):
        for _ in range(break_positions.count(i)):
            windows.append(current)
            current = []
        if i == len(weighted_tokens):
            break
        token = weighted_tokens[i]
        if len(current) == size:
            commas = [j for j, (t, _) in enumerate(current) if t == comma]
            if token[0] != comma and commas and size - commas[-1] <= backtrack:
                cut = commas[-1] + 1  # the phrase after the last comma moves on
                windows.append(current[:cut])
                current = current[cut:]
            else:
                windows.append(current)
                current = []
        current.append(token)
    if current or not windows:
        windows.append(current)
    return windows
