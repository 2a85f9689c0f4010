"""spandrel's 1x restoration networks (FBCNN, DnCNN / FDnCNN, DRUNet, NAFNet) against spandrel 0.4.2, the loader
A1111 1.8+, ComfyUI and chaiNNer run them with.

Fixtures are random-weight spandrel networks saved as the published files are (KAIR's plain state dicts, NAFNet's
under `params`; `.pth` and `.safetensors`), in colour and grey and in each variant spandrel's loader reads; the
reference for each file is spandrel's own reading of it, called as an image-to-image model (its descriptor: the
noise maps it adds, its padding, FBCNN's predicted quality factor). A1111's tiled runs are checked against
tests/a1111_upscale.py.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from a1111_upscale import extras_upscale as a1111_extras
from a1111_upscale import load_descriptor, resize_image, spandrel, upscale_with_model
from PIL import Image
from test_model_upscaler import TOLERANCE, _close_images, _pixels, _random, _random_statistics, _save

from mlx_sd.upscale import upscale_image
from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.library import UpscalerLibrary
from mlx_sd_convert.upscaler import read_upscaler


def _spread(network: torch.nn.Module, last: torch.nn.Module, run, channels: int, spread: float, centre: float):
    """`last`'s weight (and bias) scaled so that `run`'s output on random pixels has the standard deviation `spread`,
    its bias moved so that the mean is `centre`: trained restoration outputs stay near [0, 1], else most pixels clamp
    and a wrong network could still match."""
    with torch.no_grad():
        out = run(_pixels((1, channels, 32, 32)))
        last.weight *= spread / out.std()
        if last.bias is not None:
            last.bias.mul_(spread / out.std()).add_(centre - out.mean() * spread / out.std())
    return network


def _noise_map(x: torch.Tensor) -> torch.Tensor:
    """The image and spandrel's noise map for DRUNet and FDnCNN (15/255)."""
    return torch.cat([x, torch.full_like(x[:, :1], 15 / 255)], dim=1)


def fbcnn_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel FBCNN's state dict (8, 16 and 32 channels, then the 512 its quality-factor MLP takes; two
    blocks a level, the fewest spandrel detects), its output about 0.5 +- 0.3."""
    kwargs = {"nc": [8, 16, 32, 512], "nb": 2, **kwargs}
    network = _random(spandrel("FBCNN").FBCNN(**kwargs), seed)
    run = lambda x: network(x)[0]  # noqa: E731
    return _spread(network, network.m_tail, run, kwargs.get("in_nc", 3), 0.3, 0.5).state_dict()


def drunet_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel DRUNet's state dict (8 to 64 channels, two blocks a level; the image and the noise map in),
    its output about 0 +- 0.4 (it has no biases)."""
    kwargs = {"in_nc": 4, "out_nc": 3, "nc": [8, 16, 32, 64], "nb": 2, **kwargs}
    network = _random(spandrel("DRUNet").DRUNet(**kwargs), seed)
    run = lambda x: network(_noise_map(x))  # noqa: E731
    return _spread(network, network.m_tail, run, kwargs["in_nc"] - 1, 0.4, 0.0).state_dict()


