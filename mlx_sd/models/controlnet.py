"""ControlNet (diffusers' ControlNetModel): a trainable copy of the UNet's encoder that turns a control image (edges,
depth, pose, ...) into residuals added to the UNet's skip connections and middle block.

Reference: Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models". The copy is
built by the same code as the UNet's encoder (mlx_sd/models/unet.py `build_encoder`); the control image enters through
a small convolutional embedding added to conv_in's output, and every output passes a 1x1 "zero convolution" (zero at
initialisation, trained). Parameter paths follow diffusers (`controlnet_cond_embedding.blocks.0`,
`controlnet_down_blocks.3`, `controlnet_mid_block`). How strongly, when and on which guidance half the residuals
apply is the pipeline's business (mlx_sd/controlnet.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Conv2d, TextContext, silu
from .unet import UNetConfig, build_encoder, embed_time, encode, skip_channels


@dataclass(frozen=True)
class ControlNetConfig(UNetConfig):
    """A UNet's encoder configuration plus the control image's embedding.

    conditioning_channels: channels of the control image (3: RGB).
    conditioning_embedding_out_channels: widths of the image embedding's stages; each but the first halves the
        resolution, so 4 stages take the image from pixels to latent size (x1/8).
    global_pool_conditions: the residuals are averaged over the image (ControlNet 1.1 shuffle); such models apply
        to the conditional half of classifier-free guidance only.
    conditioning_channel_order: "rgb", or "bgr" for the few models trained on BGR images.
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    conditioning_channel_order: str = "rgb"


class ControlNetConditioningEmbedding(nn.Module):
    """conv_in, then (3x3 conv, strided 3x3 conv) per further stage, SiLU after each, conv_out (zero-initialised)."""

    def __init__(self, out_channels: int, in_channels: int, chans: tuple[int, ...]):
        super().__init__()
        self.conv_in = Conv2d(in_channels, chans[0], 3, padding=1)
        self.blocks = []
        for a, b in zip(chans, chans[1:]):
            self.blocks += [Conv2d(a, a, 3, padding=1), Conv2d(a, b, 3, padding=1, stride=2)]
        self.conv_out = Conv2d(chans[-1], out_channels, 3, padding=1)

    def __call__(self, image: mx.array) -> mx.array:
        h = silu(self.conv_in(image))
        for block in self.blocks:
            h = silu(block(h))
        return self.conv_out(h)


class ControlNetModel(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        cfg = self.config = config
        chans = cfg.block_out_channels
        build_encoder(self, cfg)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chans[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels
        )
        self.controlnet_down_blocks = [Conv2d(ch, ch, 1) for ch in skip_channels(cfg)]
        self.controlnet_mid_block = Conv2d(chans[-1], chans[-1], 1)

    def __call__(
        self,
        x: mx.array,
        t: mx.array,
        context: mx.array | TextContext,
        image: mx.array,
        pooled: mx.array | None = None,
        time_ids: mx.array | None = None,
        timestep_cond: mx.array | None = None,
    ) -> tuple[list[mx.array], mx.array]:
        """The unscaled residuals for the UNet.

        Args:
            x: (B, h, w, 4) the UNet's scaled latents (an inpainting UNet's first 4 channels).
            t, context, pooled, time_ids, timestep_cond: as for the UNet.
            image: (B, 8h, 8w, conditioning_channels) control image in [0, 1], RGB.
        Returns:
            (down, middle): one (B, h_i, w_i, C_i) residual per UNet skip connection, and the middle block's
            (B, h/2^k, w/2^k, C) residual.
        """
        cfg = self.config
        if cfg.conditioning_channel_order == "bgr":
            image = image[..., ::-1]
        temb = embed_time(self, x, t, pooled, time_ids, timestep_cond)
        h = self.conv_in(x) + self.controlnet_cond_embedding(image.astype(x.dtype))
        h, skips = encode(self, h, temb, context)
        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(h)
