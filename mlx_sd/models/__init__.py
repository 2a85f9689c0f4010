"""MLX modules for every network in a Stable Diffusion checkpoint, channels-last, named as diffusers names them."""

from .clip import CLIPOutput, CLIPTextConfig, CLIPTextModel
from .controlnet import ControlNetConfig, ControlNetModel
from .mmdit import MMDiTConfig, SD3Transformer2DModel
from .sd3_controlnet import SD3ControlNetConfig, SD3ControlNetModel
from .t5 import T5Config, T5EncoderModel
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, LatentDistribution, VAEConfig

__all__ = [
    "AutoencoderKL",
    "CLIPOutput",
    "CLIPTextConfig",
    "CLIPTextModel",
    "ControlNetConfig",
    "ControlNetModel",
    "LatentDistribution",
    "MMDiTConfig",
    "SD3ControlNetConfig",
    "SD3ControlNetModel",
    "SD3Transformer2DModel",
    "T5Config",
    "T5EncoderModel",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]
