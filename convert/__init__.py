"""mlx_sd_convert: published PyTorch checkpoints -> mlx_sd model folders, offline and without running pickles."""

import mlx_sd  # noqa: F401  (first: loads OpenBLAS before mlx.core)

from .cache import converted, load_pipeline
from .converter import ConvertProgress, convert
from .keymap import ConversionError, Rule, apply_rules

__all__ = ["ConversionError", "ConvertProgress", "Rule", "apply_rules", "convert", "converted", "load_pipeline"]
