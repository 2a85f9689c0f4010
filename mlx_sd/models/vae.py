"""The KL autoencoder that maps images to latents and back (diffusers' AutoencoderKL), channels-last.

Reference: Rombach et al. 2022, section 3.1. Parameter paths follow diffusers
(`decoder.up_blocks.0.resnets.0.conv1`, `encoder.mid_block.attentions.0.to_q`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .layers import Attention, Conv2d, Downsample2D, GroupNorm, ResnetBlock2D, Upsample2D

# diffusers clamps log-variance before exp(0.5 * logvar), so a broken encoder cannot overflow the std.
LOGVAR_RANGE = (-30.0, 20.0)
VAE_NORM_EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    # Latents are multiplied by this before the UNet sees them (unit variance; SDXL's VAE uses 0.13025).
    scaling_factor: float = 0.18215
    # ... after this is subtracted (zero mean): SD3's 16-channel VAE (0.0609, scaling 1.5305).
    shift_factor: float = 0.0
    # SD3's VAE has neither 1x1 convolution around the latent.
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    # Per-channel latent statistics (Playground v2.5): latents are (z - mean) * scaling_factor / std.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for every SD VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def scale(self, latents: mx.array) -> mx.array:
        """The VAE's latents as the denoiser sees them (diffusers: (z - shift_factor) * scaling_factor; with
        per-channel statistics (z - latents_mean) * scaling_factor / latents_std, in diffusers' order)."""
        if self.latents_mean is not None:
            mean, std = self._statistics(latents.dtype)
            return (latents - mean) * self.scaling_factor / std
        shifted = latents - self.shift_factor if self.shift_factor else latents
        return shifted * self.scaling_factor

    def unscale(self, latents: mx.array) -> mx.array:
        """The inverse of `scale`: the denoiser's latents as the decoder takes them."""
        if self.latents_mean is not None:
            mean, std = self._statistics(latents.dtype)
            return latents * std / self.scaling_factor + mean
        unscaled = latents / self.scaling_factor
        return unscaled + self.shift_factor if self.shift_factor else unscaled

    def _statistics(self, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        return mx.array(self.latents_mean, dtype), mx.array(self.latents_std, dtype)  # broadcast over NHWC channels


@dataclass
class LatentDistribution:
    """The encoder's diagonal Gaussian over latents, (B, h, w, latent_channels) each."""

    mean: mx.array
    logvar: mx.array

    @classmethod
    def from_moments(cls, moments: mx.array) -> LatentDistribution:
        """Split quant_conv's output (B, h, w, 2 * latent_channels) into mean and clamped log-variance."""
        mean, logvar = mx.split(moments, 2, axis=-1)
        return cls(mean, mx.clip(logvar, *LOGVAR_RANGE))

    @property
    def std(self) -> mx.array:
        return mx.exp(0.5 * self.logvar)

    def sample(self, key: mx.array | None = None, noise: mx.array | None = None) -> mx.array:
        """mean + std * noise, with noise drawn from `key` or given (e.g. from a torch-compatible generator)."""
        if (key is None) == (noise is None):
            raise ValueError("LatentDistribution.sample takes exactly one of key= or noise=")
        if noise is None:
            noise = mx.random.normal(self.mean.shape, dtype=self.mean.dtype, key=key)
        return self.mean + self.std * noise


class VAEMidAttention(Attention):
    """Single-head self-attention over all H*W pixels with its own GroupNorm and a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, head_dim=channels, qkv_bias=True)
        self.group_norm = GroupNorm(groups, channels, VAE_NORM_EPS)

    def __call__(self, x: mx.array) -> mx.array:
        B, H, W, C = x.shape
        return super().__call__(self.group_norm(x).reshape(B, H * W, C), residual=x)  # tokens in, pixels out


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, None, groups, VAE_NORM_EPS) for _ in range(2)]
        self.attentions = [VAEMidAttention(channels, groups)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class EncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, VAE_NORM_EPS) for i in range(layers)
        ]
        if downsample:
            self.downsamplers = [Downsample2D(out_ch, asymmetric_pad=True)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if "downsamplers" in self else x


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, None, groups, VAE_NORM_EPS) for i in range(layers)
        ]
        if upsample:
            self.upsamplers = [Upsample2D(out_ch)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if "upsamplers" in self else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = [
            EncoderBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups, i < n - 1) for i in range(n)
        ]
        self.mid_block = MidBlock(chans[-1], groups)
        self.conv_norm_out = GroupNorm(groups, chans[-1], VAE_NORM_EPS)
        self.conv_out = Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, chans[0], 3, padding=1)
        self.mid_block = MidBlock(chans[0], groups)
        self.up_blocks = [
            DecoderBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block + 1, groups, i < n - 1) for i in range(n)
        ]
        self.conv_norm_out = GroupNorm(groups, chans[-1], VAE_NORM_EPS)
        self.conv_out = Conv2d(chans[-1], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(config.latent_channels, config.latent_channels, 1)

    @property
    def dtype(self) -> mx.Dtype:
        """The dtype the weights are held in."""
        return self.decoder.conv_in.weight.dtype

    def encode_moments(self, images: mx.array) -> mx.array:
        """(B, H, W, 3) images in [-1, 1] -> (B, H/8, W/8, 2 * latent_channels) mean and log-variance."""
        moments = self.encoder(images)
        return self.quant_conv(moments) if self.config.use_quant_conv else moments

    def encode(self, images: mx.array) -> LatentDistribution:
        """(B, H, W, 3) images in [-1, 1] -> the latent distribution at (B, H/8, W/8, latent_channels)."""
        return LatentDistribution.from_moments(self.encode_moments(images))

    def decode(self, latents: mx.array) -> mx.array:
        """(B, h, w, latent_channels) unscaled latents -> (B, 8h, 8w, 3) images, nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents) if self.config.use_post_quant_conv else latents)
