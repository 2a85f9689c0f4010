"""Reference-only control: A1111's ControlNet extension's "reference_only", "reference_adain" and
"reference_adain+attn" preprocessors, which need no ControlNet: the UNet itself, run on the reference image, steers
the generation towards it.

At every model call, before the UNet runs on the latents, each active reference unit runs it once on the reference
image's latents noised to the call's (rounded) timestep, q_sample's sqrt(a_t) x0 + sqrt(1 - a_t) noise, with the
same text, and writes (the extension's "auto machine"):
- reference_only (attention): each transformer block's normalised input, for the blocks whose rank (the blocks sorted
  by width, widest first, i / n) is below the unit's weight; in the UNet's own pass these blocks' self-attention then
  attends to their own tokens and the reference's together. With a style fidelity s, the unconditional half of
  classifier-free guidance is mixed towards plain self-attention: s x plain + (1 - s) x joint there;
- reference_adain: the mean and variance over the pixels of chosen blocks' outputs (the original UNet's middle block,
  input blocks 4, 5, 7, 8, 10, 11 and output blocks 0-7; SDXL: input 4, 5, 7, 8, output 0-5; each with a rank,
  written below the weight), which the UNet's own pass then gives its outputs there (AdaIN, eps 1e-6 on variances),
  the unconditional half mixed towards the untouched output by s;
- reference_adain+attn: both.
Units write in order and a block reads (and clears) what was written whenever its machine is not writing, as in the
extension. The style fidelity is threshold_a (default 0.5), cubed for SDXL; 1 in "ControlNet is more important" mode,
0 in "My prompt is more important" mode and in a hires fix's second pass. The reference image is fitted to the
generation size like a control image and VAE-encoded to its mean (the extension samples with an unseeded generator);
the noise comes from the request's seed (the extension draws it from torch's global generator).

The UNet calls `self_attention` in every transformer block and `block_output` after every block (mlx_sd/models/unet.py)
while a model call holds this object in its TextContext.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
STYLE_FIDELITY = 0.5  # threshold_a's default
GN_EPS = 1e-6
# the original UNet's block numbers whose outputs AdaIN normalises (the extension's lists), per family
ADAIN_BLOCKS = {False: ((4, 5, 7, 8, 10, 11), tuple(range(8))), True: ((4, 5, 7, 8), tuple(range(6)))}


def transformer_blocks(unet) -> list:
    """The UNet's transformer blocks in the original code's module order: down path, middle, up path."""
    stages = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    return [b for s in stages if "attentions" in s for a in s.attentions for b in a.transformer_blocks]


def adain_blocks(unet, sdxl: bool) -> list[tuple[object, float]]:
    """(the module naming a block output, its rank x 2) for the blocks AdaIN normalises (module docstring):
    input block i is layer (i - 1) % (L + 1) of down stage (i - 1) // (L + 1), output block i layer i % (L + 1) of up
    stage i // (L + 1), L the UNet's layers per block; numbers the UNet does not have are left out."""
    inputs, outputs = ADAIN_BLOCKS[sdxl]
    per = unet.config.layers_per_block + 1
    found = [(unet.mid_block, 0.0)]
    for w, i in enumerate(inputs):
        stage, layer = divmod(i - 1, per)
        if stage < len(unet.down_blocks) and layer < len(unet.down_blocks[stage].resnets):
            found.append((unet.down_blocks[stage].resnets[layer], 2.0 * (1.0 - w / len(inputs))))
    for w, i in enumerate(outputs):
        stage, layer = divmod(i, per)
        if stage < len(unet.up_blocks) and layer < len(unet.up_blocks[stage].resnets):
            found.append((unet.up_blocks[stage].resnets[layer], 2.0 * w / len(outputs)))
    return found


def style_fidelity(unit, sdxl: bool, hires_pass: bool) -> float:
    """The unit's style fidelity (module docstring)."""
    if unit.control_mode == "controlnet":
        return 1.0
    if unit.control_mode == "prompt" or hires_pass:
        return 0.0
    s = min(max(STYLE_FIDELITY if unit.threshold_a is None else float(unit.threshold_a), 0.0), 1.0)
    return s**3 if sdxl else s


