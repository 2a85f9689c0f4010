"""What a generation is asked to do: one frozen dataclass, validated, with per-family defaults filled in.

The field names are the ones users know from AUTOMATIC1111 and diffusers, identical as Python parameters, CLI flags
(`--negative-prompt`) and JSON keys: prompt, negative_prompt, width, height, steps, guidance, sampler, seed,
strength, ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from PIL import Image

from .controlnet import ControlNetUnit
from .images import INPAINTING_FILLS, RESIZE_MODES
from .rng import NOISE_MODES
from .upscale import HIRES_UPSCALERS

# Sizes must be multiples of the VAE's 8x downsampling (one latent pixel at least).
SIZE_MULTIPLE = 8
MIN_SIZE = 8
MAX_SIZE = 8192


@dataclass(frozen=True)
class FamilyDefaults:
    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    schedule_type: str | None = None


# A1111's defaults (20 steps of DPM++ 2M with its automatic Karras schedule, CFG 7) at each family's native size.
FAMILY_DEFAULTS = {
    "sd1": FamilyDefaults(512, 512, 20, 7.0, "DPM++ 2M"),
    "sd2": FamilyDefaults(768, 768, 20, 7.0, "DPM++ 2M"),  # 512 for epsilon (2.x-base) models, see `defaults_for`
    "sdxl": FamilyDefaults(1024, 1024, 20, 7.0, "DPM++ 2M"),
    "sdxl-refiner": FamilyDefaults(1024, 1024, 20, 7.0, "DPM++ 2M"),
    # SD3: diffusers' pipeline defaults (28 steps of its flow-matching Euler, CFG 7); SD3.5: see mlx_sd/sd3.py
    "sd3": FamilyDefaults(1024, 1024, 28, 7.0, "Euler"),
}
# Distilled models run in a few steps without classifier-free guidance. SD-Turbo and SDXL-Turbo were distilled at
# 512x512 (Stability's turbo demo: "H": 512, "W": 512 for both) and for 1-4 steps of Euler ancestral.
TURBO_DEFAULTS = {"steps": 1, "guidance": 0.0, "sampler": "Euler a", "width": 512, "height": 512}
LCM_DEFAULTS = {"steps": 4, "guidance": 1.0, "sampler": "LCM"}
SD3_TURBO_DEFAULTS = {"steps": 4, "guidance": 0.0}  # SD3.5 Large Turbo's card: 4 steps of its Euler, no guidance


# EDM models (mlx_sd/schedules.py): the sampler of the scheduler they are published with, over its sigma schedule;
# Playground v2.5 (EDM epsilon, sigma_data 0.5) at its model card's CFG 3.
EDM_SAMPLERS = {"EDMDPMSolverMultistepScheduler": "DPM++ 2M", "EDMEulerScheduler": "Euler"}
PLAYGROUND_GUIDANCE = 3.0


def edm_defaults(base: FamilyDefaults, scheduler_config: Mapping) -> FamilyDefaults:
    """`base` with an EDM model's published sampler and schedule type (`scheduler_config`: its diffusers config)."""
    sampler = EDM_SAMPLERS.get(scheduler_config.get("_class_name"), base.sampler)
    schedule = str(scheduler_config.get("sigma_schedule", "karras")).capitalize()
    playground = (
        scheduler_config.get("prediction_type", "epsilon") == "epsilon"
        and scheduler_config.get("sigma_data", 0.5) == 0.5
    )
    guidance = PLAYGROUND_GUIDANCE if playground else base.guidance
    return replace(base, sampler=sampler, schedule_type=schedule, guidance=guidance)


def defaults_for(family: str, prediction_type: str = "epsilon", kind: str = "") -> FamilyDefaults:
    """Defaults for a model: its family's size and A1111's sampling defaults; turbo/LCM models differ."""
    base = FAMILY_DEFAULTS[family]
    if family == "sd2" and prediction_type == "epsilon":
        base = replace(base, width=512, height=512)
    if kind == "turbo":
        base = replace(base, **(SD3_TURBO_DEFAULTS if family == "sd3" else TURBO_DEFAULTS))
    elif kind == "lcm":
        base = replace(base, **LCM_DEFAULTS)
    return base


