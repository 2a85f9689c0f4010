"""The OpenAI Images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`) for the `openai` SDKs.

OpenAI's model names (dall-e-2, dall-e-3, gpt-image-*) run the server's current model; any other name must be one of
this server's models. Parameters OpenAI has and mlx-sd cannot honour are refused only where they would change the
result (background="transparent"); quality, style, moderation and user are accepted and change nothing. With
stream=true the response is OpenAI's event stream: `partial_images` (0-3) previews while sampling, then one
completed event per image.
mlx-sd's own parameters ride along (the SDK's `extra_body`): negative_prompt, steps, guidance, sampler,
schedule_type, seed, and for edits strength. Unknown fields are listed in the `X-MLX-SD-Ignored` response header.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from mlx_sd.params import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, GenerationRequest

from . import codec
from .engine import Job
from .errors import ApiError, error_body, invalid
from .registry import ModelEntry
from .state import ServerState, State, run_to_completion
from .validation import MAX_SEED, check_request

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
MAX_N = 10  # OpenAI's limit on images per request
MAX_PARTIAL_IMAGES = 3  # OpenAI's range for partial_images: 0-3
NAMES = {"batch_count": "n", "width": "size", "height": "size", "init_image": "image"}
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, protected_namespaces=())

    prompt: str = Field(description="what to draw (A1111 emphasis syntax works)")
    model: str | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    size: str | None = Field("auto", description='"WIDTHxHEIGHT" (multiples of 8) or "auto" (the model\'s size)')
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = "png"
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: str | None = None
    style: str | None = None
    background: Literal["auto", "opaque", "transparent"] | None = None
    moderation: str | None = None
    user: str | None = None
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES)
    # mlx-sd's own parameters
    negative_prompt: str | None = None
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0, le=100)
    sampler: str | None = None
    schedule_type: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None
    background: str | None = None


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """ "512x768" -> (512, 768); "auto" or None -> the model's default size."""
    if size is None or size == "auto":
        return None, None
    w, x, h = size.lower().partition("x")
    if not x or not w.isdigit() or not h.isdigit() or len(w) > 5 or len(h) > 5:
        raise invalid("size", f'{size!r} is not "WIDTHxHEIGHT" or "auto"')
    width, height = int(w), int(h)
    for side in (width, height):
        if side % SIZE_MULTIPLE or not MIN_SIZE <= side <= MAX_SIZE:
            raise invalid("size", f"{size}: sides must be multiples of {SIZE_MULTIPLE} from {MIN_SIZE} to {MAX_SIZE}")
    return width, height


def _model(state: ServerState, name: str | None) -> ModelEntry:
    if name is None or name in OPENAI_MODELS:
        return state.engine.default_model
    return state.model(name, "model")


def _refuse(background: str | None) -> None:
    if background == "transparent":
        raise invalid("background", "transparent backgrounds are not supported; use 'opaque' or 'auto'")


async def _respond(request: Request, response: Response, state: ServerState, job: Job, response_format: str | None,
                   output_format: str, compression: int | None, ignored: list[str]) -> dict:  # fmt: skip
    await run_to_completion(request, state, job)
    if job.error is not None:
        raise job.error
    if job.status != "done":
        raise ApiError(409, "the generation was cancelled", code="cancelled")
    result = job.result
    if ignored:
        response.headers["X-MLX-SD-Ignored"] = ",".join(ignored)[:1000]
    data = []
    for i, (image, text) in enumerate(zip(result.images, result.infotexts)):
        if response_format == "url":
            data.append({"url": str(request.url_for("job_image", job_id=job.id, index=i)) + f"?format={output_format}"})
        else:
            raw = await run_in_threadpool(codec.encode, image, text, output_format, compression)
            data.append({"b64_json": codec.b64encode(raw)})
    r = result.request
    return {"created": int(job.finished or time.time()), "data": data, "output_format": output_format,
            "size": f"{r.width}x{r.height}", "background": "opaque"}  # fmt: skip


