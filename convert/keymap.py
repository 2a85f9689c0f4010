"""Declarative key maps: every source tensor renamed or dropped for a stated reason, every parameter filled.

A map is a list of `Rule`s tried in order; the first whose pattern matches the *whole* source key wins. A rule
either renames (re.sub template) or drops the tensor with the reason written beside it. `map_keys` then
checks the result against the model's own parameter shapes, from the source's shapes alone, and raises one
`ConversionError` listing every key that was not matched, not filled, filled twice or of the wrong shape. Nothing
is ever skipped silently. `read_mapped` reads one planned parameter, so a converter can stream a file tensor by
tensor; `apply_rules` does both for a whole state dict.

Layouts change here and only here: torch conv weights (O, I, kH, kW) become MLX's (O, kH, kW, I), and 1x1
convolutions whose MLX counterpart is a Linear (SD1's `proj_in`/`proj_out`, the original VAE's attention)
lose their trailing (1, 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sd.components import build, parameter_shapes

# How many offending keys an error message lists before summarising.
_SHOWN_KEYS = 8


class ConversionError(ValueError):
    """A checkpoint does not fit the model it is converted to; the message names the keys and a likely cause."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | None  # re.sub template over the match, or None to drop
    why: str = ""  # required for drops: the reason the tensor is not a parameter we need
    # Optional value transform (e.g. splitting a fused projection) returning {suffix: array}; the suffixes are
    # appended to the target name.
    split: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None

    def __post_init__(self):
        if self.target is None and not self.why:
            raise ValueError(f"rule {self.pattern!r} drops tensors without saying why")
        object.__setattr__(self, "_regex", re.compile(self.pattern))


def rename(key: str, rules: Iterable[Rule]) -> tuple[Rule, str | None] | None:
    """The first rule matching all of `key` and the renamed key (None when dropped); None if no rule matches."""
    for rule in rules:
        match = rule._regex.fullmatch(key)
        if match:
            return rule, (None if rule.target is None else match.expand(rule.target))
    return None


