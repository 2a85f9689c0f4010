"""LaMa (Suvorov et al. 2022, "Resolution-robust Large Mask Inpainting with Fourier Convolutions",
https://github.com/advimman/lama): big-lama, the inpainting network A1111's ControlNet extension runs for
`inpaint_only+lama` (`ControlNetLama.pth`) and spandrel loads.

An FFC ResNet generator: the image with the hole zeroed and the mask (4 channels) through a reflection-padded 7x7
conv, three stride-2 3x3 convs (64 -> 128 -> 256 -> 512 channels, the last split into 128 local and 384 global
ones), 18 residual blocks of fast Fourier convolutions (FFC, Chi et al. 2020): the local branch a 3x3 conv of both
branches, the global branch a 3x3 conv of the local one plus a spectral transform of the global one (a 1x1 conv,
then the real FFT of the image, a 1x1 conv over the real and imaginary parts as channels, the inverse FFT, a
residual 1x1 conv), then three transposed convs back to 64 channels and a 7x7 conv to RGB with a sigmoid. Every conv
pads by reflection, every norm is BatchNorm with its running statistics. The known pixels are pasted back.

Parameter paths follow the published state dicts (`model.model.N...`, an `nn.Sequential` whose indices are kept;
`generator.model.N...` in the training checkpoints is renamed at loading). Images are (B, H, W, C) in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .cugan import ConvTranspose, reflect_pad
from .dat import BatchNorm, Placeholder
from .layers import Conv2d, sigmoid

SIZE_MINIMUM = 16  # spandrel's size requirements for LaMa: at least 16 pixels, a multiple of 8 (three 2x downsamples)
SIZE_MULTIPLE = 8


@dataclass(frozen=True)
class LaMaConfig:
    """big-lama's generator (the configuration spandrel and the extension's `config.yaml` hard-code)."""

    in_channels: int = 4  # RGB and the mask
    out_channels: int = 3
    ngf: int = 64
    n_downsampling: int = 3
    n_blocks: int = 18
    ratio_global: float = 0.75  # the residual blocks' share of global (spectral) channels


def relu(x: mx.array) -> mx.array:
    return mx.maximum(x, 0)


class ReflectConv(Conv2d):
    """torch's Conv2d with padding_mode="reflect" (no bias): the image mirrored by `reflect`, then a valid conv."""

    def __init__(self, inputs: int, outputs: int, kernel: int, stride: int = 1, reflect: int = 0):
        super().__init__(inputs, outputs, kernel, stride=stride, bias=False)
        self.reflect = reflect

    def __call__(self, x: mx.array) -> mx.array:
        p = self.reflect
        return super().__call__(reflect_pad(x, p, p, p) if p else x)


