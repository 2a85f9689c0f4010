"""ControlNet units: which ControlNet, which control image, how strongly, when, and on which guidance half.

A request carries `ControlNetUnit`s (A1111's ControlNet extension calls them units; diffusers' pipelines take the
same settings as lists). The pipeline prepares them once per pass (`Controls`) and calls them inside its model
function: every active unit runs its ControlNet on the UNet's input and the residuals of all units are summed
(diffusers' MultiControlNetModel, A1111's units) before the UNet adds them to its skip connections.

Settings, with the references they follow:
- weight: the residuals' scale (diffusers' controlnet_conditioning_scale).
- guidance_start, guidance_end: the fraction of the steps in which the unit acts. Step i of n (0-based) is outside
  when i/n < start, or when (i+1)/n > end for diffusers-style samplers (diffusers' controlnet_keep) and i/n > end for
  A1111-style ones (the extension's guidance_schedule_handler); every model call of a step counts as that step.
- control_mode (residual i of n is scaled by s_i):
    "balanced"     s_i = weight, both guidance halves (A1111's "Balanced", diffusers' default)
    "prompt"       s_i = weight * 0.825^(12 - i), both halves (A1111's "My prompt is more important": soft injection)
    "controlnet"   soft injection, conditional half only (A1111's "ControlNet is more important": cfg injection)
    "guess"        s_i = weight * 10^(i/(n-1) - 1) (0.1 ... 1), conditional half only (diffusers' guess_mode)
  The unconditional half of a conditional-only unit gets no residual. ControlNets that average their residuals
  (`global_pool_conditions`, ControlNet 1.1 shuffle) apply to the conditional half only, in both references.
- module: the preprocessor that makes the control image from the given one ("none", "invert", "canny";
  mlx_sd/preprocessors.py), with processor_res, threshold_a, threshold_b and pixel_perfect as in A1111's API; or
  "inpaint" for inpainting ControlNets (control_v11p_sd15_inpaint): the request's init image with the area to repaint
  at -1 (diffusers' make_inpaint_condition, A1111's "inpaint_global_harmonious"), the unit's own image unused; or
  "inpaint_only", which also restores the known region at every step as the extension's hook does: the model's
  prediction there is replaced by the noise that leads to the init image's latents (the VAE's mean), blended by the
  weight (clipped to [0, 1]), outside the 10x10 max-pooled mask; the extension applies it at every step, whatever
  the unit's guidance window, and so does mlx-sd.
- resize_mode: how the control image is fitted to the generation size ("resize", "crop", "fill": A1111's "Just
  Resize", "Crop and Resize", "Resize and Fill", as mlx_sd.images.resize does them; diffusers resizes).
- hr_option: which passes of a hires fix the unit acts in ("both"; "low_res_only": the first; "high_res_only": the
  second, and so never without a hires fix), as the extension's `HiResFixOption` / `disabled_by_hr_option`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import mlx.core as mx
import numpy as np
from PIL import Image

from .control_lora import ControlLoRA
from .images import RESIZE_MODES, resize
from .infotext import a1111_title
from .models import ControlNetModel, MMDiTConfig, SD3ControlNetModel, UNetConfig
from .models.layers import max_pool
from .models.t2i_adapter import T2IAdapter
from .models.unet import skip_channels
from .preprocessors import AT_RESOLUTION, PREPROCESSORS, PROCESSOR_RES, pixel_perfect_res, preprocess
from .reference import REFERENCE_MODULES, Reference

CONTROL_MODES = ("balanced", "prompt", "controlnet", "guess")
HR_OPTIONS = ("both", "low_res_only", "high_res_only")
INPAINT = "inpaint"  # the module that reads the request's init image and mask
INPAINT_ONLY = "inpaint_only"  # that, and the known region's prediction restored at every step
INPAINT_MODULES = (INPAINT, INPAINT_ONLY)
MIN_PROCESSOR_RES, MAX_PROCESSOR_RES = 64, 4096  # preprocessor resolutions (short side); A1111's slider: 64 to 2048
MODULES = (*PREPROCESSORS, *INPAINT_MODULES, *REFERENCE_MODULES)
SOFT_INJECTION_BASE = 0.825  # A1111's soft injection: residual i of 13 scaled by 0.825^(12 - i)
SOFT_INJECTION_LAST = 12
ADAPTER_SOFT_INJECTION = (0.25, 0.62, 0.825, 1.0)  # A1111's soft injection of a T2I-Adapter's four features
_COND_ONLY = {"controlnet", "guess"}
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, PIL's convert("L")
# A1111's extension names (its API accepts them, its infotext writes them)
A1111_CONTROL_MODES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
}
A1111_RESIZE_MODES = {"resize": "Just Resize", "crop": "Crop and Resize", "fill": "Resize and Fill"}
A1111_HR_OPTIONS = {"both": "Both", "low_res_only": "Low res only", "high_res_only": "High res only"}
A1111_MODULES = {INPAINT: "inpaint_global_harmonious"}


@dataclass(frozen=True, eq=False)
class ControlNet:
    """A loaded ControlNet (mlx_sd_convert.controlnet.read_controlnet reads one): its network, its name and A1111's
    short hash of its file ("" for folders). `title` is how A1111 lists it: "control_v11p_sd15_canny [d14c016b]".
    A Control-LoRA (`lora`) has no network until `bound` to a model's UNet."""

    model: ControlNetModel | SD3ControlNetModel | T2IAdapter | None
    name: str
    short_hash: str = ""
    lora: ControlLoRA | None = None

    @property
    def title(self) -> str:
        return a1111_title(self.name, self.short_hash)

    def bound(self, unet) -> ControlNet:
        """This ControlNet, a Control-LoRA's network made from `unet`'s current weights (ControlLoRA.bind)."""
        return self if self.lora is None else replace(self, model=self.lora.bind(unet, self.name))

    @property
    def is_adapter(self) -> bool:
        """A T2I-Adapter (features added inside the down blocks) rather than a ControlNet."""
        return isinstance(self.model, T2IAdapter)

    @property
    def is_sd3(self) -> bool:
        """An SD3 / SD3.5 ControlNet (residuals for the MMDiT's blocks) rather than one for a UNet."""
        return isinstance(self.model, SD3ControlNetModel)

    def check(self, unet: UNetConfig | MMDiTConfig) -> None:
        """Raise ValueError unless this ControlNet's residuals fit the denoiser of config `unet` (same family and
        widths)."""
        cfg = self.lora.config if self.lora is not None else self.model.config
        sd3 = isinstance(unet, MMDiTConfig)
        if sd3 != self.is_sd3:
            kind = "an SD3 ControlNet" if self.is_sd3 else "a T2I-Adapter" if self.is_adapter else "a UNet ControlNet"
            model = "an SD3 model (MMDiT)" if sd3 else "an SD 1.x/2.x/XL model (UNet)"
            made = "SD3 / SD3.5 models" if self.is_sd3 else "SD 1.x/2.x/XL models"
            raise ValueError(f"ControlNet {self.name} is {kind}, made for {made}; this is {model}: use a "
                             "ControlNet for this model's family")  # fmt: skip
        if sd3:
            if cfg.extra_conditioning_channels:
                raise ValueError(f"SD3 ControlNet {self.name} takes {cfg.extra_conditioning_channels} extra control "
                                 "channels (an inpainting ControlNet, diffusers' SD3ControlNetInpaintingPipeline), "
                                 "which mlx-sd does not run yet")  # fmt: skip
            mine = (cfg.inner_dim, cfg.in_channels, cfg.patch_size, cfg.pooled_projection_dim)
            theirs = (unet.inner_dim, unet.in_channels, unet.patch_size, unet.pooled_projection_dim)
            text = cfg.joint_attention_dim in (None, unet.joint_attention_dim)
            if mine != theirs or not text:
                raise ValueError(f"SD3 ControlNet {self.name} (width {cfg.inner_dim}, {cfg.num_layers} blocks) was "
                                 f"made for another MMDiT than this model's (width {unet.inner_dim}); use one made "
                                 "for this model (SD3 medium, SD3.5 large, ...)")  # fmt: skip
            return
        if self.is_adapter:
            n = len(unet.block_out_channels)
            if tuple(cfg.channels[:n]) != tuple(unet.block_out_channels) or (cfg.adapter_type == "full_adapter_xl") != (
                unet.addition_time_embed_dim is not None
            ):
                raise ValueError(f"T2I-Adapter {self.name} ({cfg.adapter_type}, channels {cfg.channels}) was made for "
                                 f"another model family than this model's (channels {unet.block_out_channels}); use "
                                 "an adapter for this model's family")  # fmt: skip
            return
        mine = (skip_channels(cfg), cfg.cross_attention_dim, cfg.addition_time_embed_dim is not None)
        theirs = (skip_channels(unet), unet.cross_attention_dim, unet.addition_time_embed_dim is not None)
        if mine != theirs:
            raise ValueError(
                f"ControlNet {self.name} was made for another model family (cross-attention width "
                f"{cfg.cross_attention_dim}, channels {cfg.block_out_channels}) than this model's "
                f"({unet.cross_attention_dim}, {unet.block_out_channels}); use a ControlNet for this model's family"
            )


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet with its control image and settings (module docstring).

    model: a loaded `ControlNet`, or its name for the pipeline's `controlnet_resolver` (a server's --controlnet-dir);
        None for the reference modules (mlx_sd/reference.py), which need no network.
    image: the control image (an edge map, depth map, pose skeleton, ...), RGB, or the photo `module` makes one of.
    module, processor_res, threshold_a, threshold_b, pixel_perfect: the preprocessor (mlx_sd/preprocessors.py),
        its resolution (short side; pixel_perfect: the one the resize mode implies, A1111's "Pixel Perfect") and
        thresholds.
    """

    model: ControlNet | str | None
    image: Image.Image | None = field(default=None, repr=False)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: str = "balanced"
    resize_mode: str = "crop"
    module: str = "none"
    processor_res: int = PROCESSOR_RES
    threshold_a: float | None = None
    threshold_b: float | None = None
    pixel_perfect: bool = False
    hr_option: str = "both"

    def validate(self) -> None:
        """Raise ValueError naming the setting and what is accepted."""
        checks = [
            (
                isinstance(self.image, Image.Image) or self.module in INPAINT_MODULES,
                "a ControlNet unit needs a control image (PIL image)",
            ),
            (self.weight >= 0, f"ControlNet weight={self.weight}: must be >= 0"),
            (
                (self.model is None) == (self.module in REFERENCE_MODULES),
                f"ControlNet module {self.module!r}: "
                + (
                    "a reference module takes no model (model=None)"
                    if self.module in REFERENCE_MODULES
                    else "needs a model (a ControlNet or its name)"
                ),
            ),
            (
                self.module not in REFERENCE_MODULES or self.control_mode != "guess",
                f"ControlNet module {self.module!r}: control_mode 'guess' is diffusers' and has no reference "
                "counterpart; use balanced, prompt or controlnet",
            ),
            (
                0.0 <= self.guidance_start < self.guidance_end <= 1.0,
                f"ControlNet guidance_start={self.guidance_start}, guidance_end={self.guidance_end}: need "
                "0 <= start < end <= 1",
            ),
            (self.control_mode in CONTROL_MODES, f"control_mode={self.control_mode!r}: one of {CONTROL_MODES}"),
            (self.hr_option in HR_OPTIONS, f"ControlNet hr_option={self.hr_option!r}: one of {HR_OPTIONS}"),
            (
                self.resize_mode in RESIZE_MODES[:3],
                f"ControlNet resize_mode={self.resize_mode!r}: one of {RESIZE_MODES[:3]}",
            ),
            (
                self.module in MODULES,
                f"ControlNet module={self.module!r}: mlx-sd runs {', '.join(MODULES)}; preprocess elsewhere "
                "and pass the result with module 'none'",
            ),
            (
                MIN_PROCESSOR_RES <= self.processor_res <= MAX_PROCESSOR_RES,
                f"ControlNet processor_res={self.processor_res}: must be between {MIN_PROCESSOR_RES} and "
                f"{MAX_PROCESSOR_RES}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def model_title(self) -> str:
        """The model as A1111 names it: a loaded one's title, else the name given ("None" for none)."""
        return self.model.title if isinstance(self.model, ControlNet) else str(self.model)

    def to_dict(self) -> dict:
        """The settings and the model's title (the image left out)."""
        model = self.model_title
        names = ("module", "weight", "guidance_start", "guidance_end", "control_mode", "resize_mode")
        return {"model": model, **{k: getattr(self, k) for k in names}}

    def infotext(self) -> str:
        """The unit as A1111's extension records it ("ControlNet 0" in the infotext)."""
        model = self.model_title
        fields = {
            "Module": A1111_MODULES.get(self.module, self.module),
            "Model": model,
            "Weight": self.weight,
            "Resize Mode": A1111_RESIZE_MODES[self.resize_mode],
            "Processor Res": self.processor_res if self.module in AT_RESOLUTION else None,
            "Threshold A": self.threshold_a,
            "Threshold B": self.threshold_b,
            "Guidance Start": self.guidance_start,
            "Guidance End": self.guidance_end,
            "Pixel Perfect": self.pixel_perfect,
            "Control Mode": A1111_CONTROL_MODES.get(self.control_mode, "Guess Mode (diffusers)"),
            "Hr Option": A1111_HR_OPTIONS[self.hr_option] if self.hr_option != "both" else None,
        }
        return ", ".join(f"{k}: {v}" for k, v in fields.items() if v is not None)

    def acts_in(self, hires_pass: bool) -> bool:
        """Whether the unit acts in a hires fix's second pass (True) or in a first or only pass (False)."""
        return self.hr_option == "both" or (self.hr_option == "high_res_only") == hires_pass

    def cond_only(self) -> bool:
        """Whether only the conditional half of classifier-free guidance gets this unit's residuals."""
        return self.control_mode in _COND_ONLY or self._pooled()

    def _pooled(self) -> bool:
        model = self.model.model if isinstance(self.model, ControlNet) else None
        return bool(getattr(getattr(model, "config", None), "global_pool_conditions", False))

    def scales(self, n: int) -> list[float]:
        """The scale of each of the n residuals (the middle block's last) or adapter features, by control_mode."""
        pooled = self._pooled()
        if self.control_mode in ("prompt", "controlnet"):
            if isinstance(self.model, ControlNet) and self.model.is_adapter:  # A1111's soft injection for adapters
                return [self.weight * s for s in ADAPTER_SOFT_INJECTION[:n]] + [self.weight] * (n - 4)
            return [self.weight * SOFT_INJECTION_BASE ** float(SOFT_INJECTION_LAST - i) for i in range(n)]
        if self.control_mode == "guess" and not pooled:  # diffusers: torch.logspace(-1, 0, n)
            return [self.weight * 10.0 ** (-1.0 + i / (n - 1)) for i in range(n)]
        return [self.weight] * n


def control_image(unit: ControlNetUnit, width: int, height: int, crop=None, inpaint=None) -> mx.array:
    """(1, height, width, 3) float32 in [0, 1]: the unit's image preprocessed and fitted to the generation size
    (Lanczos, as diffusers' image processor resizes). `crop`: (the init image's size, the "only masked" inpainting
    region in it): the control image is fitted to the init image, and the region cut out and fitted, as the init
    image is (A1111). `inpaint`: the request's (1, H, W, 3) init image in [-1, 1] and (1, H, W, 1) binary mask at
    the generation size, for the "inpaint" module."""
    if unit.module in INPAINT_MODULES:
        if inpaint is None:
            raise ValueError(f"ControlNet module '{unit.module}' needs an inpainting request (init_image and mask)")
        image, mask = inpaint
        return (image + 1) / 2 * (1 - mask) - mask  # the area to repaint at -1
    mode = unit.resize_mode
    res = pixel_perfect_res(unit.image.size, width, height, mode) if unit.pixel_perfect else unit.processor_res
    if unit.module in REFERENCE_MODULES:  # the reference image as it is
        image = unit.image.convert("RGB")
    else:
        image = preprocess(unit.image, unit.module, res, unit.threshold_a, unit.threshold_b)
    if crop is not None:
        (w, h), region = crop
        image = resize(image, w, h, mode).crop(region.box())
        mode = "resize"
    fitted = resize(image, width, height, mode)
    return mx.array(np.asarray(fitted, dtype=np.float32)[None] / 255.0)


class Controls:
    """A request's units at one size, ready for a model function: `controls(x, t, ...)` -> (ControlNet residuals,
    T2I-Adapter features), each None when no such unit acts at this step.

    The pipeline sets `step` (0-based) before each sampler step; `steps` and `rule` ("diffusers" or "a1111") decide
    the guidance window (module docstring).
    """

    def __init__(
        self,
        units: list[ControlNetUnit],
        width: int,
        height: int,
        steps: int,
        rule: str,
        crop=None,
        inpaint=None,
        known=None,
        reference: Reference | None = None,
        encode=None,
    ):
        """`known`: for "inpaint_only" units, (the init image's (1, h, w, 4) latents, the schedule's float32
        alphas_cumprod); `reference`: the reference units' hooks (mlx_sd/reference.py); `encode(unit, image)`: what
        a unit's network takes instead of its (1, H, W, 3) image (SD3 ControlNets: the image's VAE latents)."""
        self.units = units
        self.reference = reference
        self.known = None
        if known is not None:
            latents, alphas_cumprod = known
            mask = max_pool(inpaint[1], 10, 8, 1)  # the extension's latent mask: 10x10 windows, stride 8
            recip = np.sqrt(1.0 / alphas_cumprod.astype(np.float64))
            recip_m1 = np.sqrt(1.0 / alphas_cumprod.astype(np.float64) - 1)
            self.known = (latents, mask, recip.astype(np.float32), recip_m1.astype(np.float32))
        self.images = {id(u): control_image(u, width, height, crop, inpaint) for u in units if u.model is not None}
        if encode is not None:
            self.images = {id(u): encode(u, self.images[id(u)]) for u in units if u.model is not None}
        # a T2I-Adapter sees neither latents nor timestep: its features are computed once, here
        adapters = [u for u in units if isinstance(u.model, ControlNet) and u.model.is_adapter]
        self.features = {id(u): _adapter_features(u, self.images[id(u)]) for u in adapters}
        self.steps = steps
        self.rule = rule
        self.step = 0

    def restore(self, x: mx.array, t, out: mx.array) -> mx.array:
        """The model's output `out` for the latents `x` (its 4 channels) at timestep t with each "inpaint_only"
        unit's known region restored (the extension's "Post-processing for restore", ldm's
        predict_start_from_noise / predict_noise_from_start at the rounded timestep)."""
        if self.known is None:
            return out
        latents, mask, recip, recip_m1 = self.known
        i = int(np.round(float(t)))
        a, b = float(recip[i]), float(recip_m1[i])
        for unit in self.units:
            if unit.module != INPAINT_ONLY:
                continue
            predicted = a * x - b * out
            x0 = predicted * mask + latents * (1 - mask)
            w = min(max(unit.weight, 0.0), 1.0)
            out = ((a * x - x0) / b) * w + out * (1 - w)
        return out

    def active(self, unit: ControlNetUnit) -> bool:
        i, n = self.step, self.steps
        late = (i + 1) / n > unit.guidance_end if self.rule == "diffusers" else i / n > unit.guidance_end
        return not (i / n < unit.guidance_start or late) and unit.weight > 0

    def __call__(self, x, t, inputs: tuple, cond_inputs: tuple | None) -> tuple:
        """The summed ControlNet residuals ((down, middle) or None) and T2I-Adapter features (a list or None) of the
        active units, for the UNet's batch `x` (4 latent channels).

        Args:
            inputs: (context, pooled, time_ids, timestep_cond) of the whole batch, as the UNet gets them.
            cond_inputs: the same for the conditional half when `x` is a guided [uncond; cond] batch, else None.
        """
        total = features = None
        for unit in self.units:
            if unit.model is None or not self.active(unit):  # (the reference units act through `reference`)
                continue
            model = unit.model.model
            half = cond_inputs is not None and unit.cond_only()
            if unit.model.is_adapter:
                own = self.features[id(unit)]
                own = [f * s for f, s in zip(own, unit.scales(len(own)))]
                own = [mx.broadcast_to(f, (x.shape[0] // 2 if half else x.shape[0], *f.shape[1:])) for f in own]
                if half:
                    own = [mx.concatenate([mx.zeros_like(f), f]) for f in own]
                features = own if features is None else [a + b for a, b in zip(features, own)]
                continue
            xs = x[x.shape[0] // 2 :] if half else x
            image = mx.broadcast_to(self.images[id(unit)], (xs.shape[0], *self.images[id(unit)].shape[1:]))
            context, pooled, time_ids, timestep_cond = cond_inputs if half else inputs
            down, middle = model(xs, t, context, image.astype(x.dtype), pooled, time_ids, timestep_cond)
            outputs = [*down, middle]
            if model.config.global_pool_conditions:
                outputs = [r.mean(axis=(1, 2), keepdims=True) for r in outputs]
            outputs = [r * s for r, s in zip(outputs, unit.scales(len(outputs)))]
            if half:  # the unconditional half gets nothing
                outputs = [mx.concatenate([mx.zeros_like(r), r]) for r in outputs]
            total = outputs if total is None else [a + b for a, b in zip(total, outputs)]
        return (None if total is None else (total[:-1], total[-1])), features


def _adapter_features(unit: ControlNetUnit, image: mx.array) -> list[mx.array]:
    """A T2I-Adapter's features of the unit's (1, H, W, 3) image: one-channel adapters (sketch) see its luminance, as
    a grayscale image given to diffusers' adapter pipeline."""
    adapter = unit.model.model
    if adapter.config.in_channels == 1:
        image = (image * mx.array(LUMA_WEIGHTS)).sum(axis=-1, keepdims=True)
    dtype = adapter.conv_in.weight.dtype if "conv_in" in adapter else adapter.body[0].in_conv.weight.dtype
    features = adapter(image.astype(dtype))
    mx.eval(features)
    return features