def to_mlx_layout(value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Reorder a torch-layout tensor for the MLX parameter of `target_shape`."""
    if value.ndim == 4 and len(target_shape) == 4:
        return value.transpose(0, 2, 3, 1)  # (O, I, kH, kW) -> (O, kH, kW, I)
    if value.ndim == 4 and len(target_shape) == 2 and value.shape[2:] == (1, 1):
        return value.reshape(value.shape[:2])  # 1x1 conv -> Linear
    return value


def _summarise(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return f"{shown}{more}"


@dataclass(frozen=True)
class Mapped:
    """Where one model parameter comes from: a source tensor, the rule that matched it, the part of a split."""

    key: str  # the source key
    rule: Rule
    part: str  # the split suffix ("" when the rule does not split)
    shape: tuple[int, ...]  # the parameter's shape (MLX layout)


def _placeholder(shape: tuple[int, ...]) -> np.ndarray:
    """A zero-strided stand-in of `shape`: planning runs the rules' layout changes on shapes alone, reading nothing."""
    return np.broadcast_to(np.zeros((), np.float32), shape)


def map_keys(
    component: str,
    shapes: Mapping[str, tuple[int, ...]],
    rules: list[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    hint: str = "",
) -> dict[str, Mapped]:
    """Plan a strict mapping from source tensor shapes alone; no tensor is read.

    Args:
        component: name used in error messages ("unet", "vae", ...).
        shapes: source key -> shape (e.g. from a file header).
        rules: the component's key map (splits must depend on the shape only, as layout changes do).
        target_shapes: the model's parameter name -> shape (MLX layout).
        hint: the likely cause to add to an error (e.g. "is this an SD2 checkpoint loaded as SD1?").
    Returns:
        parameter name -> `Mapped`, one entry per parameter; `read_mapped` then reads each when it is needed.
    Raises:
        ConversionError naming every unmatched, unexpected, missing, duplicated or mis-shaped key.
    """
    out: dict[str, Mapped] = {}
    unmatched, unexpected, duplicated, misshaped = [], [], [], []
    for key, shape in shapes.items():
        found = rename(key, rules)
        if found is None:
            unmatched.append(key)
            continue
        rule, name = found
        if name is None:
            continue
        stand_in = _placeholder(tuple(shape))
        parts = rule.split(stand_in) if rule.split else {"": stand_in}
        for suffix, value in parts.items():
            full = name + suffix
            if full not in target_shapes:
                unexpected.append(f"{key} -> {full}")
                continue
            if full in out:
                duplicated.append(f"{out[full].key} and {key} -> {full}")
                continue
            value = to_mlx_layout(np.asarray(value), target_shapes[full])
            if tuple(value.shape) != tuple(target_shapes[full]):
                misshaped.append(f"{key} {tuple(value.shape)} -> {full} {tuple(target_shapes[full])}")
                continue
            out[full] = Mapped(key, rule, suffix, tuple(target_shapes[full]))
    missing = [k for k in target_shapes if k not in out]

    problems = []
    if unmatched:
        problems.append(f"{len(unmatched)} checkpoint tensors match no rule ({_summarise(unmatched)})")
    if unexpected:
        problems.append(
            f"{len(unexpected)} checkpoint tensors are not parameters of this model ({_summarise(unexpected)})"
        )
    if duplicated:
        problems.append(f"{len(duplicated)} parameters are filled twice ({_summarise(duplicated)})")
    if misshaped:
        problems.append(f"{len(misshaped)} tensors have the wrong shape ({_summarise(misshaped)})")
    if missing:
        problems.append(f"{len(missing)} parameters are missing from the checkpoint ({_summarise(missing)})")
    if problems:
        raise ConversionError(f"{component}: " + "; ".join(problems) + (f". {hint}" if hint else ""))
    return out


def read_mapped(source: Mapping[str, np.ndarray], mapped: Mapped) -> np.ndarray:
    """Read one planned parameter from `source`, in MLX layout and the source's dtype (a view where possible)."""
    value = source[mapped.key]
    if mapped.rule.split:
        value = mapped.rule.split(value)[mapped.part]
    return to_mlx_layout(np.asarray(value), mapped.shape)


def tensor_shapes(source) -> dict[str, tuple[int, ...]]:
    """key -> shape of a checkpoint's tensors (a mapping with `.info(key)`, e.g. `readers.Checkpoint`), read from its
    index: no tensor is read."""
    return {key: tuple(source.info(key).shape) for key in source}


def load_mapped(
    component: str, model: nn.Module, source, rules: list[Rule], dtype: mx.Dtype, hint: str = "", shapes=None
) -> nn.Module:
    """Map `source` onto `model` strictly (`map_keys`) and load it one tensor at a time, cast to `dtype`: a network
    read at run time (ControlNets, adapters), whose source is never held in memory twice. Returns `model` in eval
    mode. Raises ConversionError as `map_keys` does."""
    shapes = tensor_shapes(source) if shapes is None else shapes
    plan = map_keys(component, shapes, rules, parameter_shapes(model), hint)
    model.load_weights([(k, mx.array(read_mapped(source, m)).astype(dtype)) for k, m in plan.items()], strict=True)
    return model.eval()


def apply_rules(
    component: str,
    source: Mapping[str, np.ndarray],
    rules: list[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    hint: str = "",
) -> dict[str, np.ndarray]:
    """Map a source state dict onto a model's parameters, strictly: `map_keys`, then `read_mapped` for each.

    Args:
        component: name used in error messages ("unet", "vae", ...).
        source: source key -> array (a lazy mapping is fine).
        rules, target_shapes, hint: as for `map_keys`.
    Returns:
        parameter name -> array in MLX layout, one entry per parameter.
    Raises:
        ConversionError naming every unmatched, unexpected, missing, duplicated or mis-shaped key.
    """
    shapes = {key: tuple(np.shape(source[key])) for key in source}
    mapping = map_keys(component, shapes, rules, target_shapes, hint)
    return {name: read_mapped(source, mapped) for name, mapped in mapping.items()}


@dataclass(frozen=True)
class ComponentPlan:
    """One component ready to convert: its config, its source tensors (keys relative to `prefix`), the key map.

    `keymap()` checks the whole mapping from shapes (`shapes`, or the source's values when None) without
    reading a tensor; `read()` then reads one parameter, so a writer holds about one tensor at a time.
    """

    name: str  # "unet", "vae" or "text_encoder"
    prefix: str  # where the tensors live in the file, for messages
    config: object  # UNetConfig, VAEConfig or CLIPTextConfig
    source: Mapping[str, np.ndarray] = field(repr=False)
    rules: list[Rule] = field(repr=False)
    hint: str = ""
    shapes: Mapping[str, tuple[int, ...]] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.name} ({self.prefix}*)" if self.prefix else self.name

    def keymap(self) -> dict[str, Mapped]:
        """Parameter name -> where it comes from; raises ConversionError on any mismatch."""
        shapes = self.shapes if self.shapes is not None else {k: tuple(np.shape(v)) for k, v in self.source.items()}
        return map_keys(self.label, shapes, self.rules, parameter_shapes(build(self.config)), self.hint)

    def read(self, mapped: Mapped) -> np.ndarray:
        return read_mapped(self.source, mapped)

    def convert(self) -> dict[str, np.ndarray]:
        """Our parameter name -> array in MLX layout (source dtype); raises ConversionError on any mismatch."""
        return {name: self.read(mapped) for name, mapped in self.keymap().items()}
