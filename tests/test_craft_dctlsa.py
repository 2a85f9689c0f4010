"""CRAFT and DCTLSA, spandrel's lightweight transformer upscalers, against spandrel 0.4.2, the loader A1111 1.8+,
ComfyUI and chaiNNer run them with.

Fixtures are random-weight spandrel networks saved as the published files are (plain state dicts, `.pth` and
`.safetensors`, DCTLSA's BatchNorms with random running statistics); the reference for each file is spandrel's own
reading of it, called as an image-to-image model (its descriptor: its padding to the size requirement, then the
networks' own). A1111's tiled runs are checked against tests/a1111_upscale.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from a1111_upscale import load_descriptor, resize_image, spandrel
from PIL import Image
from test_model_upscaler import TOLERANCE, _close_images, _pixels, _random, _random_statistics, _save

from mlx_sd.upscale import upscale_image
from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.upscaler import read_upscaler


def craft_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel CRAFT's state dict (small: 32 channels, one or two groups; the position MLP's width is
    channels / 32, so 1 here as in the published 48-channel models)."""
    kwargs = {"embed_dim": 32, "depths": [1, 2], "num_heads": [4, 8], **kwargs}
    return _random(spandrel("CRAFT").CRAFT(**kwargs), seed).state_dict()


def dctlsa_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel DCTLSA's state dict (20 channels: spandrel's five heads of 4), BatchNorm statistics random."""
    kwargs = {"nf": 20, **kwargs}
    return _random_statistics(_random(spandrel("DCTLSA").DCTLSA(**kwargs), seed), seed).state_dict()


FILES = {  # file name -> its contents
    "4x_CRAFT.pth": lambda: craft_state(upscale=4),  # the published 4 x 16 windows
    "2x_CRAFT_2x8.safetensors": lambda: craft_state(upscale=2, split_size_0=2, split_size_1=8, mlp_ratio=1.5),
    "3x_CRAFT_identity.pth": lambda: craft_state(
        upscale=3, depths=[2], num_heads=[4], qkv_bias=False, resi_connection="identity", split_size_0=8
    ),  # fmt: skip
    "4x_DCTLSA.pth": lambda: dctlsa_state(upscale=4),
    "2x_DCTLSA.safetensors": lambda: dctlsa_state(upscale=2, nf=30),
    "3x_DCTLSA.pth": lambda: dctlsa_state(upscale=3),
}


def _run_both(ours, reference, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    got = np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    with torch.no_grad():
        expected = reference(x).numpy().transpose(0, 2, 3, 1)
    return got, expected


@pytest.mark.parametrize("name", list(FILES))
def test_each_network_reads_and_runs_as_spandrel(tmp_path, name):
    state = FILES[name]()
    reference = load_descriptor(state)
    ours = read_upscaler(_save(tmp_path, name, state), mx.float32)
    assert ours.scale == reference.scale
    assert type(reference.model).__name__ == type(ours.network).__name__  # spandrel detects the same architecture
    # 16: a whole window mirrored on by CRAFT; 21 x 37: padded to 32 x 48 (spandrel), then by the networks
    for size in ((20, 24), (16, 16), (21, 37)):
        got, expected = _run_both(ours, reference, _pixels((1, 3, *size)))
        assert got.shape == expected.shape
        assert 0.3 < ((expected > 0) & (expected < 1)).mean()  # not a clamped, trivially equal output
        err = np.abs(got - expected).max()
        print(f"{name} {size}: {ours.network.config} max |diff| {err:.2e}, relative {err / np.abs(expected).max():.2e}")
        assert err < TOLERANCE


def test_on_the_blocked_attention_paths(tmp_path, monkeypatch):
    """At real sizes CRAFT's window attention (its shifted windows unmasked) and channel attention run blocked (x86
    CPU): 4 x 16 and 16 x 4 windows, a batch of two images."""
    import mlx_sd.attention as attention_module

    monkeypatch.setattr(attention_module, "BLOCKED_MIN_SCORES", 1)
    monkeypatch.setattr(attention_module, "CHANNEL_HEADS_MIN", 1)
    windows, channels = [], []
    run_windows, run_channels = attention_module._windows_blocked, attention_module._channels_blocked
    monkeypatch.setattr(
        attention_module, "_windows_blocked", lambda q, k, v, h, b, mask, *a: windows.append(mask is None)
        or run_windows(q, k, v, h, b, mask, *a)
    )  # fmt: skip
    monkeypatch.setattr(attention_module, "_channels_blocked", lambda *a: channels.append(1) or run_channels(*a))
    state = FILES["4x_CRAFT.pth"]()
    ours = read_upscaler(_save(tmp_path, "4x_CRAFT.pth", state), mx.float32)
    if attention_module.backend.attention_kernel(mx.float32) != "blocked":
        pytest.skip("the blocked attention path runs on x86 CPUs only")
    x = _pixels((2, 3, 24, 20))
    got = np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1))))
    with torch.no_grad():
        expected = torch.cat([load_descriptor(state)(x[i : i + 1]) for i in range(2)]).numpy().transpose(0, 2, 3, 1)
    assert windows and all(windows) and channels
    assert np.abs(got - expected).max() < TOLERANCE


@pytest.mark.parametrize("name,size,target,tile", [
    ("4x_CRAFT.pth", (48, 40), (192, 160), 32),  # from models/ESRGAN: A1111's ESRGAN grid
    ("2x_DCTLSA.safetensors", (70, 52), (140, 104), 32),
])  # fmt: skip
def test_a1111_upscale_matches_a1111(tmp_path, name, size, target, tile):
    state = FILES[name]()
    upscaler = read_upscaler(_save(tmp_path, name, state), mx.float32)
    upscaler.tile = tile
    image = Image.fromarray((_pixels((*size[::-1], 3)).numpy() * 255).astype(np.uint8))
    expected = resize_image(image, *target, load_descriptor(state), tile_size=tile, tile_overlap=8)
    _close_images(upscale_image(image, *target, upscaler), expected)


def test_breaking_the_mask_padding_heads_or_window_fails(tmp_path, monkeypatch):
    """The checks above see what matters: CRAFT's shifted windows masked as DAT's are, CRAFT padded only to the
    window (not a whole window more), DCTLSA with four heads or 8-pixel windows: each misses by 0.016 to 1."""
    import mlx_sd.models.craft as craft
    import mlx_sd.models.dctlsa as dctlsa
    from mlx_sd.models.dat import SpatialBranch
    from mlx_sd.models.swinir import reflect_pad

    def error(name: str, change=lambda network: None) -> float:
        state = FILES[name]()
        ours, reference = read_upscaler(_save(tmp_path, name, state), mx.float32), load_descriptor(state)
        change(ours.network)
        return np.abs(np.subtract(*_run_both(ours, reference, _pixels((1, 3, 21, 37))))).max()

    def masked(network):
        for _, module in network.named_modules():
            if isinstance(module, SpatialBranch):
                module.masked = True

    assert error("4x_CRAFT.pth", masked) > 1e-2
    with monkeypatch.context() as m:
        m.setattr(craft, "reflect_pad", lambda x, ph, pw, edge: reflect_pad(x, ph % 16, pw % 16, edge))
        assert error("4x_CRAFT.pth") > 1e-3
    with monkeypatch.context() as m:
        m.setattr(dctlsa, "HEADS", 4)
        assert error("4x_DCTLSA.pth") > 1e-2
    with monkeypatch.context() as m:
        m.setattr(dctlsa, "WINDOW", 8)
        assert error("4x_DCTLSA.pth") > 1e-2


def test_refusals_and_float32(tmp_path):
    """DCTLSA runs in float32 whatever the default (spandrel: no half precision), CRAFT at the default; a DCTLSA
    whose fusion conv takes other than six modules is refused by name."""
    craft = read_upscaler(_save(tmp_path, "4x_CRAFT.pth", FILES["4x_CRAFT.pth"]()), mx.float16)
    dct = read_upscaler(_save(tmp_path, "4x_DCTLSA.pth", FILES["4x_DCTLSA.pth"]()), mx.float16)
    assert (craft.network.dtype, dct.network.dtype) == (mx.float16, mx.float32)
    state = FILES["4x_DCTLSA.pth"]()
    state["c.0.weight"] = state["c.0.weight"][:, :100]
    _save(tmp_path, "5_modules.pth", state)
    with pytest.raises(ConversionError, match="5_modules.pth: a DCTLSA fusing 5 modules"):
        read_upscaler(tmp_path / "5_modules.pth")