class Reference:
    """A pass's reference units and the UNet's hook tables.

    Args:
        unet: the pass's UNet.
        units: (unit, its reference image's (1, h, w, 4) latents) per reference unit.
        sdxl, hires_pass: what the style fidelity and the AdaIN blocks depend on.
        alphas_cumprod: the model's training schedule (float32).
        seed: where the noise comes from.
    """

    def __init__(self, unet, units: list, sdxl: bool, hires_pass: bool, alphas_cumprod: np.ndarray, seed: int):
        blocks = transformer_blocks(unet)
        ranked = sorted(blocks, key=lambda b: -b.norm1.weight.shape[0])  # stable: widest first, in module order
        self._attn_rank = {id(b): i / len(ranked) for i, b in enumerate(ranked)}
        self._gn_rank = {id(m): rank for m, rank in adain_blocks(unet, sdxl)}
        self.units = [(u, latents, style_fidelity(u, sdxl, hires_pass)) for u, latents in units]
        self._alphas = alphas_cumprod.astype(np.float64)
        self._key = mx.random.key(seed)
        self._attn_write = self._gn_write = None  # the writing unit's weight, or None: reading
        self._style = 0.0
        self._banks: dict[int, list] = {}  # block -> [(normed input, style)] or [(mean, var, style)]
        self.uncond = 0  # the batch's unconditional rows (the first ones)

    def noise(self, shape: tuple[int, ...]) -> mx.array:
        """The noise of one reference pass (a fresh draw from the seed's stream)."""
        self._key, key = mx.random.split(self._key)
        return mx.random.normal(shape, key=key)

    def write(self, run, x: mx.array, t: float, active, extra: mx.array | None, uncond: int) -> None:
        """Run each active unit's reference pass (`run(latents)` runs the UNet with this call's other inputs)
        before the UNet's own pass on `x` at timestep t; `extra`: an inpainting UNet's 5 further channels (the
        reference's: a zero mask and its latents), `uncond`: the batch's unconditional rows."""
        self._banks.clear()
        self.uncond = uncond
        i = int(np.round(float(t)))
        a, b = float(np.sqrt(self._alphas[i])), float(np.sqrt(1.0 - self._alphas[i]))
        for unit, latents, style in self.units:
            if not active(unit):
                continue
            noised = a * latents.astype(x.dtype) + b * self.noise(x.shape[:3] + (latents.shape[-1],)).astype(x.dtype)
            if extra is not None:
                zeros = mx.zeros((*noised.shape[:3], 1), x.dtype)
                noised = mx.concatenate([noised, zeros, mx.broadcast_to(latents, noised.shape).astype(x.dtype)], -1)
            self._style = style
            self._attn_write = unit.weight if unit.module in ("reference_only", "reference_adain+attn") else None
            self._gn_write = unit.weight if unit.module in ("reference_adain", "reference_adain+attn") else None
            run(noised)
            self._attn_write = self._gn_write = None

    def self_attention(self, block, normed: mx.array, x: mx.array) -> mx.array:
        """A transformer block's self-attention plus its input `x`, given its normalised input."""
        key = id(block)
        if self._attn_write is not None:
            if self._attn_write > self._attn_rank.get(key, np.inf):
                self._banks.setdefault(key, []).append((normed, self._style))
            return block.attn1(normed, residual=x)
        bank = self._banks.pop(key, None)
        if not bank:
            return block.attn1(normed, residual=x)
        style = sum(s for _, s in bank) / len(bank)
        joint = block.attn1(normed, mx.concatenate([normed, *(n for n, _ in bank)], axis=1))
        mixed = joint
        if self.uncond and style > 1e-5:
            plain = block.attn1(normed[: self.uncond])
            mixed = mx.concatenate([plain, joint[self.uncond :]])
        return style * mixed + (1.0 - style) * joint + x

    def block_output(self, key_module, x: mx.array) -> mx.array:
        """A block's output through AdaIN (module docstring)."""
        key = id(key_module)
        if self._gn_write is not None:
            if self._gn_write > self._gn_rank.get(key, np.inf):
                mean, var = _moments(x)
                self._banks.setdefault(key, []).append((mean, var, self._style))
            return x
        bank = self._banks.pop(key, None)
        if not bank:
            return x
        style = sum(s for *_, s in bank) / len(bank)
        mean, var = _moments(x)
        mean_ref = sum(m for m, _, _ in bank) / len(bank)
        var_ref = sum(v for _, v, _ in bank) / len(bank)
        std, std_ref = (mx.sqrt(mx.maximum(v, GN_EPS)) for v in (var, var_ref))
        normalised = ((x.astype(mx.float32) - mean) / std * std_ref + mean_ref).astype(x.dtype)
        mixed = normalised
        if self.uncond and style > 1e-5:
            mixed = mx.concatenate([x[: self.uncond], normalised[self.uncond :]])
        return (style * mixed + (1.0 - style) * normalised).astype(x.dtype)


def _moments(x: mx.array) -> tuple[mx.array, mx.array]:
    """Per image and channel, the mean and (population) variance over the pixels, in float32."""
    x = x.astype(mx.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return mean, mx.square(x - mean).mean(axis=(1, 2), keepdims=True)