# OpenAI's completed events carry token counts (for its GPT image models); there are no tokens here.
_NO_USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
             "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}  # fmt: skip


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _partial(preview: Image.Image, size: tuple[int, int], output_format: str, compression: int | None) -> str:
    # The preview has one pixel per latent (a linear latent-to-RGB map, no VAE): scaled to the image's size so that a
    # client can show it where the final image will be.
    return codec.b64encode(codec.encode(preview.resize(size, Image.BILINEAR), None, output_format, compression))


def _stream(request: Request, state: ServerState, job: Job, kind: str, output_format: str, compression: int | None,
            partial_images: int) -> StreamingResponse:  # fmt: skip
    """OpenAI's image event stream: `{kind}.partial_image` events at evenly spaced points of the sampling (the
    latest preview), then one `{kind}.completed` event per image, in order; a failure is an `error` event, which the
    SDKs raise. A client that hangs up cancels its job."""
    state.engine.submit(job)  # a full queue is refused here, before the stream starts
    resolved = job.request.resolved(job.model.defaults, job.request.seed)  # "auto" sizes filled in
    size = (resolved.width, resolved.height)
    fields = {"background": "opaque", "output_format": output_format, "quality": "auto", "size": f"{size[0]}x{size[1]}"}

    def event(name: str, **data) -> bytes:
        return _sse(f"{kind}.{name}", {"type": f"{kind}.{name}", "created_at": int(time.time()), **data, **fields})

    async def events() -> AsyncIterator[bytes]:
        sent = 0
        try:
            async for _ in job.changes():
                step, preview = job.step, job.preview
                due = step is not None and step.fraction >= (sent + 1) / (partial_images + 1)
                if sent < partial_images and due and preview is not None and not job.terminal:
                    b64 = await run_in_threadpool(_partial, preview, size, output_format, compression)
                    yield event("partial_image", b64_json=b64, partial_image_index=sent)
                    sent += 1
            if job.status != "done":
                e = job.error or ApiError(409, "the generation was cancelled", code="cancelled")
                yield _sse("error", {"type": "error", **error_body(request.url.path, e)})
                return
            for image, text in zip(job.result.images, job.result.infotexts, strict=True):
                raw = await run_in_threadpool(codec.encode, image, text, output_format, compression)
                yield event("completed", b64_json=codec.b64encode(raw), usage=_NO_USAGE)
        finally:
            if not job.terminal:  # the client hung up (or the server is stopping): nobody will read the result
                state.engine.cancel(job)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


router = APIRouter(prefix="/v1", tags=["OpenAI Images"])
# With stream=true the 200 answer is OpenAI's event stream instead of the JSON body.
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}}


@router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True, responses=STREAMED)
async def generations(request: Request, response: Response, req: ImageGenerationRequest, state: State):
    _refuse(req.background)
    model = _model(state, req.model)
    width, height = parse_size(req.size)
    gen = GenerationRequest(
        prompt=req.prompt, negative_prompt=req.negative_prompt or "", width=width, height=height, steps=req.steps,
        guidance=req.guidance, sampler=req.sampler, schedule_type=req.schedule_type, seed=req.seed,
        batch_count=req.n or 1,
    )  # fmt: skip
    gen = check_request(gen, model, state.config.limits, NAMES)
    job = Job(model, gen, source="openai")
    if req.stream:
        return _stream(request, state, job, "image_generation", req.output_format or "png", req.output_compression,
                       req.partial_images or 0)  # fmt: skip
    return await _respond(request, response, state, job, req.response_format, req.output_format or "png",
                          req.output_compression, sorted(req.model_extra or {}))  # fmt: skip


def edit_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image | None:
    """OpenAI's mask convention -> mlx-sd's (white = repaint).

    OpenAI repaints where the mask (or, without a mask, the image itself) is fully transparent. A mask without an
    alpha channel is read as mlx-sd reads masks: white = repaint.
    """
    source = mask if mask is not None else image
    if source.mode in ("RGBA", "LA", "PA") or "transparency" in source.info:
        alpha = source.convert("RGBA").getchannel("A")
        if mask is None and alpha.getextrema()[0] > 0:
            return None  # an opaque image without a mask: edit the whole image (img2img)
        return alpha.point(lambda a: 255 if a == 0 else 0)
    return None if mask is None else mask.convert("L")


