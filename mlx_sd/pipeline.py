"""Generation: prompt -> conditioning -> initial latents -> sampler loop -> VAE decode -> images with metadata.

Three layers, as mlx-lm's generate_step -> stream_generate -> generate:
    sampler generator (mlx_sd.samplers) -> `Pipeline.stream()` yielding typed `Progress` events and one `Result`
    -> `Pipeline.generate()` returning the `Result`.
The library prints nothing; apps render progress. Every step is evaluated before its event is yielded, so progress
and cancellation act on real work. Random draws happen in diffusers' order (VAE sampling noise, initial noise,
sampler noise), so with rng="torch-cpu" an image equals diffusers' image for `torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
from PIL import Image

from . import backend
from .conditioning import Conditioning
from .controlnet import INPAINT_MODULES, INPAINT_ONLY, ControlNet, Controls, control_image
from .denoiser import classifier_free_guidance
from .edit import check_edit, edit_guidance, guided_rows, image_latents, image_rows
from .hires import check_hires_model, firstpass_pixels, hires_plan, hires_request, hires_target, upscale_first_pass
from .images import latent_preview, to_pil
from .img2img import prepare_inputs, prepare_latents, restore_output
from .infotext import a1111_title, generation_infotext
from .lora import AppliedLoRA, LoRA, LoRAState, lora_networks, lora_targets, parse_lora_tags
from .model import StableDiffusion
from .models.layers import TextContext, set_circular
from .params import GenerationRequest
from .reference import REFERENCE_MODULES, Reference
from .refiner import DEFAULT_SWITCH_AT, Handoff, check_refiner
from .rng import make_noise
from .samplers import SamplingPlan, plan_sampling
from .schedules import FLOW_SCHEDULER, NoiseSchedule
from .sd3 import check_sd3_request, control_latents, model_defaults, sd3_model_fn
from .textual_inversion import Embedding, add_embeddings, check_embedding, used_embeddings
from .tiling import tiled_decode, tiled_encode
from .upscale import HIRES_UPSCALERS, is_latent_upscaler
from .variation import vary_noise

TILE_ABOVE_PIXELS = 1024 * 1024  # tiled VAE by default above this many pixels: bounded decoder memory
# In low-memory mode from one tile up: SDXL's 1024x1024 decode takes 5.5 GiB whole, 1.4 GiB tiled (float32).
LOW_MEMORY_TILE_ABOVE_PIXELS = 512 * 512
LCM_GUIDANCE_EMBED_SCALE = 1000.0  # diffusers' get_guidance_scale_embedding multiplies w by 1000


class Cancelled(Exception):
    """Raised by `Pipeline.stream` when its `Control` was cancelled; carries the images finished before."""

    def __init__(self, images: list[Image.Image]):
        super().__init__("generation cancelled")
        self.images = images


@dataclass
class Control:
    """Cooperative control of a running generation, safe to use from another thread.

    cancel(): stop at the next step; `stream` raises `Cancelled`.
    skip(): finish the current batch now (its partly denoised latents are decoded) and go on with the next.
    """

    _cancel: threading.Event = field(default_factory=threading.Event)
    _skip: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    def skip(self) -> None:
        self._skip.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()


@dataclass
class Progress:
    """One evaluated sampler step.

    step / total: steps done and to do in this batch; batch / batches: which batch of `batch_count`;
    elapsed: seconds since the request started; latents: (B, h, w, 4) VE latents after this step.
    """

    step: int
    total: int
    batch: int
    batches: int
    elapsed: float
    latents: mx.array
    preview_kind: str = "sd"

    @property
    def fraction(self) -> float:
        """Progress of the whole request in [0, 1]."""
        return (self.batch + self.step / self.total) / self.batches

    def preview(self) -> list[Image.Image]:
        """Cheap previews (one pixel per latent) by a linear latent-to-RGB map; no VAE."""
        return latent_preview(self.latents, self.preview_kind)


@dataclass
class Result:
    """The images of a request, their infotexts (A1111 format, also in each PNG) and the parameters used."""

    images: list[Image.Image]
    infotexts: list[str]
    request: GenerationRequest
    seeds: list[int]
    timings: dict[str, float]

    def save(self, path_pattern: str | Path) -> list[Path]:
        """Write PNGs with their infotext; `path_pattern` may contain {i} and {seed}."""
        from .infotext import save_png

        paths = []
        for i, (image, text, seed) in enumerate(zip(self.images, self.infotexts, self.seeds)):
            path = Path(str(path_pattern).format(i=i, seed=seed))
            save_png(image, path, text)
            paths.append(path)
        return paths


class Pipeline:
    """Generates images with one loaded model (and optionally a refiner). Thread-safe for use from one worker at a
    time.

    Args:
        model: a `StableDiffusion` or the path of a converted model folder.
        refiner: a model that takes over the last part of the schedule (SDXL's refiner; mlx_sd/refiner.py), used
            from `request.refiner_switch_at` on (default 0.8), or None. Embeddings apply to both (those that fit the
            refiner), LoRAs to `model` only.
        hires_model: the model the hires fix's second pass runs (A1111's "Hires checkpoint", `hr_checkpoint_name`):
            its prompt encoding, UNet and VAE (the first pass decodes with `model`'s), LoRAs and embeddings applied to
            it too; None: `model`. `set_hires_model` changes it.
        lora_resolver: resolves `<lora:name:weight>` in prompts: (name, `lora_targets(model)`) -> `LoRA`, e.g.
            `mlx_sd_convert.library.LoraLibrary(folder)`; None: such prompts are refused.
        ip_adapter: an `mlx_sd.ip_adapter.IPAdapter` for requests with an `ip_adapter_image` (base model only), or
            None; `set_ip_adapter` changes it.
        controlnet_resolver: resolves a ControlNet unit's model given by name: name -> `ControlNet`, e.g.
            `mlx_sd_convert.library.ControlNetLibrary(folder)`; None: units must hold loaded ControlNets.
            ControlNets guide the base model only, never a refiner.
        upscaler_resolver: loads the model upscaler a hires fix's `hr_upscaler` names (other than the latent and
            model-free ones): name -> `mlx_sd.model_upscaler.ModelUpscaler`, e.g.
            `mlx_sd_convert.library.UpscalerLibrary(folder)`; None: such names are refused.
    """

    def __init__(
        self,
        model: StableDiffusion | str | Path,
        refiner: StableDiffusion | str | Path | None = None,
        lora_resolver=None,
        controlnet_resolver=None,
        ip_adapter=None,
        upscaler_resolver=None,
        hires_model: StableDiffusion | str | Path | None = None,
    ):
        self.model = model if isinstance(model, StableDiffusion) else StableDiffusion(model)
        self.schedule = _schedule(self.model)
        self.refiner = None
        self.set_refiner(refiner)
        self.lora_resolver = lora_resolver
        self.controlnet_resolver = controlnet_resolver
        self.upscaler_resolver = upscaler_resolver
        self.ip_adapter = None
        self.set_ip_adapter(ip_adapter)
        self.loras: list[AppliedLoRA] = []  # applied to every request, beside the prompt's <lora:...> tags
        self.embeddings: list[Embedding] = []
        self._lora_state = LoRAState()
        self.hires_model = None
        self._hires_lora_state = LoRAState()
        self.set_hires_model(hires_model)
        # the names of the embeddings each live PromptEncoder holds (a reloaded encoder or a refiner's needs them)
        self._embedded: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set_refiner(self, refiner: StableDiffusion | str | Path | None) -> None:
        """Use `refiner` (a model or a converted folder) for the following requests, or none. Raises ValueError,
        keeping the current one, when it cannot take over this model's latents (mlx_sd.refiner.check_refiner)."""
        if refiner is not None:
            refiner = refiner if isinstance(refiner, StableDiffusion) else StableDiffusion(refiner)
            check_refiner(self.model, refiner, self.schedule, _schedule(refiner))
        self.refiner = refiner

    def set_hires_model(self, model: StableDiffusion | str | Path | None) -> None:
        """Run the hires fix's second pass with `model` (a model or a converted folder; None: the base model).
        Raises ValueError, keeping the current one, for a model that cannot (an inpainting UNet)."""
        if model is not None:
            model = model if isinstance(model, StableDiffusion) else StableDiffusion(model)
            check_hires_model(model)
        self.hires_model = model
        self._hires_lora_state = LoRAState()

    def set_ip_adapter(self, adapter) -> None:
        """Use `adapter` (an `IPAdapter`) for requests with an `ip_adapter_image`, or none. Raises ValueError, keeping
        the current one, when it was made for another model family."""
        if adapter is not None:
            adapter.check(self.model.unet)
        self.ip_adapter = adapter

    # --- LoRAs and embeddings -----------------------------------------------------------------------------------

    def set_loras(self, loras) -> None:
        """LoRAs for every following request: [(lora, weight) or AppliedLoRA, ...]; [] removes them.

        They are fused into the weights at the next request (quantized layers run them unfused), replacing the
        previous set; the original weights are kept, so removing a LoRA restores the model exactly.
        """
        self.loras = [a if isinstance(a, AppliedLoRA) else AppliedLoRA(*a) for a in loras]
        for applied in self.loras:
            if not isinstance(applied.lora, LoRA):
                raise TypeError(f"set_loras takes LoRA objects (mlx_sd_convert.lora.read_lora), got {applied.lora!r}")

    def load_embeddings(self, embeddings: list[Embedding]) -> None:
        """Add textual-inversion embeddings; their names then work in prompts. Raises ValueError if one does not fit
        the model (nothing is added then)."""
        text = self._with_embeddings(self.model)
        add_embeddings(text, self.model.info.family, embeddings)
        self.embeddings += embeddings
        self._embedded[text] |= {e.name for e in embeddings}  # a refiner's encoder takes them at its next request

    def lora_targets(self):
        """The layers of this model a LoRA may adapt (what `read_lora` maps a file onto)."""
        return lora_targets(self.model)

    def _activate(self, request: GenerationRequest) -> tuple[list[AppliedLoRA], list[Embedding]]:
        """Make this request's LoRAs (set_loras + the prompts' tags) the active ones, embeddings in place.

        Returns:
            The LoRAs applied and the embeddings the prompts use (for the infotext).
        """
        applied = list(self.loras)
        tags = parse_lora_tags(request.prompt)[1] + parse_lora_tags(request.negative_prompt)[1]
        if tags and self.lora_resolver is None:
            raise ValueError(f"<lora:{tags[0].name}:...> in the prompt: no LoRA folder is configured (--lora-dir)")
        targets = lora_targets(self.model) if tags else None
        applied += [AppliedLoRA(self.lora_resolver(t.name, targets), t.weight, t.text_weight, t.name) for t in tags]
        text = self._with_embeddings(self.model)
        if self._refining(request):
            self._with_embeddings(self.refiner)
        self._lora_state.apply(lora_networks(self.model), applied)
        if request.enable_hr and self.hires_model is not None:
            self._with_embeddings(self.hires_model)
            self._hires_lora_state.apply(lora_networks(self.hires_model), applied)
        prompts = [parse_lora_tags(p)[0] for p in (request.prompt, request.negative_prompt)]
        return applied, used_embeddings(text, self.embeddings, prompts) if self.embeddings else []

    def _with_embeddings(self, model: StableDiffusion):
        """`model`'s text encoder holding the loaded embeddings: added again to a reloaded encoder; a refiner takes
        those that fit it (an SDXL embedding's clip_g vectors; A1111 loads them into its refiner too)."""
        text = model.text_encoder()
        held = self._embedded.setdefault(text, set())
        family = model.info.family
        missing = [e for e in self.embeddings if e.name not in held and check_embedding(e, family, text) is None]
        if missing:
            add_embeddings(text, family, missing)
            held |= {e.name for e in missing}
        return text

    @property
    def defaults(self):
        return model_defaults(self.model.info, self.model.unet.config, self.model.scheduler_config)

    # --- the streaming API ------------------------------------------------------------------------------------

    def stream(self, request: GenerationRequest, control: Control | None = None) -> Iterator[Progress | Result]:
        """Run a request: yields a `Progress` per evaluated step, then one `Result`.

        Raises:
            ValueError: invalid parameters (named), before any work.
            Cancelled: `control.cancel()` was called.
        """
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        request = request.resolved(self.defaults, seed)
        if request.subseed_strength and request.subseed is None:
            request = replace(request, subseed=secrets.randbits(32))
        request = replace(request, refiner_switch_at=self._switch_at(request))
        if self.model.is_edit:
            check_edit(request, self.model)
        if self.model.is_sd3:
            check_sd3_request(request, self)
        elif request.skip_guidance_layers:
            raise ValueError(f"skip_guidance_layers is SD3's skip-layer guidance; this is an {self.model.info.family} "
                             "model")  # fmt: skip
        refining = self._refining(request)
        control = control or Control()
        start = time.perf_counter()
        timings: dict[str, float] = {}
        plan = self._plan(request)  # validates sampler, schedule and steps before any model runs
        request = replace(request, controlnet=self._controlnets(request))
        target = hires_target(request) if request.enable_hr else None
        second = hires_request(request, target) if target else None
        hires = self.hires_model or self.model  # the second pass's model
        if second and hires is not self.model:
            check_hires_model(hires, self.model, second)
            for unit in second.controlnet:
                if unit.acts_in(hires_pass=True) and unit.model is not None:
                    unit.model.check(hires.unet.config)
        plan_2 = hires_plan(second, self.schedule if hires is self.model else _schedule(hires)) if second else None
        upscaler = self._hires_upscaler(request) if second else None  # a model named but missing fails here
        first_steps = 0 if request.firstpass_image is not None else plan.steps  # a given first pass runs no steps
        latent_upscale = second is not None and is_latent_upscaler(request.hr_upscaler)
        total = first_steps + (plan_2.steps if plan_2 else 0)
        loras, embeddings = self._activate(request)
        used = (self.model, self.refiner) if refining else (self.model, hires) if second else (self.model,)
        for model in used:
            set_circular(model.unet, request.tiling)  # every request sets the padding mode it runs with
            set_circular(model.vae, request.tiling)

        cond, uncond = self._encode_prompts(request)
        if refining:
            refiner_cond, refiner_uncond = self._encode_prompts(request, self.refiner)
        if second:
            same = (second.prompt, second.negative_prompt) == (request.prompt, request.negative_prompt)
            same = same and hires is self.model
            cond_2, uncond_2 = (cond, uncond) if same else self._encode_prompts(second, hires)
        image_embeds = self._image_prompt(request)
        timings["text"] = time.perf_counter() - start
        images, seeds = [], []

        def denoise(plan: SamplingPlan, model_fn, x, noise, init, batch: int, done: int, controls=None):
            """Run `plan` on `batch`, yielding progress (steps `done` + i of `total`); returns the last x."""
            sampler = plan.sample(model_fn, x, noise)
            for i in range(plan.steps):
                if control.cancelled:
                    raise Cancelled(images)
                if control._skip.is_set():
                    break
                if controls is not None:
                    controls.step = i  # the ControlNets' guidance window counts sampler steps
                x = next(sampler) if i == 0 else sampler.send(self._blend(init, plan, x, i, model_fn) if init else None)
                yield Progress(done + i + 1, total, batch, request.batch_count, time.perf_counter() - start, x,
                               self.model.latent_format)  # fmt: skip
            sampler.close()
            return x

        # the ControlNet units of each pass, prepared once (preprocessed images, T2I-Adapter features) for every batch
        controls = controls_2 = None
        for batch in range(request.batch_count):
            first = seed + batch * request.batch_size
            batch_seeds = [first + i for i in range(request.batch_size)]
            noise = make_noise(request.rng, first, request.batch_size, per_image=True)
            vary = self._variation(request, batch)
            decode_first = lambda z: self._decode(z, request, self.model)  # noqa: E731
            control._skip.clear()
            source = noise  # what the image upscalers' encoding samples from (None: the distribution's mean)
            if request.firstpass_image is None:
                x, init = self._initial_latents(request, plan, noise, vary)
                noise = _sampler_noise(request, plan, noise, first)
                controls = controls or self._controls(request, plan, init, self.model, seed=seed)
                model_fn = self._model_fn(request, cond, uncond, init, request.batch_size, controls=controls,
                                          image_embeds=image_embeds)  # fmt: skip
                if refining:
                    refiner_fn = self._model_fn(
                        request, refiner_cond, refiner_uncond, None, request.batch_size, self.refiner
                    )
                    model_fn = Handoff(model_fn, refiner_fn, self.schedule, request.refiner_switch_at)
                x = yield from denoise(plan, model_fn, x, noise, init, batch, 0, controls)
                source = noise
                latents = plan.latents_to_decode(x)
                if init is not None and init.mask is not None and self._pastes(model_fn):
                    latents = init.mask * latents + (1 - init.mask) * init.image_latents  # the known region, exact
            else:  # A1111's firstpass_image stands for the first pass: its pixels, or its latents for a latent upscale
                init, given, source = None, firstpass_pixels(request.firstpass_image, request.batch_size), None
                latents = self._encode_images(given, None, request.tiling) if latent_upscale else None
                decode_first = lambda z, given=given: given  # noqa: E731
            finished = request
            if second and not control._skip.is_set():
                # image upscalers encode again, sampling from the first pass's source (A1111's VAE does not draw
                # from the seeds' generators, which start the second pass)
                latents = upscale_first_pass(
                    latents, request, target, decode_first,
                    lambda images, source=source: self._encode_images(images, source, request.tiling, hires), upscaler,
                )  # fmt: skip
                # A1111 draws the second pass's noise from fresh generators seeded with the images' seeds
                noise = make_noise(request.rng, first, request.batch_size, per_image=True)
                B, h, w, c = latents.shape
                draw = noise.normal((B, c, h, w))
                x = plan_2.noised_latents(latents, (vary(draw) if vary else draw).transpose(0, 2, 3, 1), 0)
                noise = _sampler_noise(second, plan_2, noise, first)
                controls_2 = controls_2 or self._controls(second, plan_2, None, hires, hires_pass=True, seed=seed)
                model_fn = self._model_fn(second, cond_2, uncond_2, None, request.batch_size, hires,
                                          controls=controls_2, image_embeds=image_embeds)  # fmt: skip
                x = yield from denoise(
                    plan_2, model_fn, x.astype(hires.dtype), noise, None, batch, first_steps, controls_2
                )
                latents, finished = plan_2.latents_to_decode(x), second
            t_decode = time.perf_counter()
            # The model that finished the image decodes it (diffusers' refiner pipeline, A1111).
            last = self.refiner if refining else hires if finished is second else self.model
            decoded = to_pil(self._decode(latents, finished, last))
            timings["decode"] = timings.get("decode", 0.0) + time.perf_counter() - t_decode
            if init is not None:
                decoded = [restore_output(init, image) for image in decoded]
            images += decoded
            seeds += batch_seeds
        timings["total"] = time.perf_counter() - start
        texts = [self.infotext(request, s, plan, loras, embeddings) for s in seeds]
        yield Result(images, texts, request, seeds, timings)

    def generate(self, request: GenerationRequest | None = None, **params) -> Result:
        """Run a request to completion: `generate(prompt="a cat", steps=20)` or `generate(GenerationRequest(...))`."""
        request = request or GenerationRequest(**params)
        result = None
        for event in self.stream(request):
            if isinstance(event, Result):
                result = event
        return result

    # --- pieces -----------------------------------------------------------------------------------------------

    def _plan(self, request: GenerationRequest) -> SamplingPlan:
        options = request.sampler_options()
        strength = request.strength if request.init_image is not None else 1.0
        return plan_sampling(
            request.sampler, self.schedule, request.steps, schedule_type=request.schedule_type,
            strength=strength, follow=request.follow, **options,
        )  # fmt: skip

    def _switch_at(self, request: GenerationRequest) -> float | None:
        """The refiner's switch point (None without a refiner), validated before any work."""
        if self.refiner is None:
            if request.refiner_switch_at is not None:
                raise ValueError("refiner_switch_at needs a refiner: Pipeline(model, refiner=refiner_model)")
            return None
        if request.enable_hr:
            raise ValueError("the hires fix with a refiner is not supported (A1111 refuses it too); drop enable_hr, "
                             "or run the refiner on the upscaled result with img2img")  # fmt: skip
        return DEFAULT_SWITCH_AT if request.refiner_switch_at is None else request.refiner_switch_at

    def _encode_prompts(
        self, request: GenerationRequest, model: StableDiffusion | None = None
    ) -> tuple[Conditioning, Conditioning | None]:
        model = model or self.model
        text = model.text_encoder()
        prompts = [parse_lora_tags(request.prompt)[0]] * request.batch_size
        guided = self._guided(request)
        negatives = [parse_lora_tags(request.negative_prompt)[0]] * request.batch_size if guided else None
        cond, uncond = text.encode(prompts, negatives, request.clip_skip)
        if guided and model.info.force_zeros_for_empty_prompt and not request.negative_prompt:
            # SDXL base (diffusers): an empty negative prompt means zero conditioning, not the encoded "".
            uncond = Conditioning(
                mx.zeros_like(uncond.context), None if uncond.pooled is None else mx.zeros_like(uncond.pooled)
            )
        mx.eval(cond.context, *(() if uncond is None else (uncond.context,)))
        if _low_memory(request):
            model.release_text_encoders()
        return cond, uncond

    def _guided(self, request: GenerationRequest) -> bool:
        """Classifier-free guidance runs only above 1, and never for LCM-distilled UNets (guidance is embedded); for
        InstructPix2Pix models only with an image guidance of at least 1 too (diffusers' rule)."""
        edit_ok = not self.model.is_edit or request.image_guidance >= 1.0
        embedded = getattr(self.model.unet.config, "time_cond_proj_dim", None) is not None  # LCM
        return request.guidance > 1.0 and not embedded and edit_ok

    def _initial_latents(self, request, plan: SamplingPlan, noise, vary=None):
        """The starting VE latents (and the init state for img2img/inpainting), noise drawn in diffusers' order."""
        unet, vae = self.model.unet, self.model.vae
        if request.init_image is not None:
            x, init = prepare_latents(
                request, plan, noise, lambda images, source: self._encode_images(images, source, request.tiling),
                4 if self._refining(request) else unet.config.in_channels, vae.config.latent_channels,
                self.model.dtype, vary,
            )  # fmt: skip
            if self.model.is_edit:  # the image beside the latents: the VAE's mode (mlx_sd/edit.py)
                image = prepare_inputs(request)[1]
                mode = image_latents(vae.encode(image.astype(vae.dtype)).mean, vae.config, self.schedule)
                mode = mode.astype(self.model.dtype)
                init.edit_latents = mx.broadcast_to(mode, (request.batch_size, *mode.shape[1:]))
            return x, init
        shape = (request.batch_size, vae.config.latent_channels, request.height // 8, request.width // 8)
        draw = noise.normal(shape)
        draw = (vary(draw) if vary else draw).transpose(0, 2, 3, 1)  # torch's NCHW draw order
        return plan.initial_latents(draw).astype(self.model.dtype), None

    @staticmethod
    def _variation(request: GenerationRequest, batch: int):
        """Variation seeds / seed resize for the initial noise of `batch` (a draw -> draw function), or None."""
        resize = (request.seed_resize_from_h, request.seed_resize_from_w)
        if not request.subseed_strength and not min(resize) > 0:
            return None
        first = batch * request.batch_size
        seeds = [request.seed + first + i for i in range(request.batch_size)]
        subseeds = (
            [request.subseed + first + i for i in range(request.batch_size)] if request.subseed_strength else None
        )
        return lambda draw: vary_noise(draw, request.rng, seeds, subseeds, request.subseed_strength, resize)

    def _refining(self, request: GenerationRequest) -> bool:
        """A refiner takes over part of this (resolved) request's schedule."""
        return self.refiner is not None and request.refiner_switch_at is not None and request.refiner_switch_at < 1

    def _pastes(self, model_fn) -> bool:
        """Whether inpainting pastes the known region back: a 4-channel UNet ran the last step (the base, or a
        refiner that took over from a 9-channel inpainting base)."""
        same = self.model.unet.config.in_channels == self.model.vae.config.latent_channels  # no inpainting channels
        return same or getattr(model_fn, "switched", False)

    def _blend(self, init, plan: SamplingPlan, x: mx.array, step: int, model_fn) -> mx.array | None:
        """Inpainting with a 4-channel UNet: after each step, the known region is the init latents noised to the
        current level (diffusers' latent blending)."""
        if init.mask is None or not self._pastes(model_fn):
            return None
        known = plan.noised_latents(init.image_latents, init.noise, step)
        return init.mask * x + (1 - init.mask) * known

    def _model_fn(
        self, request, cond: Conditioning, uncond: Conditioning | None, init, B: int, model=None, controls=None,
        image_embeds=None,
    ):  # fmt: skip
        model = model or self.model
        unet = model.unet
        dtype = model.dtype
        if model.is_sd3:
            return sd3_model_fn(unet, cond, uncond, request, dtype, self._plan(request).sigmas, controls)
        schedule = self.schedule if model is self.model else _schedule(model)  # NGMS's noise levels
        guided = uncond is not None
        edit = init is not None and init.edit_latents is not None  # InstructPix2Pix: three-way guidance
        if edit and guided:
            context = guided_rows(cond.context, uncond.context)
        else:
            context = mx.concatenate([uncond.context, cond.context]) if guided else cond.context
        pooled, time_ids = None, None
        if unet.config.addition_time_embed_dim is not None:
            pooled = mx.concatenate([uncond.pooled, cond.pooled]) if guided else cond.pooled
            time_ids = self._time_ids(request, guided, B, model.info.requires_aesthetics_score)
            if edit and guided:  # [negative; prompt] -> [prompt; negative; negative]
                pooled = guided_rows(cond.pooled, uncond.pooled)
                time_ids = guided_rows(time_ids[B:], time_ids[:B])
        extra = None
        if init is not None and unet.config.in_channels == 9:
            extra = mx.concatenate([init.mask, init.masked_latents], axis=-1)  # (B, h, w, 5)
            extra = mx.concatenate([extra, extra]) if guided else extra
        if edit:
            extra = image_rows(init.edit_latents) if guided else init.edit_latents
        timestep_cond = None
        if unet.config.time_cond_proj_dim is not None:
            timestep_cond = guidance_embedding(request.guidance - 1.0, unet.config.time_cond_proj_dim, B)
        # the text's keys and values in each cross-attention layer: computed at the first step, reused by the others
        image = None
        if image_embeds is not None:  # the IP-Adapter's image tokens for this batch
            image = self.ip_adapter.context(image_embeds, unet, B, guided, request.ip_adapter_scale, dtype)
        context = TextContext(context.astype(dtype), image)
        pooled = None if pooled is None else pooled.astype(dtype)
        cond_only = None
        if guided and request.s_min_uncond > 0:  # A1111's NGMS: some calls run the conditional half alone
            cond_only = self._model_fn(request, cond, None, init, B, model, controls, image_embeds)
        inputs = (context, pooled, time_ids, timestep_cond)
        cond_inputs = None
        if controls is not None and guided and any(u.cond_only() for u in controls.units):
            # units for the conditional half alone (A1111's "ControlNet is more important", diffusers' guess mode)
            cond_pooled = None if pooled is None else pooled[B:]
            cond_inputs = (TextContext(cond.context.astype(dtype)), cond_pooled, _half(time_ids), timestep_cond)

        reference = controls.reference if controls is not None else None

        def model(x_in: mx.array, t: float) -> mx.array:
            x_in = x_in.astype(dtype)
            residuals, features = controls(x_in, mx.array(t), inputs, cond_inputs) if controls else (None, None)
            if reference is not None:  # the reference units' passes first (mlx_sd/reference.py)
                context.reference = reference
                run = lambda z: unet(z, mx.array(t), context, pooled, time_ids, timestep_cond)  # noqa: E731
                reference.write(run, x_in, t, controls.active, extra, x_in.shape[0] // 2 if guided else 0)
            if extra is not None:  # ControlNets see the 4 latent channels, the inpainting UNet all 9
                x_in = mx.concatenate([x_in, extra.astype(x_in.dtype)], axis=-1)
            try:
                out = unet(x_in, mx.array(t), context, pooled, time_ids, timestep_cond, residuals, features)
            finally:
                context.reference = None
            return controls.restore(x_in[..., :4], t, out) if controls else out

        if not guided:
            return model
        if edit:
            return edit_guidance(model, request.guidance, request.image_guidance)
        below = (lambda t: schedule.t_to_sigma(t) < request.s_min_uncond) if cond_only else None
        return classifier_free_guidance(model, request.guidance, request.guidance_rescale, cond_only, below)

    def _image_prompt(self, request: GenerationRequest) -> tuple[mx.array, mx.array] | None:
        """The IP-Adapter's embedding of the request's image prompt (once per request), or None."""
        if request.ip_adapter_image is None:
            return None
        if self.ip_adapter is None:
            raise ValueError("ip_adapter_image needs an IP-Adapter: Pipeline(model, ip_adapter=...) or --ip-adapter")
        if request.ip_adapter_scale == 0:
            return None
        embeds = self.ip_adapter.embed(request.ip_adapter_image)
        mx.eval(*embeds)
        return embeds

    def _controlnets(self, request: GenerationRequest) -> tuple:
        """The request's ControlNet units with their models resolved and checked against this model."""
        units = []
        for unit in request.controlnet:
            model = unit.model
            if model is None:  # a reference unit (validated: no network)
                units.append(unit)
                continue
            if isinstance(model, str):
                if self.controlnet_resolver is None:
                    raise ValueError(f"ControlNet {model!r} given by name: no ControlNet folder is configured "
                                     "(--controlnet-dir), or pass a loaded ControlNet")  # fmt: skip
                model = self.controlnet_resolver(model)
            if not isinstance(model, ControlNet):
                raise ValueError(f"ControlNet unit model: expected a ControlNet or a name, got {type(model).__name__}")
            model.check(self.model.unet.config)
            units.append(replace(unit, model=model))
        return tuple(units)

    def _hires_upscaler(self, request: GenerationRequest):
        """The loaded model upscaler the hires fix names, or None for the latent and model-free ones."""
        name = request.hr_upscaler
        if name in HIRES_UPSCALERS:
            return None
        if self.upscaler_resolver is None:
            raise ValueError(f"hr_upscaler={name!r} is not one of {', '.join(HIRES_UPSCALERS)}; a model upscaler "
                             "needs an upscaler folder (--upscaler-dir)")  # fmt: skip
        return self.upscaler_resolver(name)

    def _controls(self, request: GenerationRequest, plan: SamplingPlan, init, model, hires_pass=False, seed=0):
        """The request's ControlNet units that act in this pass (their `hr_option`), at its size and step count, or
        None; Control-LoRAs bound to the pass's `model` (its UNet with the request's LoRAs)."""
        units = [replace(u, model=u.model and u.model.bound(model.unet)) for u in request.controlnet
                 if u.acts_in(hires_pass)]  # fmt: skip
        if not units:
            return None
        crop = (init.original.size, init.region) if init is not None and init.region is not None else None
        # SD3 ControlNets have no A1111 counterpart: diffusers' window whatever the sampler
        rule = "diffusers" if plan.follows.startswith("diffusers") or model.is_sd3 else "a1111"
        inpaint = known = None
        if request.mask is not None and any(u.module in INPAINT_MODULES for u in units):
            inpaint = prepare_inputs(request)[1:]  # the init image and binary mask as the sampler sees them
        if inpaint is not None and any(u.module == INPAINT_ONLY for u in units):
            schedule = self.schedule if model is self.model else _schedule(model)
            if schedule.prediction_type != "epsilon":
                raise ValueError("ControlNet module 'inpaint_only' restores the model's noise prediction, as A1111's "
                                 "extension does: it needs an epsilon-prediction model; use 'inpaint'")  # fmt: skip
            # the whole init image's latents (the VAE's mean; the extension samples with an unseeded generator)
            known = (self._encode_images(inpaint[0], None, request.tiling, model), schedule.alphas_cumprod)
        reference = None
        if any(u.module in REFERENCE_MODULES for u in units):
            if model.is_edit:
                raise ValueError("reference units do not run with an InstructPix2Pix model (three-way guidance)")
            fitted = [(u, control_image(u, request.width, request.height, crop)) for u in units
                      if u.module in REFERENCE_MODULES]  # fmt: skip
            latents = [(u, self._encode_images(image * 2 - 1, None, request.tiling, model)) for u, image in fitted]
            schedule = self.schedule if model is self.model else _schedule(model)
            reference = Reference(model.unet, latents, model.is_sdxl, hires_pass, schedule.alphas_cumprod, seed)
        encode = None
        if model.is_sd3:  # SD3 ControlNets take the control image's VAE latents

            def encode(unit, image):
                latents = self._encode_images(image * 2 - 1, None, request.tiling, model)  # the VAE's mean
                return control_latents(unit.model.model.config, latents, model.vae.config)

        return Controls(units, request.width, request.height, plan.steps, rule, crop, inpaint, known, reference,
                        encode)  # fmt: skip

    def _time_ids(self, request: GenerationRequest, guided: bool, B: int, aesthetic: bool) -> mx.array:
        """SDXL micro-conditioning: (original size, crop top-left, target size), or the refiner's aesthetic score."""
        size = (request.height, request.width)
        original = tuple(request.original_size or size)
        target = tuple(request.target_size or size)
        crop = tuple(request.crops_coords_top_left)
        if aesthetic:
            positive = original + crop + (request.aesthetic_score,)
            negative = original + crop + (request.negative_aesthetic_score,)
        else:
            positive = negative = original + crop + target
        rows = [negative] * B + [positive] * B if guided else [positive] * B
        return mx.array(rows, dtype=mx.float32)

    def _encode_images(self, images: mx.array, noise, whole: bool = False, model=None) -> mx.array:
        """VAE-encode (B, H, W, 3) images to scaled latents with `model`'s VAE (default: the base model's), sampling
        with the request's noise (diffusers order; None: the distribution's mean); in tiles above TILE_ABOVE_PIXELS
        unless `whole` (seamless tiling: tiles would not wrap)."""
        vae = (model or self.model).vae
        tiled = not whole and max(images.shape[1:3]) * min(images.shape[1:3]) > TILE_ABOVE_PIXELS
        images = images.astype(vae.dtype)
        dist = tiled_encode(vae, images) if tiled else vae.encode(images)
        if noise is None:
            return vae.config.scale(dist.mean)
        B, h, w, c = dist.mean.shape
        sample = dist.sample(noise=noise.normal((B, c, h, w), dtype=dist.mean.dtype).transpose(0, 2, 3, 1))
        return vae.config.scale(sample)

    def _decode(self, latents: mx.array, request: GenerationRequest, model: StableDiffusion) -> mx.array:
        vae = model.vae
        z = vae.config.unscale(latents.astype(mx.float32))
        tile = request.tiled_vae and not request.tiling
        if tile is None and not request.tiling:
            limit = LOW_MEMORY_TILE_ABOVE_PIXELS if _low_memory(request) else TILE_ABOVE_PIXELS
            tile = request.width * request.height > limit
        images = tiled_decode(vae, z.astype(vae.dtype)) if tile else vae.decode(z.astype(vae.dtype))
        mx.eval(images)
        if vae.dtype != mx.float32 and not mx.all(mx.isfinite(images)).item():
            # float16 VAEs (SDXL's above all) overflow; decode again in float32 and keep it there.
            vae = model.vae = model.load_vae(mx.float32)
            set_circular(vae, request.tiling)
            images = tiled_decode(vae, z) if tile else vae.decode(z)
        return images

    def infotext(self, request: GenerationRequest, seed: int, plan: SamplingPlan, loras=(), embeddings=()) -> str:
        """A1111's infotext of image `seed` of `request` (mlx_sd.infotext.generation_infotext)."""
        refiner = self.refiner.info.name if self._refining(request) else None
        adapter = self.ip_adapter.title if request.ip_adapter_image is not None else None
        hires = self.hires_model.info if request.enable_hr and self.hires_model is not None else None
        hires = a1111_title(hires.name, hires.short_hash) if hires else None
        return generation_infotext(
            request, seed, plan, self.model.info, refiner, adapter, loras, embeddings, hires, self.model.is_edit
        )


def _sampler_noise(request: GenerationRequest, plan: SamplingPlan, noise, first: int):
    """The source the sampler draws from after the initial noise: A1111's eta noise seed delta (ENSD) reseeds image
    i's generator with seed + i + delta (its `ImageRNG.first`). Brownian-tree samplers keep the images' seeds, as
    A1111's trees do."""
    if not request.eta_noise_seed_delta or plan.noise_interval is not None:
        return noise
    return make_noise(request.rng, first + request.eta_noise_seed_delta, request.batch_size, per_image=True)


def _half(rows: mx.array | None) -> mx.array | None:
    """The conditional (second) half of a guided batch's rows."""
    return None if rows is None else rows[rows.shape[0] // 2 :]


def _low_memory(request: GenerationRequest) -> bool:
    return backend.small_memory() if request.low_memory is None else request.low_memory


def _schedule(model: StableDiffusion) -> NoiseSchedule:
    if model.info.prediction_type == "flow":  # rectified flow (SD3): the manifest says so, whatever the config
        return NoiseSchedule.from_config({**model.scheduler_config, "_class_name": FLOW_SCHEDULER})
    # diffusers' SD pipelines force these two on load (outdated hub configs); so do we.
    return NoiseSchedule.from_config({**model.scheduler_config, "clip_sample": False, "steps_offset": 1})


def guidance_embedding(w: float, dim: int, batch: int) -> mx.array:
    """LCM's guidance-scale embedding (diffusers `get_guidance_scale_embedding`): sinusoidal in w * 1000."""
    half = dim // 2
    freqs = mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000.0) / (half - 1)))
    angles = w * LCM_GUIDANCE_EMBED_SCALE * freqs
    emb = mx.concatenate([mx.sin(angles), mx.cos(angles)])
    if dim % 2:
        emb = mx.concatenate([emb, mx.zeros((1,))])
    return mx.broadcast_to(emb[None], (batch, dim))