@dataclass(frozen=True)
class GenerationRequest:
    """Parameters of one generation. None means "the model's default" (filled in by `resolved`).

    Text: prompt, negative_prompt (A1111 emphasis syntax and BREAK; long prompts are windowed, never truncated),
        clip_skip (1 = last layer, A1111's numbering).
    Size and sampling: width, height (multiples of 8), steps, guidance (classifier-free guidance scale; <= 1 runs
        no unconditional pass), guidance_rescale (diffusers' rescale for zero-terminal-SNR models), sampler (any name
        from `mlx_sd.samplers.list_samplers()`, incl. "DPM++ 2M Karras"), schedule_type ("Karras", ...),
        follow ("a1111" or "diffusers": which reference the sampler reproduces), eta (stochastic samplers),
        s_churn, s_tmin, s_tmax, s_noise (Karras' churn for Euler, Heun and DPM2; the noise multiplier of the
        stochastic samplers; None: the sampler's default, 0, 0, inf, 1), s_min_uncond (A1111's "Negative Guidance
        minimum sigma": below this sigma every second model call skips the negative prompt's pass; 0: off).
    Randomness: seed (None: drawn at random and reported), rng ("torch-cpu": torch.randn's numbers, the same image
        as diffusers for the same seed; "mlx": MLX keys), batch_size (images per UNet batch), batch_count (batches
        run one after another); image i of the request uses seed + i; eta_noise_seed_delta (A1111's ENSD: after the
        initial noise, image i's sampler noise comes from seed + i + delta; 0: off).
    Variation (A1111): subseed_strength in [0, 1] blends each image's initial noise towards that of its variation
        seed, subseed + i (subseed None: drawn at random and reported); seed_resize_from_w / _h (pixels, 0: off)
        draw the seed's noise as for that size and paste its centre, to keep a composition at another size.
        mlx_sd/variation.py.
    img2img: init_image, strength (the last int(steps * strength) steps run), resize_mode for an init image of
        another size ("resize", "crop", "fill"), initial_noise_multiplier (A1111's: scales the noise the image
        starts with), image_guidance (InstructPix2Pix models only, A1111's "Image CFG scale": how closely the
        result follows the init image; mlx_sd/edit.py).
    Inpainting: mask (white = repaint), mask_blur (pixels), invert_mask, inpaint_full_res ("only masked": crop
        around the mask, generate at width x height, paste back), inpaint_padding (pixels around the mask),
        paste_back (composite the result over the original outside the mask), inpainting_fill (A1111's "Masked
        content": "original", "fill" (blurred surrounding colours), "latent noise", "latent nothing").
    SDXL micro-conditioning: original_size, crops_coords_top_left, target_size (height, width pairs; default: the
        generation size, (0, 0)), aesthetic_score / negative_aesthetic_score (refiner).
    Hires fix (A1111, txt2img): enable_hr generates at width x height, upscales by hr_scale (or to hr_resize_x x
        hr_resize_y, cropping to keep the aspect) with hr_upscaler (the "Latent" modes, or "None"/"Lanczos"/"Nearest"/
        a model upscaler's name such as "R-ESRGAN 4x+" on the decoded image; `mlx_sd.upscale`), then runs img2img
        at that size with denoising `strength`: hr_second_pass_steps (0: `steps`) of a schedule of int(those steps /
        strength) steps, with hr_sampler / hr_schedule_type and hr_prompt / hr_negative_prompt (empty or None: the
        first pass's); firstpass_image (A1111's): an image of width x height taken as the first pass's result,
        which is then not run. mlx_sd/hires.py.
    Refiner (a `Pipeline` holding a refiner model): refiner_switch_at, the fraction of the schedule after which the
        refiner takes over (A1111's "Switch at"; diffusers' denoising_end/denoising_start; None: 0.8, 1: never).
    Seamless: tiling (A1111's "Tiling"): every convolution of the UNet and the VAE pads circularly, so the image tiles
        seamlessly (its VAE then runs whole, never in tiles).
    ControlNet: controlnet, `ControlNetUnit`s (a ControlNet, its control image, weight, guidance_start / _end,
        control_mode, resize_mode); their residuals add up. mlx_sd/controlnet.py.
    IP-Adapter (a `Pipeline` holding one): ip_adapter_image, the image prompt; ip_adapter_scale, the weight of its
        attention (diffusers' set_ip_adapter_scale; 0 leaves it out). mlx_sd/ip_adapter.py.
    SD3 skip-layer guidance (diffusers' StableDiffusion3Pipeline; SD3.5 medium's card: layers 7, 8, 9):
        skip_guidance_layers (MMDiT block indices; empty: off), skip_layer_guidance_scale, _start, _stop (fractions
        of the steps: steps * start < step < steps * stop). mlx_sd/sd3.py.
    Memory: tiled_vae (None: tile above 1024x1024 pixels, in low-memory mode above 512x512), low_memory (free the
        text encoders after encoding and decode in tiles; None: on for devices with <= 16 GiB, e.g. a 16 GB Mac).
    """

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float = 0.0
    image_guidance: float = 1.5
    sampler: str | None = None
    schedule_type: str | None = None
    follow: str | None = None
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None
    s_min_uncond: float = 0.0
    seed: int | None = None
    subseed: int | None = None
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    rng: str = "torch-cpu"
    eta_noise_seed_delta: int = 0
    batch_size: int = 1
    batch_count: int = 1
    clip_skip: int = 1
    init_image: Image.Image | None = field(default=None, repr=False)
    strength: float = 0.75
    resize_mode: str = "resize"
    initial_noise_multiplier: float = 1.0
    mask: Image.Image | None = field(default=None, repr=False)
    mask_blur: float = 0.0
    invert_mask: bool = False
    inpaint_full_res: bool = False
    inpaint_padding: int = 32
    paste_back: bool = False
    inpainting_fill: str = "original"
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner_switch_at: float | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler: str | None = None
    hr_schedule_type: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    firstpass_image: Image.Image | None = field(default=None, repr=False)
    tiling: bool = False
    controlnet: tuple[ControlNetUnit, ...] = ()
    ip_adapter_image: Image.Image | None = field(default=None, repr=False)
    ip_adapter_scale: float = 1.0
    skip_guidance_layers: tuple[int, ...] = ()
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    tiled_vae: bool | None = None
    low_memory: bool | None = None

    @property
    def mode(self) -> str:
        """ "txt2img", "img2img" or "inpaint"."""
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.init_image is not None else "txt2img"

    @property
    def num_images(self) -> int:
        return self.batch_size * self.batch_count

    def sampler_options(self) -> dict[str, float]:
        """The sampler options this request sets (eta, s_churn, s_tmin, s_tmax, s_noise)."""
        names = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def resolved(self, defaults: FamilyDefaults, seed: int) -> GenerationRequest:
        """This request with every default filled in and `seed` fixed; validated."""
        fill = {name: getattr(defaults, name) for name in ("width", "height", "steps", "guidance", "sampler")}
        changes = {k: v for k, v in fill.items() if getattr(self, k) is None}
        if self.sampler is None and self.schedule_type is None:
            changes["schedule_type"] = defaults.schedule_type
        if self.init_image is not None and self.width is None and self.height is None:
            # img2img without a size keeps the init image's size, rounded down to a multiple of 8.
            w, h = self.init_image.size
            changes["width"], changes["height"] = w - w % SIZE_MULTIPLE, h - h % SIZE_MULTIPLE
        request = replace(self, seed=seed, **changes)
        request.validate()
        return request

    def validate(self) -> None:
        """Raise ValueError naming the field and what is accepted."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (value % SIZE_MULTIPLE or not MIN_SIZE <= value <= MAX_SIZE):
                raise ValueError(
                    f"{name}={value}: must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}"
                )
        checks = [
            (self.steps is None or self.steps >= 1, f"steps={self.steps}: must be at least 1"),
            (self.guidance is None or self.guidance >= 0, f"guidance={self.guidance}: must be >= 0"),
            (self.image_guidance >= 0, f"image_guidance={self.image_guidance}: must be >= 0"),
            (self.s_min_uncond >= 0, f"s_min_uncond={self.s_min_uncond}: must be >= 0 (0 = off)"),
            *((v is None or v >= 0, f"{k}={v}: must be >= 0") for k, v in self.sampler_options().items()),
            (0.0 <= self.strength <= 1.0, f"strength={self.strength}: must be between 0 and 1"),
            (
                self.initial_noise_multiplier >= 0,
                f"initial_noise_multiplier={self.initial_noise_multiplier}: must be >= 0",
            ),
            (self.batch_size >= 1 and self.batch_count >= 1, "batch_size and batch_count must be at least 1"),
            (self.ip_adapter_scale >= 0, f"ip_adapter_scale={self.ip_adapter_scale}: must be >= 0"),
            (self.clip_skip >= 1, f"clip_skip={self.clip_skip}: must be at least 1 (1 = last layer)"),
            (self.rng in NOISE_MODES, f"rng={self.rng!r}: must be one of {NOISE_MODES}"),
            (self.resize_mode in RESIZE_MODES, f"resize_mode={self.resize_mode!r}: must be one of {RESIZE_MODES}"),
            (self.mask is None or self.init_image is not None, "a mask needs an init_image to inpaint"),
            (
                self.firstpass_image is None or self.enable_hr,
                "firstpass_image stands for the hires fix's first pass: set enable_hr",
            ),
            (
                self.mask is None or self.resize_mode != "latent",
                "resize_mode='latent' is for img2img without a mask; inpaint with 'resize', 'crop' or 'fill'",
            ),
            (
                self.inpainting_fill in INPAINTING_FILLS,
                f"inpainting_fill={self.inpainting_fill!r}: must be one of {', '.join(INPAINTING_FILLS)}",
            ),
            (self.mask_blur >= 0 and self.inpaint_padding >= 0, "mask_blur and inpaint_padding must be >= 0"),
            (self.seed is None or -(2**63) <= self.seed < 2**64, f"seed={self.seed}: out of range"),
            (self.subseed is None or 0 <= self.subseed < 2**32, f"subseed={self.subseed}: must be in [0, 2**32)"),
            (
                0 <= self.eta_noise_seed_delta < 2**32,
                f"eta_noise_seed_delta={self.eta_noise_seed_delta}: must be in [0, 2**32)",
            ),
            (0.0 <= self.subseed_strength <= 1.0, f"subseed_strength={self.subseed_strength}: must be in [0, 1]"),
            (
                self.seed_resize_from_w >= 0 and self.seed_resize_from_h >= 0,
                "seed_resize_from_w and seed_resize_from_h must be >= 0 (0 = no seed resize)",
            ),
            (
                self.refiner_switch_at is None or 0.0 < self.refiner_switch_at <= 1.0,
                f"refiner_switch_at={self.refiner_switch_at}: must be in (0, 1] (1 = never switch)",
            ),
            *(hires_checks(self) if self.enable_hr else ()),
            (
                not (self.tiling and self.tiled_vae),
                "tiling (seamless) needs the whole image in the VAE: drop tiled_vae",
            ),
            (
                all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.skip_guidance_layers),
                f"skip_guidance_layers={self.skip_guidance_layers!r}: must be block indices >= 0",
            ),
            (
                0.0 <= self.skip_layer_guidance_start < self.skip_layer_guidance_stop <= 1.0,
                "skip_layer_guidance_start and _stop are fractions of the steps: 0 <= start < stop <= 1",
            ),
            (
                self.skip_layer_guidance_scale >= 0,
                f"skip_layer_guidance_scale={self.skip_layer_guidance_scale}: must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for unit in self.controlnet:
            if not isinstance(unit, ControlNetUnit):
                raise ValueError(f"controlnet: expected ControlNetUnit entries, got {type(unit).__name__}")
            unit.validate()

    def to_dict(self) -> dict:
        """JSON-friendly parameters (images left out; ControlNet units as their settings and model name)."""
        skip = {"init_image", "mask", "controlnet", "ip_adapter_image", "firstpass_image"}
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        return data | {"controlnet": [unit.to_dict() for unit in self.controlnet]}


def hires_checks(request: GenerationRequest) -> list[tuple[bool, str]]:
    """The hires fix's own rules, as (ok, message) pairs."""
    r = request
    return [
        (r.init_image is None, "enable_hr (hires fix) is for txt2img: drop init_image, or upscale it with img2img"),
        (0.0 < r.strength <= 1.0, f"strength={r.strength}: the hires pass needs a denoising strength in (0, 1]"),
        (r.hr_scale > 0, f"hr_scale={r.hr_scale}: must be > 0"),
        (isinstance(r.hr_upscaler, str) and r.hr_upscaler.strip() != "",
         f"hr_upscaler={r.hr_upscaler!r}: one of {', '.join(HIRES_UPSCALERS)} or a model upscaler's name"),
        (r.hr_second_pass_steps >= 0, f"hr_second_pass_steps={r.hr_second_pass_steps}: must be >= 0 (0 = steps)"),
        (r.hr_resize_x >= 0 and r.hr_resize_y >= 0, "hr_resize_x and hr_resize_y must be >= 0 (0 = use hr_scale)"),
        (r.firstpass_image is None or r.width is None or r.firstpass_image.size == (r.width, r.height),
         f"firstpass_image is {getattr(r.firstpass_image, 'size', None)}: it stands for the first pass, so it must be "
         f"width x height ({r.width}x{r.height})"),
    ]  # fmt: skip