class FourierUnit(nn.Module):
    """A 1x1 conv, BatchNorm and ReLU in the frequency domain: torch.fft.rfftn(norm="ortho") over (H, W), the real
    and imaginary parts interleaved as channels (channel 2c real, 2c+1 imaginary), and back with irfftn."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_layer = Conv2d(2 * channels, 2 * channels, 1, bias=False)
        self.bn = BatchNorm(2 * channels)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        scale = (H * W) ** 0.5  # "ortho": 1/sqrt(HW) each way; MLX's rfft2 is unscaled and its irfft2 divides by HW
        ffted = mx.fft.rfft2(x.astype(mx.float32), axes=(1, 2)) / scale  # (B, H, W/2+1, C) complex
        ffted = mx.stack([ffted.real, ffted.imag], axis=-1).reshape(B, H, -1, 2 * C)  # (B, H, W/2+1, 2C)
        ffted = relu(self.bn(self.conv_layer(ffted))).reshape(B, H, -1, C, 2)
        ffted = ffted[..., 0] + 1j * ffted[..., 1]  # (B, H, W/2+1, C) complex
        return (mx.fft.irfft2(ffted, s=(H, W), axes=(1, 2)) * scale).astype(x.dtype)


class SpectralTransform(nn.Module):
    """The global-to-global path: 1x1 conv to half the channels, the Fourier unit as a residual, 1x1 conv back
    (stride 1 and no local Fourier unit in big-lama)."""

    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv1 = [Conv2d(inputs, outputs // 2, 1, bias=False), BatchNorm(outputs // 2), Placeholder()]  # ReLU
        self.fu = FourierUnit(outputs // 2)
        self.conv2 = Conv2d(outputs // 2, outputs, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        x = relu(self.conv1[1](self.conv1[0](x)))
        return self.conv2(x + self.fu(x))


class FFC(nn.Module):
    """Fast Fourier convolution over a (local, global) pair of feature maps, either of which may be absent (None,
    the original's 0) when its share of channels is 0."""

    def __init__(self, inputs: int, outputs: int, kernel: int, ratio_in: float, ratio_out: float, stride: int = 1,
                 padding: int = 0):  # fmt: skip
        super().__init__()
        in_g, out_g = int(inputs * ratio_in), int(outputs * ratio_out)
        in_l, out_l = inputs - in_g, outputs - out_g
        conv_args = (kernel, stride, padding)
        if in_l and out_l:
            self.convl2l = ReflectConv(in_l, out_l, *conv_args)
        if in_l and out_g:
            self.convl2g = ReflectConv(in_l, out_g, *conv_args)
        if in_g and out_l:
            self.convg2l = ReflectConv(in_g, out_l, *conv_args)
        if in_g and out_g:
            self.convg2g = SpectralTransform(in_g, out_g)
        self.has_local, self.has_global = out_l > 0, out_g > 0

    def _apply(self, name: str, x: mx.array | None) -> mx.array | int:
        return self[name](x) if name in self and x is not None else 0

    def __call__(self, x_l: mx.array | None, x_g: mx.array | None):
        out_l = self._apply("convl2l", x_l) + self._apply("convg2l", x_g) if self.has_local else None
        out_g = self._apply("convl2g", x_l) + self._apply("convg2g", x_g) if self.has_global else None
        return out_l, out_g


class FFCBlock(nn.Module):
    """FFC, then BatchNorm and ReLU on each branch present (the original's FFC_BN_ACT)."""

    def __init__(self, inputs: int, outputs: int, kernel: int, ratio_in: float, ratio_out: float, stride: int = 1,
                 padding: int = 0):  # fmt: skip
        super().__init__()
        self.ffc = FFC(inputs, outputs, kernel, ratio_in, ratio_out, stride, padding)
        out_g = int(outputs * ratio_out)
        if outputs - out_g:
            self.bn_l = BatchNorm(outputs - out_g)
        if out_g:
            self.bn_g = BatchNorm(out_g)

    def __call__(self, x_l: mx.array | None, x_g: mx.array | None):
        x_l, x_g = self.ffc(x_l, x_g)
        return (None if x_l is None else relu(self.bn_l(x_l))), (None if x_g is None else relu(self.bn_g(x_g)))


class FFCResnetBlock(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        self.conv1 = FFCBlock(dim, dim, 3, ratio, ratio, padding=1)
        self.conv2 = FFCBlock(dim, dim, 3, ratio, ratio, padding=1)

    def __call__(self, x_l: mx.array, x_g: mx.array):
        y_l, y_g = self.conv2(*self.conv1(x_l, x_g))
        return x_l + y_l, x_g + y_g


class Generator(nn.Module):
    """FFCResNetGenerator; `model` keeps the original nn.Sequential's indices (parameter-free layers as
    placeholders: the reflection pads, the ConcatTupleLayer, the ReLUs and the final sigmoid)."""

    def __init__(self, c: LaMaConfig):
        super().__init__()
        model = [Placeholder(), FFCBlock(c.in_channels, c.ngf, 7, 0, 0)]  # ReflectionPad2d(3), the 7x7 conv
        for i in range(c.n_downsampling):
            last = i == c.n_downsampling - 1
            model.append(FFCBlock(c.ngf * 2**i, c.ngf * 2 ** (i + 1), 3, 0, c.ratio_global if last else 0, 2, 1))
        dim = c.ngf * 2**c.n_downsampling
        model += [FFCResnetBlock(dim, c.ratio_global) for _ in range(c.n_blocks)]
        model.append(Placeholder())  # ConcatTupleLayer: local and global channels concatenated
        for i in range(c.n_downsampling):
            channels = dim // 2**i
            model += [ConvTranspose(channels, channels // 2, 3, 2, 0), BatchNorm(channels // 2), Placeholder()]
        model += [Placeholder(), Conv2d(c.ngf, c.out_channels, 7), Placeholder()]  # pad, conv, sigmoid
        self.model = model
        self.n_downsampling, self.n_blocks = c.n_downsampling, c.n_blocks

    def __call__(self, x: mx.array) -> mx.array:
        """(B, H, W, 4) -> (B, H, W, 3) in [0, 1]; H and W multiples of 2^n_downsampling."""
        layers = iter(self.model[1:])
        x_l, x_g = next(layers)(reflect_pad(x, 3, 3, 3), None)
        for _ in range(self.n_downsampling + self.n_blocks):
            x_l, x_g = next(layers)(x_l, x_g)
        x = mx.concatenate([x_l, x_g], axis=-1)
        next(layers)
        for _ in range(self.n_downsampling):
            up, bn, _ = next(layers), next(layers), next(layers)
            # ConvTranspose2d(k=3, stride=2, padding=1, output_padding=1): of the 2H+1 rows, the first is cropped
            x = relu(bn(up(x)[:, 1:, 1:]))
        next(layers)
        return sigmoid(next(layers)(reflect_pad(x, 3, 3, 3)))


class LaMa(nn.Module):
    def __init__(self, config: LaMaConfig = LaMaConfig()):
        super().__init__()
        self.config = config
        self.model = Generator(config)

    @property
    def dtype(self) -> mx.Dtype:
        return self.model.model[-2].weight.dtype

    def __call__(self, image: mx.array, mask: mx.array) -> mx.array:
        """Fill the masked region of `image` as spandrel's LaMa descriptor does.

        Args:
            image: (B, H, W, 3) in [0, 1].
            mask: (B, H, W, 1), 1 where the image is to be filled (spandrel's LaMa blends by it as it is; the
                extension binarises it at 0.5 first).
        Returns:
            (B, H, W, 3) in [0, 1]: the network's output inside the mask, `image` outside. The input is padded at
            the bottom and right by reflection (then edge replication where the image is too small to mirror) to a
            multiple of 8 and at least 16 pixels, and the output cropped back, as spandrel pads.
        """
        _, H, W, _ = image.shape
        image, mask = (_pad(v, padded_size(H) - H, padded_size(W) - W).astype(self.dtype) for v in (image, mask))
        filled = self.model(mx.concatenate([image * (1 - mask), mask], axis=-1))
        out = mask * filled + (1 - mask) * image
        return mx.clip(out, 0, 1)[:, :H, :W].astype(mx.float32)


def padded_size(n: int) -> int:
    """The size spandrel pads a side of `n` pixels to for LaMa."""
    n = max(n, SIZE_MINIMUM)
    return n + -n % SIZE_MULTIPLE


def _pad(x: mx.array, ph: int, pw: int) -> mx.array:
    """spandrel's pad_tensor: reflect by up to size - 1 at the bottom and right, then replicate the new edge (which
    is then the first pixel) for the rest."""
    for axis, p in ((1, ph), (2, pw)):
        n = x.shape[axis]
        reflected = min(p, n - 1)
        index = [*range(n), *(n - 2 - k for k in range(reflected)), *([0] * (p - reflected))]
        x = mx.take(x, mx.array(index), axis=axis)
    return x
