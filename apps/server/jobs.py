"""The native API for embedding apps: queue a job, follow it (poll or server-sent events), fetch or cancel it.

    POST /v1/jobs                   -> 202 {id, status, queue_position, ...}
    GET  /v1/jobs/{id}              queued | running | done | failed | cancelled, progress, result
    GET  /v1/jobs/{id}/events       text/event-stream: "status", "progress" (with a preview), then one of
                                    "done" / "failed" / "cancelled" carrying the final job
    POST /v1/jobs/{id}/cancel       a queued job leaves the queue; a running one stops at its next step
    GET  /v1/jobs/{id}/images/{i}   the PNG (infotext in its `parameters` chunk), or ?format=jpeg|webp
    GET  /v1/capabilities           models, samplers, schedule types, limits

Field names are the library's (`GenerationRequest`); unknown fields are refused, so a typo is an error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, ConfigDict, Field

from mlx_sd import __version__
from mlx_sd.controlnet import MODULES
from mlx_sd.params import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, GenerationRequest
from mlx_sd.rng import NOISE_MODES
from mlx_sd.samplers import FOLLOW, list_samplers
from mlx_sd.schedules import SCHEDULE_TYPES
from mlx_sd.sd_upscale import DEFAULT_OVERLAP, SDUpscale
from mlx_sd.upscale import IMAGE_UPSCALERS, LATENT_UPSCALERS

from . import codec
from .controlnet_api import UnitRequest, native_units
from .engine import Job
from .errors import ApiError, invalid
from .state import ServerState, State
from .validation import MAX_SEED, check_request, check_sd_upscale


class SDUpscaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upscaler: str = Field("Lanczos", description='"Lanczos", "Nearest", "None" or a model of --upscaler-dir')
    scale: float = Field(2.0, gt=0, le=8, description="scale factor")
    overlap: int = Field(DEFAULT_OVERLAP, ge=0, description="tile overlap, pixels")


class JobRequest(BaseModel):
    """A generation, in the library's terms (see `mlx_sd.params.GenerationRequest`); null means the model's
    default. Images are base64 (a data: URL prefix is accepted)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    prompt: str
    negative_prompt: str = ""
    model: str | None = Field(None, description="a model id from /v1/capabilities; null: the current model")
    refiner: str | None = Field(None, description="a refiner's model id (SDXL), taking over from refiner_switch_at")
    refiner_switch_at: float | None = Field(None, gt=0, le=1, description="with a refiner; null: 0.8")
    hr_checkpoint: str | None = Field(None, description="a model id for the hires fix's second pass; null: `model`")
    width: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE)
    height: int | None = Field(None, ge=MIN_SIZE, le=MAX_SIZE, multiple_of=SIZE_MULTIPLE)
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=100)
    guidance_rescale: float = Field(0.0, ge=0, le=1)
    image_guidance: float = Field(1.5, ge=0, le=100, description="InstructPix2Pix models: A1111's Image CFG scale")
    sampler: str | None = None
    schedule_type: str | None = None
    follow: Literal[FOLLOW] | None = None
    eta: float | None = Field(None, ge=0, le=10)
    s_churn: float | None = Field(None, ge=0, le=100, description="Euler, Heun, DPM2: Karras' churn")
    s_tmin: float | None = Field(None, ge=0)
    s_tmax: float | None = Field(None, ge=0)
    s_noise: float | None = Field(None, ge=0, le=10, description="noise multiplier of the stochastic samplers")
    s_min_uncond: float = Field(0.0, ge=0, description="A1111's NGMS: below this sigma every second call is unguided")
    skip_guidance_layers: tuple[int, ...] = Field((), description="SD3 skip-layer guidance: MMDiT blocks (e.g. 7, 8, "
                                                  "9 for SD3.5 medium); empty: off")  # fmt: skip
    skip_layer_guidance_scale: float = Field(2.8, ge=0, le=100)
    skip_layer_guidance_start: float = Field(0.01, ge=0, le=1, description="fraction of the steps")
    skip_layer_guidance_stop: float = Field(0.2, ge=0, le=1, description="fraction of the steps")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="null: random (reported in the result)")
    subseed: int | None = Field(None, ge=0, le=MAX_SEED, description="variation seed; null: random when used")
    subseed_strength: float = Field(0.0, ge=0, le=1)
    seed_resize_from_w: int = Field(0, ge=0, le=MAX_SIZE, description="0: off")
    seed_resize_from_h: int = Field(0, ge=0, le=MAX_SIZE, description="0: off")
    rng: Literal[NOISE_MODES] = "torch-cpu"
    eta_noise_seed_delta: int = Field(0, ge=0, le=MAX_SEED, description="A1111's ENSD: sampler noise from seed + delta")
    batch_size: int = Field(1, ge=1)
    batch_count: int = Field(1, ge=1)
    clip_skip: int = Field(1, ge=1, le=12)
    init_image: str | None = None
    strength: float = Field(0.75, ge=0, le=1)
    resize_mode: Literal["resize", "crop", "fill", "latent"] = "resize"
    mask: str | None = Field(None, description="white = repaint; needs init_image")
    mask_blur: float = Field(0.0, ge=0, le=256)
    invert_mask: bool = False
    inpaint_full_res: bool = False
    inpaint_padding: int = Field(32, ge=0, le=8192)
    paste_back: bool = False
    inpainting_fill: Literal["fill", "original", "latent noise", "latent nothing"] = "original"
    initial_noise_multiplier: float = Field(1.0, ge=0, le=10)
    enable_hr: bool = Field(False, description="hires fix (txt2img): upscale the result, then img2img at that size "
                            "with `strength`")  # fmt: skip
    hr_scale: float = Field(2.0, gt=0, le=8)
    hr_upscaler: str = Field("Latent", description='"Latent" (bilinear), "Latent (antialiased)", "Latent (bicubic)", '
                             '"Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)", "None", '
                             '"Lanczos", "Nearest", or a model upscaler of --upscaler-dir ("R-ESRGAN 4x+", '
                             '...)')  # fmt: skip
    hr_second_pass_steps: int = Field(0, ge=0, description="0: steps")
    hr_resize_x: int = Field(0, ge=0, le=MAX_SIZE, description="0: width x hr_scale")
    hr_resize_y: int = Field(0, ge=0, le=MAX_SIZE, description="0: height x hr_scale")
    hr_sampler: str | None = Field(None, description="null: sampler")
    hr_schedule_type: str | None = Field(None, description="null: schedule_type")
    hr_prompt: str = Field("", description="empty: prompt")
    hr_negative_prompt: str = Field("", description="empty: negative_prompt")
    firstpass_image: str | None = Field(None, description="base64, width x height: the hires fix's first pass, given")
    tiling: bool = Field(False, description="seamless: every convolution pads circularly (A1111's Tiling)")
    tiled_vae: bool | None = None
    controlnet: list[UnitRequest] = Field([], description="ControlNet units; their residuals add up")
    ip_adapter_image: str | None = Field(None, description="an image prompt for the server's IP-Adapter (base64)")
    ip_adapter_scale: float = Field(1.0, ge=0, le=10, description="the image prompt's weight")
    sd_upscale: SDUpscaleRequest | None = Field(None, description='A1111\'s "SD upscale" script (img2img): upscale '
                                                "init_image, redraw it in width x height tiles, join them")  # fmt: skip
    save: bool = Field(False, description="also write the PNGs to the server's --output-dir")


