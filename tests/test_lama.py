"""LaMa (big-lama) against spandrel 0.4.2's, the loader ComfyUI and chaiNNer run it with (A1111's ControlNet extension
runs the original advimman code, which spandrel's copies).

spandrel's LaMa has one configuration (big-lama's: 64 channels, 3 downsamplings, 18 FFC blocks), so the fixture is a
random-weight big-lama (every weight and BatchNorm statistic random) at small odd image sizes, saved as the published
files are (`generator.model.N...` under `state_dict` as the training checkpoints and `ControlNetLama.pth`, and
spandrel's `model.model.N...`), read by convert/lama.py and compared with spandrel's descriptor (its padding and
clamp included).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from a1111_upscale import spandrel
from test_model_upscaler import _random, _random_statistics

from mlx_sd_convert.keymap import ConversionError
from mlx_sd_convert.lama import read_lama

TOLERANCE = 1e-5  # float32, outputs in [0, 1]; measured 5.5e-7 to 1.2e-6


@pytest.fixture(scope="module")
def reference():
    """A random big-lama, its final conv scaled so the output before the sigmoid is about 0 +- 1.5 (not clamped flat),
    as spandrel's descriptor."""
    arch = spandrel("LaMa")
    torch.manual_seed(0)
    network = _random_statistics(_random(arch.LaMa(in_nc=4, out_nc=3), seed=0), seed=1)
    last = network.model.model[34]
    with torch.no_grad():
        body = torch.nn.Sequential(*list(network.model.model)[:35])
        out = body(torch.rand(1, 4, 32, 32))
        last.weight *= 1.5 / out.std()
        last.bias.sub_(out.mean() * 1.5 / out.std())
    descriptor = arch.LaMaArch().load(network.state_dict())
    descriptor.model.eval()  # spandrel's loader leaves it in training mode (BatchNorm on the batch's statistics)
    return descriptor


@pytest.fixture(scope="module")
def training_file(reference, tmp_path_factory):
    """The layout of the training checkpoints and ControlNetLama.pth: `generator.model...` under `state_dict`, with
    a discriminator beside it."""
    state = {k.replace("model.model", "generator.model", 1): v for k, v in reference.model.state_dict().items()}
    state["discriminator.model0.0.weight"] = torch.zeros(64, 3, 4, 4)
    path = tmp_path_factory.mktemp("lama") / "ControlNetLama.pth"
    torch.save({"state_dict": state, "pytorch-lightning_version": "1.2.9"}, path)
    return path


def _inputs(h: int, w: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, h, w, generator=g)
    mask = torch.zeros(1, 1, h, w)
    mask[:, :, h // 4 : 3 * h // 4, w // 3 : w - 2] = 1  # a hole, and scattered pixels
    mask = torch.maximum(mask, (torch.rand(1, 1, h, w, generator=g) > 0.9).float())
    return image, mask


def _ours(network, image, mask) -> np.ndarray:
    nhwc = [mx.array(v.permute(0, 2, 3, 1).numpy()) for v in (image, mask)]
    return np.array(network(*nhwc)).transpose(0, 3, 1, 2)


def _relative(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("size", [(37, 45), (13, 20), (5, 9)])  # padded to 40x48 (reflect), 16x24, 16x16 (+ edge)
def test_lama_matches_spandrel(reference, training_file, size):
    network = read_lama(training_file)
    image, mask = _inputs(*size, seed=sum(size))
    with torch.no_grad():
        ref = reference(image, mask).numpy()
    inside = ref[np.broadcast_to(mask.numpy(), ref.shape) > 0]
    assert inside.std() > 0.1  # the fill is not clamped flat
    err = _relative(_ours(network, image, mask), ref)
    assert err < TOLERANCE, f"max relative error {err:.3g}"


@pytest.mark.parametrize("norm", ["backward", "forward"])  # off by 3.3e-3 and 3.0e-2
def test_lama_spectral_path_matters(reference, training_file, norm):
    """A wrong FFT normalisation in the reference (torch's "backward" or "forward" instead of "ortho") breaks the
    match by far more than the tolerance: the spectral path is exercised."""
    arch_module = type(reference.model.model.model[5].conv1.ffc.convg2g.fu)
    network = read_lama(training_file)
    image, mask = _inputs(37, 45, seed=3)
    units = [m for m in reference.model.modules() if isinstance(m, arch_module)]
    try:
        for unit in units:
            unit.fft_norm = norm
        with torch.no_grad():
            wrong = reference(image, mask).numpy()
    finally:
        for unit in units:
            unit.fft_norm = "ortho"
    assert _relative(_ours(network, image, mask), wrong) > 100 * TOLERANCE


def test_lama_spandrel_layout(reference, tmp_path):
    """spandrel's own layout (`model.model.N...`, no wrapper), as a .safetensors file."""
    from safetensors.torch import save_file

    path = tmp_path / "big-lama.safetensors"
    save_file({k: v.contiguous() for k, v in reference.model.state_dict().items()}, str(path))
    image, mask = _inputs(24, 16, seed=5)
    with torch.no_grad():
        ref = reference(image, mask).numpy()
    assert _relative(_ours(read_lama(path), image, mask), ref) < TOLERANCE


def test_lama_loading_is_strict(reference, tmp_path):
    state = dict(reference.model.state_dict())
    state["model.model.5.conv1.ffc.convg2g.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ConversionError, match="extra"):
        read_lama(path)
    del state["model.model.5.conv1.ffc.convg2g.extra.weight"], state["model.model.34.bias"]
    torch.save(state, path)
    with pytest.raises(ConversionError, match="missing"):
        read_lama(path)
    with pytest.raises(ConversionError, match="not a LaMa"):
        torch.save({"conv_first.weight": torch.zeros(1)}, path)
        read_lama(path)
