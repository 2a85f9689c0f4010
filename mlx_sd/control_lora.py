"""Control-LoRA (Stability AI's SDXL "control-lora" files): a ControlNet stored as its difference from the model it
runs with, bound to that model's UNet at run time.

The file holds the ControlNet's own layers (the control image's embedding, the zero convolutions) in full, and for
the copy of the UNet's encoder a low-rank update of each layer's weight (W = W_unet + up @ down), besides full
tensors for whatever was trained outright (biases, norms). Binding builds the ControlNet from the UNet's current
weights, as ComfyUI's `ControlLora` and A1111's ControlNet extension (`bind_control_lora`) do: the UNet's weights with
the request's LoRAs fused, as the extension runs them. The bound network is kept for as long as the UNet's weights
stay the same arrays (a LoRA change or another model binds anew).

mlx_sd_convert.controlnet reads the file (its names mapped onto ours, layouts changed there); a `ControlNet` holding
a `ControlLoRA` is bound by the pipeline before each pass (`ControlNet.bound`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import ControlNetConfig, ControlNetModel, UNetConfig


@dataclass(frozen=True, eq=False)
class ControlLoRA:
    """A read Control-LoRA.

    config: the ControlNet's configuration, read from the file's shapes; a bound network takes the UNet's own (its
        attention heads, which shapes do not show) with the file's input channels and image embedding.
    tensors: parameter name -> the file's full tensor (MLX layout).
    deltas: parameter name -> (up (O, r), down (r, K)): the update up @ down, reshaped to the parameter's (MLX)
        shape, added to the UNet's weight of that name (or to the file's full tensor, where it has one).
    """

    config: ControlNetConfig
    tensors: Mapping[str, mx.array]
    deltas: Mapping[str, tuple[mx.array, mx.array]]
    _bound: list = field(default_factory=list, repr=False)  # [(the UNet arrays used, the network)], the last only

    def bind(self, unet: nn.Module, name: str = "Control-LoRA") -> ControlNetModel:
        """The ControlNet made from `unet`'s current weights (module docstring).

        Raises:
            ValueError where the UNet is quantized or lacks a layer the file updates (another model family).
        """
        if any(isinstance(m, nn.QuantizedLinear) for _, m in unet.named_modules()):
            raise ValueError(f"{name} is a Control-LoRA, made from the model's UNet weights, and this model's UNet is "
                             "quantized; use the float model (without --quantize)")  # fmt: skip
        base = dict(tree_flatten(unet.parameters()))
        unet_fields = {f.name for f in fields(UNetConfig)}
        own = {f.name: getattr(self.config, f.name) for f in fields(ControlNetConfig) if f.name not in unet_fields}
        config = ControlNetConfig(**{**asdict(unet.config), **own, "in_channels": self.config.in_channels})
        model = ControlNetModel(config)
        shapes = {k: v.shape for k, v in tree_flatten(model.parameters())}
        used = tuple(base[k] for k in shapes if k not in self.tensors and k in base)
        if self._bound and len(self._bound[0][0]) == len(used) and all(a is b for a, b in zip(self._bound[0][0], used)):
            return self._bound[0][1]
        dtype = next(iter(base.values())).dtype
        weights = []
        for key, shape in shapes.items():
            value = self.tensors.get(key, base.get(key))
            if value is None or value.shape != shape:
                found = "no such layer" if value is None else f"{tuple(value.shape)}"
                raise ValueError(f"{name}: the model's UNet does not fit this Control-LoRA ({key}: {found}, the file "
                                 f"needs {tuple(shape)}); use a Control-LoRA made for this model's family")  # fmt: skip
            if key in self.deltas:
                up, down = self.deltas[key]
                value = value.astype(mx.float32) + (up.astype(mx.float32) @ down.astype(mx.float32)).reshape(shape)
            weights.append((key, value.astype(dtype)))
        model.load_weights(weights, strict=True)
        model.eval()
        mx.eval(model.parameters())
        self._bound[:] = [(used, model)]
        return model