class JobCreated(BaseModel):
    id: str
    status: str
    queue_position: int | None
    url: str
    events: str


def _to_generation(req: JobRequest, state: ServerState) -> GenerationRequest:
    max_pixels = state.config.limits.max_input_pixels
    images = {"init_image", "mask", "controlnet", "ip_adapter_image", "firstpass_image"}  # decoded below
    fields = req.model_dump(exclude={"model", "refiner", "hr_checkpoint", "save", "sd_upscale", *images})
    fields["controlnet"] = native_units(req.controlnet, state, max_pixels)
    if req.ip_adapter_image is not None:
        if state.engine.ip_adapter_title is None:
            raise invalid("ip_adapter_image", "this server has no IP-Adapter: start it with --ip-adapter FILE "
                          "--image-encoder DIR")  # fmt: skip
        fields["ip_adapter_image"] = codec.decode_image(req.ip_adapter_image, "ip_adapter_image", max_pixels)
    if req.init_image is not None:
        fields["init_image"] = codec.decode_image(req.init_image, "init_image", max_pixels).convert("RGB")
    if req.mask is not None:
        fields["mask"] = codec.decode_image(req.mask, "mask", max_pixels)
    if req.firstpass_image is not None:
        first = codec.decode_image(req.firstpass_image, "firstpass_image", max_pixels)
        fields["firstpass_image"] = first.convert("RGB")
    return GenerationRequest(**fields)