def dncnn_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel DnCNN's state dict (16 channels), BatchNorm statistics random too: the noise it subtracts
    about 0 +- 0.1, or (FDnCNN) its output about 0.5 +- 0.3."""
    kwargs = {"nc": 16, **kwargs}
    network = _random_statistics(_random(spandrel("DnCNN").DnCNN(**kwargs), seed), seed + 1)
    if kwargs.get("mode") == "FDnCNN":
        run = lambda x: network(_noise_map(x))  # noqa: E731
        return _spread(network, network.model[-1], run, kwargs["in_nc"] - 1, 0.3, 0.5).state_dict()
    return _spread(network, network.model[-1], network.model, kwargs["in_nc"], 0.1, 0.0).state_dict()


def nafnet_state(seed: int = 0, **kwargs) -> dict:
    """A random spandrel NAFNet's state dict (its beta / gamma scales random, not the zeros it starts training with),
    its residual about 0 +- 0.1."""
    network = _random(spandrel("NAFNet").NAFNet(**kwargs), seed)
    channels = kwargs.get("img_channel", 3)
    return _spread(network, network.ending, lambda x: network(x) - x, channels, 0.1, 0.0).state_dict()


FILES = {  # file name -> its contents
    "fbcnn_color.pth": lambda: fbcnn_state(),  # the published layout: strided convs down, transposed convs up
    "fbcnn_gray.pth": lambda: fbcnn_state(in_nc=1, out_nc=1),
    "1x_FBCNN_upconv.safetensors": lambda: fbcnn_state(nb=3, upsample_mode="upconv", downsample_mode="avgpool"),
    "1x_FBCNN_pixelshuffle.pth": lambda: fbcnn_state(upsample_mode="pixelshuffle"),
    "dncnn_color_blind.pth": lambda: dncnn_state(in_nc=3, out_nc=3, nb=9, act_mode="R"),  # BatchNorm merged in
    "dncnn_25.pth": lambda: dncnn_state(in_nc=1, out_nc=1, nb=8, act_mode="R"),
    "1x_DnCNN_bn.safetensors": lambda: dncnn_state(in_nc=3, out_nc=3, nb=5, act_mode="BR"),  # BatchNorm, eps 1e-4
    "fdncnn_color.pth": lambda: dncnn_state(in_nc=4, out_nc=3, nb=8, act_mode="R", mode="FDnCNN"),  # noise map in
    "fdncnn_gray_bn.pth": lambda: dncnn_state(in_nc=2, out_nc=1, nb=4, act_mode="BR", mode="FDnCNN"),
    "drunet_color.pth": lambda: drunet_state(),  # inputs padded to 8 by reflection (spandrel's)
    "drunet_gray.pth": lambda: drunet_state(in_nc=2, out_nc=1),
    "1x_DRUNet_upconv.safetensors": lambda: drunet_state(upsample_mode="upconv", downsample_mode="avgpool"),
    "1x_DRUNet_pixelshuffle.pth": lambda: drunet_state(nb=3, upsample_mode="pixelshuffle"),
    "NAFNet-SIDD-width8.pth": lambda: {  # three levels: padded with zeros to 8 by the network
        "params": nafnet_state(width=8, enc_blk_nums=[1, 1, 2], middle_blk_num=2, dec_blk_nums=[1, 1, 1])
    },  # fmt: skip
    "NAFNet-GoPro-width16.safetensors": lambda: nafnet_state(width=16, enc_blk_nums=[1, 2], dec_blk_nums=[2, 1]),
    "NAFNet_gray.pth": lambda: nafnet_state(img_channel=1, width=8, enc_blk_nums=[1], dec_blk_nums=[1]),
}


def _run_both(ours, reference, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(ours, spandrel's) outputs for (B, C, H, W) pixels, NHWC; spandrel one image at a time (its noise maps are
    one image's)."""
    with torch.no_grad():
        expected = np.concatenate([reference(x[i : i + 1]).numpy() for i in range(len(x))]).transpose(0, 2, 3, 1)
    return np.array(ours.run(mx.array(x.numpy().transpose(0, 2, 3, 1)))), expected


@pytest.mark.parametrize("name", list(FILES))
def test_each_network_reads_and_runs_as_spandrel(tmp_path, name):
    state = FILES[name]()
    reference = load_descriptor(state)
    ours = read_upscaler(_save(tmp_path, name, state), mx.float32)
    assert ours.scale == reference.scale == 1
    assert ours.network.input_channels == reference.input_channels  # the image's: spandrel adds the noise maps
    for size in ((24, 32), (21, 18), (9, 13)):  # odd sizes: padded (by the network or as spandrel pads) and cropped
        got, expected = _run_both(ours, reference, _pixels((1, reference.input_channels, *size)))
        assert got.shape == expected.shape
        assert 0.3 < ((expected > 0) & (expected < 1)).mean()  # not a clamped, trivially equal output
        err = np.abs(got - expected).max()
        print(f"{name} {size}: {ours.network.config} max |diff| {err:.2e}, relative {err / np.abs(expected).max():.2e}")
        assert err < TOLERANCE


@pytest.mark.parametrize("path", ["winograd", "taps"])
def test_on_the_cpu_convolution_paths(tmp_path, monkeypatch, path):
    """At A1111's tile sizes the 3x3 convs run as Winograd F(4x4, 3x3) (float32 on a Linux CPU) or as per-tap
    products, from sizes these tiny networks stay below: both forced here, for every 3x3 conv."""
    from mlx_sd import backend
    from mlx_sd.models import layers

    if path == "winograd" and backend.row_kernels(mx.float32) != "numba":
        pytest.skip("numba is not installed")
    for name in ("TAPS_MIN_PIXELS", "TAPS_MIN_CHANNELS", "WINOGRAD_MIN_PIXELS", "WINOGRAD_MIN_WORK",
                 "WINOGRAD_MIN_CHANNELS", "WINOGRAD_MIN_INPUTS"):  # fmt: skip
        monkeypatch.setattr(layers, name, 1)
    monkeypatch.setattr(backend, "conv3x3_kernel", lambda dtype: path)
    calls = []
    for name in ("conv3x3_winograd", "conv3x3_taps"):
        run = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *a, run=run, name=name: calls.append(name) or run(*a))
    for name in ("fbcnn_color.pth", "dncnn_color_blind.pth", "drunet_gray.pth", "NAFNet-SIDD-width8.pth"):
        state = FILES[name]()
        ours, reference = read_upscaler(_save(tmp_path, name, state), mx.float32), load_descriptor(state)
        got, expected = _run_both(ours, reference, _pixels((2, reference.input_channels, 21, 18)))
        err = np.abs(got - expected).max()
        print(f"{name} on the {path} path: max |diff| {err:.2e}")
        assert err < TOLERANCE
    assert f"conv3x3_{path}" in calls


