"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") applied to a loaded model.

A LoRA adds a low-rank update to some layers: W' = W + multiplier * scale * up @ down, with down (r, in) and up
(out, r) (for a convolution, down is itself a convolution with the layer's kernel and up a 1x1 one), and
scale = alpha / r. This module takes LoRAs whose keys are already mapped onto our parameter names (reading kohya,
A1111, diffusers/PEFT and SD3 files is `mlx_sd_convert.lora`'s job) and applies one or several to a model (its
denoiser, a UNet or SD3's MMDiT, is the component "unet"; the text encoders, SD3's T5 included, are the others):

- Floating-point layers (Linear and Conv2d): the deltas are fused into the weights, so sampling runs at the speed
  of the plain model. The original weight arrays are kept, so unfusing puts back the very same arrays (bit-exact).
- Quantized layers (`nn.QuantizedLinear`): a delta cannot be fused into packed integer weights without
  re-quantizing, which would change the model itself. These layers are wrapped instead: the wrapper runs the
  quantized layer and adds multiplier * scale * (x @ down.T) @ up.T at run time (the way diffusers/PEFT run LoRAs
  unfused). Unwrapping restores the quantized layer object.

LyCORIS networks (LoHa, LoKr, full) and DoRA (`mlx_sd.lycoris`) only exist as a dense delta of the whole weight, and
are applied as AUTOMATIC1111 does: each layer's networks in order, DoRA renormalising the weight as it stands after
the networks before it (by A1111's, ComfyUI's or PEFT's rule, as the magnitudes' kind says). Fused, that is W + the
delta; on a quantized layer the wrapper adds x @ delta.T, one dense (out, in) term per layer, of the size and cost of
an unquantized weight.

Switching LoRAs between requests restores the originals and fuses the new set; the model is never reloaded.
The prompt syntax `<lora:name:weight>` (AUTOMATIC1111) is parsed here; the name is resolved by a callable the
application provides (a configured LoRA folder).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from .components import build
from .lycoris import DoRA, NetworkLayer

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3")  # "unet": the denoiser, SD3's too
# A1111's extra-network syntax: <kind:arg[:arg...]>; `lora` (and its alias `lyco`) is the kind handled here.
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")
SHORT_HASH = 12  # A1111 records the first 12 hex digits of a LoRA's or embedding's hash


@dataclass(frozen=True, eq=False)
class LoRALayer(NetworkLayer):
    """The low-rank update of one layer, in MLX layout.

    down: (r, in) for a Linear, (r, kh, kw, in) for a Conv2d; up: (out, r); scale: alpha / r (1 without alpha, or
    the file's `.scale`);
    dora: DoRA's magnitudes and rule (`mlx_sd.lycoris.DoRA`), None for a plain LoRA.
    """

    down: mx.array
    up: mx.array
    scale: float = 1.0
    dora: DoRA | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def low_rank(self) -> bool:
        return self.dora is None

    def delta(self) -> mx.array:
        """scale * up @ down in float32, shaped as the layer's weight: (out, in) or (out, kh, kw, in)."""
        down = self.down.astype(mx.float32)
        delta = self.up.astype(mx.float32) @ down.reshape(self.rank, -1)
        return (self.scale * delta).reshape(self.up.shape[0], *down.shape[1:])


@dataclass(frozen=True, eq=False)
class LoRA:
    """A LoRA mapped onto a model's parameter names.

    name: what the user calls it (the file name without extension).
    layers: component (`COMPONENTS`: "unet" is the denoiser, SD3's MMDiT too) -> module path -> the layer's update:
        a `LoRALayer`, or a LyCORIS kind (`mlx_sd.lycoris`: LoHaLayer, LoKrLayer, FullLayer).
    sha256: A1111's hash of the file (for safetensors, of the bytes after the header), "" if unknown.
    family: the model family it was mapped for ("sd1", "sdxl", "sd3", ...).
    path: the file it came from.
    """

    name: str
    layers: Mapping[str, Mapping[str, NetworkLayer]]
    sha256: str = ""
    family: str = ""
    path: str = ""

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHORT_HASH]

    def __repr__(self) -> str:
        counts = ", ".join(f"{c}: {len(v)}" for c, v in self.layers.items())
        return f"LoRA({self.name!r}, {self.family}, layers {{{counts}}})"