def job_view(job: Job, state: ServerState, request: Request) -> dict:
    """A job as the API shows it; finished images are linked, not inlined."""
    error = None
    if job.error is not None:
        error = {"message": job.error.message, "type": job.error.type, "code": job.error.code,
                 "status": job.error.status}  # fmt: skip
    view = {
        "id": job.id, "kind": job.kind, "status": job.status, "source": job.source, "model": job.model.name,
        "refiner": job.refiner.name if job.refiner else None,
        "hr_checkpoint": job.hires.name if job.hires else None,
        "queue_position": state.engine.position(job), "created": job.created, "started": job.started,
        "finished": job.finished, "textinfo": job.textinfo, "progress": job.step.as_dict() if job.step else None,
        "cancel_requested": job.control.cancelled and not job.terminal, "error": error, "warnings": job.warnings,
        "result": None,
    }  # fmt: skip
    images = job.images
    if images:
        result = job.result
        seeds = result.seeds if result else [job.request.seed + i for i in range(len(images))]
        texts = (result.infotexts if result else []) + [None] * len(images)
        view["result"] = {
            "images": [{"index": i, "seed": seed, "infotext": text,
                        "url": str(request.url_for("job_image", job_id=job.id, index=i))}
                       for i, (seed, text) in enumerate(zip(seeds, texts))],
            "parameters": (result.request if result else job.request).to_dict(),
            "timings": result.timings if result else None,
        }  # fmt: skip
    return view


def find_job(job_id: str, state: State) -> Job:
    job = state.engine.get(job_id)
    if job is None:
        raise ApiError(404, f"job {job_id!r} not found (finished jobs are kept for a while, then forgotten)",
                       param="job_id", code="job_not_found")  # fmt: skip
    return job


JobParam = Annotated[Job, Depends(find_job)]  # route parameter: the job named by {job_id}, or 404
router = APIRouter(prefix="/v1", tags=["Jobs"])


@router.post("/jobs", status_code=202, response_model=JobCreated)
async def create_job(request: Request, response: Response, req: JobRequest, state: State):
    model = state.model(req.model, "model")
    refiner = state.model(req.refiner, "refiner") if req.refiner else None
    if req.refiner_switch_at is not None and refiner is None:
        raise invalid("refiner_switch_at", "needs a refiner: name one in `refiner`")
    hires = state.model(req.hr_checkpoint, "hr_checkpoint") if req.hr_checkpoint else None
    if hires is not None and not req.enable_hr:
        raise invalid("hr_checkpoint", "runs the hires fix's second pass: set enable_hr")
    if req.save and state.config.output_dir is None:
        raise ApiError(422, "save: this server saves no files; start it with --output-dir DIR", param="save")
    gen = await run_in_threadpool(_to_generation, req, state)
    gen = check_request(gen, model, state.config.limits, upscalers=state.engine.upscalers)
    script = None
    if req.sd_upscale is not None:
        script = SDUpscale(**req.sd_upscale.model_dump())
        tiles = replace(gen, width=gen.width or model.defaults.width, height=gen.height or model.defaults.height)
        check_sd_upscale(tiles, script, state.engine.upscalers, "sd_upscale")
    hires = None if hires == model else hires
    job = state.engine.submit(Job(model, gen, refiner=refiner, hires=hires, source="native", save=req.save,
                                  sd_upscale=script))  # fmt: skip
    url = str(request.url_for("get_job", job_id=job.id))
    response.headers["Location"] = url
    return {"id": job.id, "status": job.status, "queue_position": state.engine.position(job), "url": url,
            "events": str(request.url_for("job_events", job_id=job.id))}  # fmt: skip