def test_fbcnn_predicts_each_images_quality_factor_in_a_batch(tmp_path):
    """A batch of tiles (A1111's tiles run a few at a time here): each image gets its own quality factor, predicted
    from its own features, as spandrel's one-image calls; a quality factor given (the original's `qf_input`) is
    used instead."""
    state = fbcnn_state(seed=2)
    ours = read_upscaler(_save(tmp_path, "fbcnn_color.pth", state), mx.float32)
    reference = load_descriptor(state)
    x = _pixels((2, 3, 24, 20))
    x[1] = 0.3 * x[1] + 0.6  # a brighter, flatter image: another quality factor
    with torch.no_grad():
        predicted = [reference.model(x[i : i + 1])[1].item() for i in range(2)]
    assert abs(predicted[0] - predicted[1]) > 1e-3
    got, expected = _run_both(ours, reference, x)
    assert np.abs(got - expected).max() < TOLERANCE
    qf = torch.tensor([[0.2], [0.9]])
    with torch.no_grad():
        expected = reference.model(x, qf)[0].numpy().transpose(0, 2, 3, 1)
    got = np.array(ours.network(mx.array(x.numpy().transpose(0, 2, 3, 1)), mx.array(qf.numpy())))
    assert np.abs(got - expected).max() < TOLERANCE * np.abs(expected).max()


@pytest.mark.parametrize("name", ["fbcnn_gray.pth", "dncnn_25.pth", "fdncnn_gray_bn.pth", "drunet_gray.pth",
                                  "NAFNet_gray.pth"])  # fmt: skip
def test_grey_models_see_the_luma(tmp_path, name):
    """A grey model given an RGB image (A1111 would hand it three channels, which it cannot take) runs on the luma, as
    chaiNNer converts images for one (OpenCV's BGR2GRAY weights on float pixels), its output in all three channels."""
    state = FILES[name]()
    ours = read_upscaler(_save(tmp_path, name, state), mx.float32)
    ours.tile = 0
    image = Image.fromarray((_pixels((22, 19, 3)).numpy() * 255).astype(np.uint8))
    bgr = (np.asarray(image)[..., ::-1] / 255).astype(np.float32)
    luma = bgr[..., 0] * np.float32(0.114) + bgr[..., 1] * np.float32(0.587) + bgr[..., 2] * np.float32(0.299)
    with torch.no_grad():
        out = load_descriptor(state)(torch.from_numpy(luma)[None, None]).clamp(0, 1)[0, 0].numpy()
    expected = np.round(255.0 * out).astype(np.uint8)
    _close_images(ours(image), Image.fromarray(np.stack([expected] * 3, axis=-1), "RGB"))


@pytest.mark.parametrize("name,size,target,tile", [
    ("fbcnn_color.pth", (70, 52), (140, 104), 32),  # 1x: one pass, then Lanczos to the size (A1111's loop)
    ("dncnn_color_blind.pth", (70, 52), (140, 104), 32),
    ("fdncnn_color.pth", (45, 40), (90, 80), 32),
    ("drunet_color.pth", (70, 52), (140, 104), 36),  # tiles of 36 padded to 40 by reflection
    ("NAFNet-SIDD-width8.pth", (70, 52), (140, 104), 32),  # each tile's own channel-attention averages
])  # fmt: skip
def test_a1111_upscale_with_a_restoration_net_matches_a1111(tmp_path, name, size, target, tile):
    """A1111 runs them from models/ESRGAN as ESRGAN models: `upscale_with_model`'s grid, BGR 8-bit tiles."""
    state = FILES[name]()
    upscaler = read_upscaler(_save(tmp_path, name, state), mx.float32)
    upscaler.tile = tile
    image = Image.fromarray((_pixels((*size[::-1], 3)).numpy() * 255).astype(np.uint8))
    expected = resize_image(image, *target, load_descriptor(state), tile_size=tile, tile_overlap=8)
    _close_images(upscale_image(image, *target, upscaler), expected)