@dataclass(frozen=True)
class AppliedLoRA:
    """A LoRA with its multipliers: `weight` for the UNet (or MMDiT), `text_weight` for the text encoders (None: same).

    A1111's `<lora:name:w>` sets both to w; `<lora:name:te:unet>` sets them apart.
    mentioned: the name written in the prompt ("" when the LoRA was set from Python or the CLI).
    """

    lora: LoRA
    weight: float = 1.0
    text_weight: float | None = None
    mentioned: str = ""

    def multiplier(self, component: str) -> float:
        if component == "unet" or self.text_weight is None:
            return self.weight
        return self.text_weight

    def tag(self) -> str:
        """The A1111 prompt tag for this LoRA, e.g. "<lora:name:0.8>"."""
        weights = [self.weight] if self.text_weight in (None, self.weight) else [self.text_weight, self.weight]
        return f"<lora:{self.mentioned or self.lora.name}:{':'.join(_number(w) for w in weights)}>"


def _number(value: float) -> str:
    return f"{value:g}"


# --- what a LoRA may target ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRATargets:
    """What a LoRA file is mapped onto: the model family, its denoiser's config (a UNet's for original-LDM block
    names, SD3's MMDiT's for Stability's) and the weight shape (MLX layout, unquantized) of every Linear/Conv2d layer
    per component, by module path."""

    family: str
    unet_config: object
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]] = field(repr=False)