async def _read_upload(upload: UploadFile, field: str, max_pixels: int) -> Image.Image:
    raw = await upload.read()
    return await run_in_threadpool(codec.open_image, raw, field, max_pixels)


@router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True, responses=STREAMED)
async def edits(
    request: Request,
    response: Response,
    state: State,
    prompt: Annotated[str, Form()],
    image: Annotated[list[UploadFile] | None, File(description="the image to edit (PNG, JPEG, WebP)")] = None,
    image_array: Annotated[list[UploadFile] | None, File(alias="image[]")] = None,
    mask: Annotated[UploadFile | None, File(description="transparent where to repaint (OpenAI)")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int | None, Form(ge=1, le=MAX_N)] = 1,
    size: Annotated[str | None, Form()] = "auto",
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    output_format: Annotated[OutputFormat | None, Form()] = "png",
    output_compression: Annotated[int | None, Form(ge=0, le=100)] = None,
    background: Annotated[Literal["auto", "opaque", "transparent"] | None, Form()] = None,
    stream: Annotated[bool | None, Form()] = False,
    partial_images: Annotated[int | None, Form(ge=0, le=MAX_PARTIAL_IMAGES)] = None,
    quality: Annotated[str | None, Form()] = None,
    user: Annotated[str | None, Form()] = None,
    negative_prompt: Annotated[str | None, Form()] = None,
    steps: Annotated[int | None, Form(ge=1)] = None,
    guidance: Annotated[float | None, Form(ge=0, le=100, allow_inf_nan=False)] = None,
    sampler: Annotated[str | None, Form()] = None,
    schedule_type: Annotated[str | None, Form()] = None,
    seed: Annotated[int | None, Form(ge=0, le=MAX_SEED)] = None,
    strength: Annotated[float | None, Form(ge=0, le=1, allow_inf_nan=False)] = None,
):
    _refuse(background)
    uploads = (image or []) + (image_array or [])
    if len(uploads) != 1:
        raise invalid("image", f"send exactly one image ({len(uploads)} given)")
    entry = _model(state, model)
    max_pixels = state.config.limits.max_input_pixels
    init = await _read_upload(uploads[0], "image", max_pixels)
    mask_image = await _read_upload(mask, "mask", max_pixels) if mask is not None else None
    if mask_image is not None and mask_image.size != init.size:
        raise invalid("mask", f"is {mask_image.size[0]}x{mask_image.size[1]}; it must match the image "
                              f"({init.size[0]}x{init.size[1]})")  # fmt: skip
    repaint = edit_mask(init, mask_image)
    width, height = parse_size(size)
    gen = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt or "", width=width, height=height, steps=steps,
        guidance=guidance, sampler=sampler, schedule_type=schedule_type, seed=seed, batch_count=n or 1,
        init_image=init.convert("RGB"), strength=0.75 if strength is None else strength, mask=repaint,
        paste_back=repaint is not None,
    )  # fmt: skip
    gen = check_request(gen, entry, state.config.limits, NAMES)
    job = Job(entry, gen, source="openai")
    if stream:
        return _stream(request, state, job, "image_edit", output_format or "png", output_compression,
                       partial_images or 0)  # fmt: skip
    return await _respond(request, response, state, job, response_format, output_format or "png",
                          output_compression, [])  # fmt: skip


def _model_card(entry: ModelEntry) -> dict[str, Any]:
    try:
        created = int(entry.folder.stat().st_mtime)
    except OSError:
        created = 0
    return {"id": entry.name, "object": "model", "created": created, "owned_by": "mlx-sd"}


@router.get("/models")
def models(state: State):
    return {"object": "list", "data": [_model_card(e) for e in state.registry.list()]}


@router.get("/models/{model_id}")
def model(model_id: str, state: State):
    return _model_card(state.model(model_id, "model_id"))