def test_extras_with_a_restoration_net_matches_a1111(tmp_path):
    from mlx_sd.extras import extras_upscale

    state = FILES["drunet_color.pth"]()
    upscaler = read_upscaler(_save(tmp_path, "drunet_color.pth", state), mx.float32)
    upscaler.tile = 32
    descriptor = load_descriptor(state)
    image = Image.fromarray((_pixels((40, 52, 3)).numpy() * 255).astype(np.uint8))
    expected, expected_info = a1111_extras(image, lambda im: upscale_with_model(descriptor, im, 32, 8), upscale_by=1.5)
    got, info = extras_upscale(image, upscaler, scale=1.5)
    _close_images(got, expected)
    assert {k: v for k, v in info.items() if "upscaler" not in k} == expected_info
    assert info["Postprocess upscaler"] == "drunet_color"


def test_breaking_the_noise_map_quality_factor_or_padding_fails(tmp_path, monkeypatch):
    """The checks above see what matters: a noise level of 0, a fixed quality factor, FBCNN's or NAFNet's input
    padded by reflection (as spandrel pads DRUNet) instead of their own edge or zero padding each miss by far."""
    import mlx_sd.models.dncnn as dncnn
    import mlx_sd.models.drunet as drunet
    from mlx_sd.models.fbcnn import FBCNN
    from mlx_sd.models.nafnet import NAFNet

    def error(name: str) -> float:
        state = FILES[name]()
        ours, reference = read_upscaler(_save(tmp_path, name, state), mx.float32), load_descriptor(state)
        return np.abs(np.subtract(*_run_both(ours, reference, _pixels((1, 3, 21, 18))))).max()

    with monkeypatch.context() as m:
        m.setattr(FBCNN, "quality", lambda self, x: mx.full((x.shape[0], 1), 0.5))
        assert error("fbcnn_color.pth") > 1e-3
    with monkeypatch.context() as m:
        m.setattr(drunet, "NOISE_LEVEL", 0.0)
        assert error("drunet_color.pth") > 1e-3
    with monkeypatch.context() as m:
        m.setattr(dncnn, "NOISE_LEVEL", 0.0)
        assert error("fdncnn_color.pth") > 1e-3
    with monkeypatch.context() as m:
        m.setattr(FBCNN, "size_multiple", 8)
        assert error("fbcnn_color.pth") > 1e-3
    with monkeypatch.context() as m:
        m.setattr(NAFNet, "size_multiple", 8)
        assert error("NAFNet-SIDD-width8.pth") > 1e-3


def test_float32_where_spandrel_keeps_it_and_the_library_listing(tmp_path):
    """DnCNN, DRUNet and NAFNet run in float32 whatever the default (spandrel: no half precision), FBCNN at the
    default; a folder lists them by file name as A1111's ESRGAN family at scale 1; an FBCNN whose quality-factor
    predictor could not run (the original's MLP takes 512 channels) is refused by name."""
    folder = tmp_path / "ESRGAN"
    folder.mkdir()
    dtypes = {}
    for name in ("fbcnn_color.pth", "dncnn_25.pth", "drunet_gray.pth", "NAFNet_gray.pth"):
        dtypes[name] = read_upscaler(_save(folder, name, FILES[name]()), mx.float16).network.dtype
    assert dtypes == {"fbcnn_color.pth": mx.float16, "dncnn_25.pth": mx.float32, "drunet_gray.pth": mx.float32,
                      "NAFNet_gray.pth": mx.float32}  # fmt: skip
    library = UpscalerLibrary(folder, mx.float32)
    assert list(library.listing()) == ["NAFNet_gray", "dncnn_25", "drunet_gray", "fbcnn_color"]
    assert {(e["name"], e["model_name"], e["scale"]) for e in library.api_listing()} == {
        ("NAFNet_gray", "ESRGAN", 1), ("dncnn_25", "ESRGAN", 1), ("drunet_gray", "ESRGAN", 1),
        ("fbcnn_color", "ESRGAN", 1),
    }  # fmt: skip
    narrow = _random(spandrel("FBCNN").FBCNN(nc=[8, 16, 32, 64], nb=2)).state_dict()
    with pytest.raises(ConversionError, match="fbcnn_narrow.pth: an FBCNN whose last level has 64 channels"):
        read_upscaler(_save(tmp_path, "fbcnn_narrow.pth", narrow))