@lru_cache(maxsize=8)
def _layer_shapes(config) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape of each Linear/Conv2d of the unquantized model for `config` (embedding tables,
    e.g. CLIP's and T5's token embeddings, are not layers a LoRA adapts)."""
    return {path: tuple(module.weight.shape) for path, module in build(config).named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}  # fmt: skip


def lora_targets(model) -> LoRATargets:
    """The layers of a `StableDiffusion` model a LoRA may adapt (from its configs; quantization does not matter)."""
    shapes = {component: _layer_shapes(network.config) for component, network in lora_networks(model).items()}
    return LoRATargets(model.info.family, model.unet.config, shapes)


def lora_networks(model) -> dict[str, nn.Module]:
    """component name -> the live network a LoRA patches: the denoiser ("unet", SD3's MMDiT too), the CLIP towers
    and SD3's T5 ("text_encoder_3") when the model has one."""
    text = model.text_encoder()
    networks = {"unet": model.unet}
    for tower in text.towers:
        networks[tower.name] = tower.encoder
    if text.t5 is not None and text.t5.encoder is not None:
        networks[text.t5.name] = text.t5.encoder
    return networks


# --- applying -----------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A quantized Linear plus updates computed at run time: base(x) + sum_i m_i (x @ down_i.T) @ up_i.T for LoRAs
    (m_i = multiplier_i * scale_i), or base(x) + x @ dense.T (+ bias) when the layer's networks only exist as a dense
    delta (LyCORIS kinds, DoRA). `base` is the original layer, put back by `LoRAState` when unloading.
    """

    def __init__(self, base: nn.Module, terms: list[tuple[LoRALayer, float]], dtype: mx.Dtype,
                 dense: mx.array | None = None, bias: mx.array | None = None):  # fmt: skip
        super().__init__()
        self.base = base
        self.downs = [layer.down.astype(dtype) for layer, _ in terms]
        self.ups = [(layer.up * (m * layer.scale)).astype(dtype) for layer, m in terms]
        self.dense = [] if dense is None else [dense.astype(dtype)]  # (out, in)
        self.bias_update = [] if bias is None else [bias.astype(dtype)]  # (out,)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        for down, up in zip(self.downs, self.ups):
            y = y + (x @ down.T) @ up.T  # (..., r) then (..., out): never forms the (out, in) delta
        for delta in self.dense:
            y = y + x @ delta.T  # a second (out, in) matmul: the cost of an unquantized layer
        for bias in self.bias_update:
            y = y + bias
        return y


@dataclass
class _Patched:
    network: nn.Module
    originals: dict[str, mx.array]  # module path -> original weight (fused layers)
    wrapped: dict[str, nn.Module]  # module path -> original module (run-time layers)
    biases: dict[str, mx.array | None] = field(default_factory=dict)  # module path -> original bias (None: had none)


class LoRAState:
    """The LoRAs applied to one model's networks, and what unapplying them restores.

    `apply(networks, loras)` makes exactly `loras` active: it restores every patched layer first, then fuses or
    wraps the new set. Calling it again with the same LoRAs and multipliers does nothing.
    """

    def __init__(self):
        self._patched: dict[str, _Patched] = {}
        self._signature: tuple = ()
        self._held: list[AppliedLoRA] = []

    @property
    def active(self) -> bool:
        return bool(self._patched)

    def apply(self, networks: Mapping[str, nn.Module], loras: Sequence[AppliedLoRA]) -> None:
        """Make `loras` the active set on `networks` (component -> network); [] unloads everything.

        Raises:
            ValueError naming the LoRA and layer when a LoRA does not fit the networks (nothing is changed then).
        """
        signature = tuple((id(a.lora), a.weight, a.text_weight) for a in loras)
        signature += tuple(sorted((c, id(n)) for c, n in networks.items()))
        if signature == self._signature:
            return
        plans = {component: self._plan(component, network, loras) for component, network in networks.items()}
        for component, record in list(self._patched.items()):
            if networks.get(component) is record.network:
                _restore(record)
            del self._patched[component]  # a network reloaded from disk (low-memory mode) is already pristine
        for component, terms in plans.items():
            if terms:
                self._patched[component] = _patch(networks[component], terms)
        self._signature = signature
        self._held = list(loras)  # keeps the ids in the signature from being reused by new objects

    def clear(self, networks: Mapping[str, nn.Module]) -> None:
        """Restore every patched layer (the exact original arrays and modules)."""
        self.apply(networks, [])

    def _plan(self, component, network, loras) -> dict[str, list[tuple[NetworkLayer, float]]]:
        """module path -> [(layer, multiplier)] for one network, checked against the (unpatched) layers."""
        modules = dict(_original_modules(network, self._patched.get(component)))
        terms: dict[str, list[tuple[NetworkLayer, float]]] = {}
        for applied in loras:
            m = applied.multiplier(component)
            for path, layer in applied.lora.layers.get(component, {}).items():
                module = modules.get(path)
                if module is None:
                    raise ValueError(
                        f"LoRA {applied.lora.name!r}: {component} has no layer {path}; it was mapped for "
                        f"another model ({applied.lora.family}), load it again for this one"
                    )
                out_in = _out_in(module)
                want = tuple(layer.shape)
                if out_in != want:
                    raise ValueError(
                        f"LoRA {applied.lora.name!r}: {component}.{path} is {out_in}, the LoRA makes {want}; "
                        "it was made for another model"
                    )
                if m != 0:  # 0 leaves the layer alone (PEFT's DoRA at 0 would still rescale it: magnitude / ||W0||)
                    terms.setdefault(path, []).append((layer, m))
        return terms

    def __repr__(self) -> str:
        return f"LoRAState(components={sorted(self._patched)})"


def _original_modules(network: nn.Module, record: _Patched | None):
    for path, module in network.named_modules():
        if isinstance(module, LoRALinear):
            continue
        if path.endswith(".base") and record is not None and path[: -len(".base")] in record.wrapped:
            path = path[: -len(".base")]
        yield path, module


def _out_in(module: nn.Module) -> tuple[int, ...]:
    """The weight shape a LoRA delta must have for this layer: (out, in) or (out, kh, kw, in)."""
    if isinstance(module, nn.QuantizedLinear):
        out, packed = module.weight.shape
        return (out, packed * 32 // module.bits)
    return tuple(module.weight.shape)


def _patch(network: nn.Module, terms: dict[str, list[tuple[NetworkLayer, float]]]) -> _Patched:
    record = _Patched(network, {}, {})
    modules = dict(network.named_modules())
    dense = []  # the wrappers' dense terms, computed now rather than at the first step
    for path, layer_terms in terms.items():
        module = modules[path]
        if isinstance(module, nn.QuantizedLinear):
            dtype = module.scales.dtype
            if all(layer.low_rank for layer, _ in layer_terms):
                wrapper = LoRALinear(module, layer_terms, dtype)
            else:  # one dense term for all of the layer's networks; DoRA sees the dequantized weight
                delta, bias = _updates(_dequantized(module), layer_terms)
                wrapper = LoRALinear(module, [], dtype, delta, bias)
                dense += wrapper.dense + wrapper.bias_update
            _set_module(network, path, wrapper)
            record.wrapped[path] = module
            continue
        weight = module.weight
        delta, bias = _updates(weight.astype(mx.float32), layer_terms)
        module.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        record.originals[path] = weight
        if bias is not None:
            record.biases[path] = old = module.get("bias")  # None: the layer had none, restored without one
            if old is None:
                module.bias = bias.astype(weight.dtype)
            else:
                module.bias = (old.astype(mx.float32) + bias).astype(old.dtype)
    mx.eval([modules[p].weight for p in record.originals], [modules[p].bias for p in record.biases], dense)
    return record


def _updates(weight: mx.array, terms: list[tuple[NetworkLayer, float]]) -> tuple[mx.array, mx.array | None]:
    """The change of one layer's weight (float32, MLX layout) and of its bias (None: unchanged) that its networks make,
    each in order as A1111's network_apply_weights adds them: multiplier * scale * dW, or with DoRA the change its rule
    makes to the weight as the networks before left it (`mlx_sd.lycoris.DoRA.change`)."""
    delta, bias = 0, None
    for layer, m in terms:
        update = layer.delta()
        delta = delta + (m * update if layer.dora is None else layer.dora.change(weight, weight + delta, update, m))
        if layer.bias is not None:  # A1111: ex_bias * multiplier, unscaled
            term = m * layer.bias.astype(mx.float32)
            bias = term if bias is None else bias + term
    return delta, bias


def _dequantized(module: nn.QuantizedLinear) -> mx.array:
    """The float32 weight (out, in) a quantized Linear computes with."""
    weight = mx.dequantize(module.weight, module.scales, module.get("biases"), module.group_size, module.bits,
                           mode=module.mode)  # fmt: skip
    return weight.astype(mx.float32)


def _restore(record: _Patched) -> None:
    modules = dict(record.network.named_modules())
    for path, weight in record.originals.items():
        modules[path].weight = weight
    for path, bias in record.biases.items():
        if bias is None:
            modules[path].pop("bias")
        else:
            modules[path].bias = bias
    for path, module in record.wrapped.items():
        _set_module(record.network, path, module)


def _set_module(network: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    parent = network
    for part in parents:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    if isinstance(parent, list):
        parent[int(last)] = module
    else:
        setattr(parent, last, module)


# --- the prompt syntax ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRATag:
    """One `<lora:name:te_weight:unet_weight>` tag of a prompt (weights default to 1; one weight sets both)."""

    name: str
    weight: float = 1.0
    text_weight: float | None = None


def parse_lora_tags(prompt: str) -> tuple[str, list[LoRATag]]:
    """Remove A1111 extra-network tags from a prompt: ("a cat <lora:ink:0.8>") -> ("a cat ", [LoRATag("ink", 0.8)]).

    As A1111 reads them: `<lora:name:te:unet>`, positional multipliers (one sets both), or named `te=`/`unet=`.

    Raises:
        ValueError for a malformed tag or another kind of extra network (`<hypernet:...>`), which mlx-sd cannot
        apply: silently dropping it would make a different image than the prompt asks for.
    """
    tags = []
    for match in _EXTRA_NETWORK.finditer(prompt):
        kind, (name, *args) = match.group(1), match.group(2).split(":")
        usage = "expected <lora:name>, <lora:name:weight>, <lora:name:te_weight:unet_weight> or te=/unet= weights"
        if kind not in LORA_KINDS:
            raise ValueError(f"{match.group(0)}: extra networks of kind {kind!r} are not supported (only <lora:...>)")
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        if not name.strip() or len(positional) > 2 or set(named) - {"te", "unet"}:
            raise ValueError(f"{match.group(0)}: {usage}")
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"{match.group(0)}: {usage}") from None
        tags.append(LoRATag(name.strip(), unet, None if te == unet else te))
    return _EXTRA_NETWORK.sub("", prompt), tags


def strip_lora_tags(prompt: str) -> str:
    """The prompt text the text encoders see: every `<lora:...>` tag removed."""
    return _EXTRA_NETWORK.sub("", prompt)


def lora_hashes(loras: Sequence[AppliedLoRA]) -> str | None:
    """A1111's "Lora hashes" infotext value: "name: hash12, other: hash12" (":" and "," removed from names)."""
    pairs = {}
    for applied in loras:
        if applied.lora.short_hash:
            name = (applied.mentioned or applied.lora.name).translate(str.maketrans("", "", ":,"))
            pairs[name] = applied.lora.short_hash
    return ", ".join(f"{k}: {v}" for k, v in pairs.items()) or None
