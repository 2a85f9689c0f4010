"""T2I-Adapter (diffusers' T2IAdapter): a small convolutional network that turns a control image into features added
inside the UNet's down blocks (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability
for Text-to-Image Diffusion Models").

The image is pixel-unshuffled (space to channels, 8x; 16x for SDXL), then one block per UNet stage makes that stage's
feature. Unlike a ControlNet it sees neither the latents nor the timestep, so its features are computed once per
request. Three layouts, as diffusers names them: "full_adapter" (SD 1.x/2.x), "full_adapter_xl" (SDXL: one
downsampling block fewer) and "light_adapter". Parameter paths follow diffusers without its `adapter.` prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, pixel_unshuffle

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"


def avg_pool2(x: mx.array) -> mx.array:
    """AvgPool2d(2, stride 2, ceil_mode=True) on even sizes: the mean of each 2x2 square."""
    B, H, W, C = x.shape
    return x.reshape(B, H // 2, 2, W // 2, 2, C).mean(axis=(2, 4))


class AdapterResnetBlock(nn.Module):
    """conv (3x3), ReLU, conv (1x1 full, 3x3 light), + input."""

    def __init__(self, channels: int, kernel2: int):
        super().__init__()
        self.block1 = Conv2d(channels, channels, 3, padding=1)
        self.block2 = Conv2d(channels, channels, kernel2, padding=kernel2 // 2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.block2(nn.relu(self.block1(x))) + x


class AdapterBlock(nn.Module):
    """[2x2 average pool], [1x1 conv in], resnets, [1x1 conv out (light)]."""

    def __init__(self, cin: int, cout: int, blocks: int, down: bool, light: bool):
        super().__init__()
        self.down = down
        mid = cout // 4 if light else cout
        if light or cin != cout:
            self.in_conv = Conv2d(cin, mid, 1)
        self.resnets = [AdapterResnetBlock(mid, 3 if light else 1) for _ in range(blocks)]
        if light:
            self.out_conv = Conv2d(mid, cout, 1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.down:
            x = avg_pool2(x)
        if "in_conv" in self:
            x = self.in_conv(x)
        for resnet in self.resnets:
            x = resnet(x)
        return self.out_conv(x) if "out_conv" in self else x


class T2IAdapter(nn.Module):
    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        cfg = self.config = config
        chans, n, light = cfg.channels, cfg.num_res_blocks, cfg.adapter_type == "light_adapter"
        cin = cfg.in_channels * cfg.downscale_factor**2
        if light:
            stages = [(cin, chans[0], False)] + [(a, b, True) for a, b in zip(chans, chans[1:])]
            stages.append((chans[-1], chans[-1], True))
        else:
            self.conv_in = Conv2d(cin, chans[0], 3, padding=1)
            if cfg.adapter_type == "full_adapter_xl":  # stages 0 and 1 at one size, one halving before stage 2
                down = [False, False, True] + [False] * (len(chans) - 3)
                stages = [(chans[max(i - 1, 0)] if i in (1, 2) else c, c, down[i]) for i, c in enumerate(chans)]
            else:
                stages = [(chans[max(i - 1, 0)], c, i > 0) for i, c in enumerate(chans)]
        self.body = [AdapterBlock(a, b, n, down, light) for a, b, down in stages]

    def __call__(self, image: mx.array) -> list[mx.array]:
        """(B, H, W, 3) control image in [0, 1] -> one (B, h_i, w_i, C_i) feature per UNet down stage."""
        x = pixel_unshuffle(image, self.config.downscale_factor)
        if "conv_in" in self:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features