@router.get("/jobs")
def list_jobs(request: Request, state: State):
    return {"jobs": [job_view(j, state, request) for j in state.engine.jobs() if j.kind == "generate"]}


@router.get("/jobs/{job_id}", name="get_job")
def get_job(request: Request, job: JobParam, state: State):
    return job_view(job, state, request)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job: JobParam, state: State):
    if job.status in ("done", "failed"):
        raise ApiError(409, f"job {job.id} has already {'finished' if job.status == 'done' else 'failed'}",
                       code="job_finished")  # fmt: skip
    state.engine.cancel(job)
    return job_view(job, state, request)


@router.get("/jobs/{job_id}/images/{index}", name="job_image",
            responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}})  # fmt: skip
async def job_image(index: int, job: JobParam, format: Literal["png", "jpeg", "webp"] = "png"):
    images = job.images
    if not 0 <= index < len(images):
        raise ApiError(404, f"job {job.id} has {len(images)} images; no index {index}", param="index")
    text = job.result.infotexts[index] if job.result is not None else None
    data = await run_in_threadpool(codec.encode, images[index], text, format)
    return Response(data, media_type=codec.MEDIA_TYPES[codec.OUTPUT_FORMATS[format]])


@router.get("/jobs/{job_id}/preview", responses={200: {"content": {"image/png": {}}}})
def job_preview(job: JobParam):
    if job.preview is None:
        raise ApiError(404, f"job {job.id} has no preview yet", code="no_preview")
    return Response(codec.encode(job.preview), media_type="image/png")


@router.get("/jobs/{job_id}/events", name="job_events", response_class=EventSourceResponse)
async def job_events(request: Request, job: JobParam, state: State,
                     previews: bool = True) -> AsyncIterator[ServerSentEvent]:  # fmt: skip
    last_status, last_step = None, None
    async for _ in job.changes():
        if job.terminal:
            break
        status = (job.status, state.engine.position(job), job.textinfo)
        if status != last_status:
            last_status = status
            yield ServerSentEvent(event="status", data=job_view(job, state, request))
        step = job.step
        if step is not None and step is not last_step:
            last_step = step
            data = {"id": job.id, **step.as_dict()}
            if previews and job.preview is not None:
                data["preview"] = "data:image/png;base64," + codec.b64encode(codec.encode(job.preview))
            yield ServerSentEvent(event="progress", data=data)
    yield ServerSentEvent(event=job.status, data=job_view(job, state, request))


@router.get("/capabilities")
def capabilities(state: State):
    engine = state.engine
    models = []
    for entry in state.registry.list():
        d = entry.defaults
        models.append({
            "id": entry.name, "title": entry.title, "family": entry.info.family,
            "prediction_type": entry.info.prediction_type, "kind": entry.info.kind or "standard",
            "inpainting": entry.inpainting, "sha256": entry.info.sha256 or None,
            "defaults": {"width": d.width, "height": d.height, "steps": d.steps, "guidance": d.guidance,
                         "sampler": d.sampler, "schedule_type": d.schedule_type or "Automatic"},
            "samplers": entry.samplers,  # the samplers this model runs (SD3, EDM models: not every one)
            "current": entry == engine.default_model, "loaded": engine.loaded == entry,
        })  # fmt: skip
    return {
        "version": __version__, "backend": state.backend, "models": models,
        "samplers": [{"name": s.name, "aliases": list(s.aliases)} for s in list_samplers()],
        "schedule_types": ["Automatic"] + [s.label for s in SCHEDULE_TYPES.values()],
        "rng": list(NOISE_MODES), "limits": state.config.limits.as_dict(), "auth": state.config.auth_required,
        "controlnets": list(engine.controlnets.listing()) if engine.controlnets is not None else [],
        "controlnet_modules": list(MODULES), "ip_adapter": engine.ip_adapter_title,
        "upscalers": [*IMAGE_UPSCALERS, *(engine.upscalers.listing() if engine.upscalers is not None else ())],
        "latent_upscalers": list(LATENT_UPSCALERS),
        "apis": {"a1111": "/sdapi/v1", "openai": "/v1/images", "jobs": "/v1/jobs", "openapi": "/openapi.json"},
    }  # fmt: skip
