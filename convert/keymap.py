"""Declarative key maps: every source tensor renamed or dropped for a stated reason, every parameter filled.

A map is a list of `Rule`s tried in order; the first whose pattern matches the *whole* source key wins. A rule
either renames (re.sub template) or drops the tensor with the reason written beside it. `apply_rules` then
checks the result against the model's own parameter shapes, and raises one `ConversionError` listing every
key that was not matched, not filled, filled twice or of the wrong shape. Nothing is ever skipped silently.

Layouts change here and only here: torch conv weights (O, I, kH, kW) become MLX's (O, kH, kW, I), and 1x1
convolutions whose MLX counterpart is a Linear (SD1's `proj_in`/`proj_out`, the original VAE's attention)
lose their trailing (1, 1).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

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


def apply_rules(
    component: str,
    source: Mapping[str, np.ndarray],
    rules: list[Rule],
    target_shapes: Mapping[str, tuple[int, ...]],
    hint: str = "",
) -> dict[str, np.ndarray]:
    """Map a source state dict onto a model's parameters, strictly.

    Args:
        component: name used in error messages ("unet", "vae", ...).
        source: source key -> array (a lazy mapping is fine; each value is read once).
        rules: the component's key map.
        target_shapes: the model's parameter name -> shape (MLX layout).
        hint: the likely cause to add to an error (e.g. "is this an SD2 checkpoint loaded as SD1?").
    Returns:
        parameter name -> array in MLX layout, one entry per parameter.
    Raises:
        ConversionError naming every unmatched, unexpected, missing, duplicated or mis-shaped key.
    """
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    unmatched, unexpected, duplicated, misshaped = [], [], [], []
    for key in source:
        found = rename(key, rules)
        if found is None:
            unmatched.append(key)
            continue
        rule, name = found
        if name is None:
            continue
        parts = rule.split(source[key]) if rule.split else {"": source[key]}
        for suffix, value in parts.items():
            full = name + suffix
            if full not in target_shapes:
                unexpected.append(f"{key} -> {full}")
                continue
            if full in out:
                duplicated.append(f"{origin[full]} and {key} -> {full}")
                continue
            value = to_mlx_layout(np.asarray(value), target_shapes[full])
            if tuple(value.shape) != tuple(target_shapes[full]):
                misshaped.append(f"{key} {tuple(value.shape)} -> {full} {tuple(target_shapes[full])}")
                continue
            out[full] = value
            origin[full] = key
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
