"""mlx-sd: Stable Diffusion in MLX.

`backend` is imported first on purpose: on Linux it preloads MKL or the system OpenBLAS before mlx.core
loads (cpu_blas).
"""

from . import backend  # noqa: F401  (must precede every mlx import)
from .models import (  # noqa: E402
    AutoencoderKL,
    CLIPTextConfig,
    CLIPTextModel,
    UNet2DConditionModel,
    UNetConfig,
    VAEConfig,
)

__version__ = "0.1.0"

__all__ = [
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]
