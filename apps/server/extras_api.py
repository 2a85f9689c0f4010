"""A1111's Extras endpoints: `POST /sdapi/v1/extra-single-image` and `extra-batch-images` (upscaling).

The fields are A1111's (`ExtrasBaseRequest`): `resize_mode` 0 scales by `upscaling_resize`, 1 to
`upscaling_resize_w` x `upscaling_resize_h` (`upscaling_crop`: centred on that canvas); `upscaler_1`, `upscaler_2`
and `extras_upscaler_2_visibility` name the upscalers ("None", "Lanczos", "Nearest" and the models of
--upscaler-dir, as `GET /sdapi/v1/upscalers` lists them). Face restoration (GFPGAN, CodeFormer) is not available: a
visibility above 0 is refused. The work runs on the worker, queued behind generations (A1111 holds its queue lock),
and each PNG keeps the input's text chunks and gains A1111's "postprocessing" text (`mlx_sd.extras`).
"""

from __future__ import annotations

import html
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from mlx_sd.extras import POSTPROCESSING_KEY, extras_infotext, extras_upscale
from mlx_sd.upscale import IMAGE_UPSCALERS

from . import codec
from .engine import Job
from .errors import invalid
from .state import ServerState, State, run_to_completion
from .validation import MAX_UPSCALED_SIDE, check_upscaler


class ExtrasRequest(BaseModel):
    resize_mode: Literal[0, 1] = Field(0, description="0: scale by upscaling_resize; 1: scale to width x height")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, ge=0, le=1, description="face restoration: not available (0 only)")
    codeformer_visibility: float = Field(0, ge=0, le=1, description="face restoration: not available (0 only)")
    codeformer_weight: float = Field(0, ge=0, le=1)
    upscaling_resize: float = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1, le=MAX_UPSCALED_SIDE)
    upscaling_resize_h: int = Field(512, ge=1, le=MAX_UPSCALED_SIDE)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImageRequest(ExtrasRequest):
    image: str = Field("", description="base64 image (a data: URL prefix is accepted)")


class FileData(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasRequest):
    imageList: list[FileData] = Field(description="base64 images")  # noqa: N815 (A1111's name)


router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])


def _upscaler(name: str, state: ServerState, param: str):
    """A built-in upscaler's name, or a loader of the model of --upscaler-dir (called on the worker, where it runs)."""
    library = state.engine.upscalers
    return (lambda: library(name)) if check_upscaler(name, library, param, IMAGE_UPSCALERS) else name


def _checked(req: ExtrasRequest, state: ServerState, sizes: list[tuple[int, int]]):
    for field in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(req, field) > 0:
            raise invalid(field, "face restoration (GFPGAN, CodeFormer) is not available in mlx-sd; send 0")
    for width, height in sizes:
        if req.resize_mode == 0:
            out = (width * req.upscaling_resize, height * req.upscaling_resize)
        else:
            out = (req.upscaling_resize_w, req.upscaling_resize_h)
        if max(out) > MAX_UPSCALED_SIDE:
            raise invalid("upscaling_resize", f"a {width}x{height} image would become {int(out[0])}x{int(out[1])}; "
                          f"this server makes images up to {MAX_UPSCALED_SIDE} pixels a side")  # fmt: skip
    return _upscaler(req.upscaler_1, state, "upscaler_1"), _upscaler(req.upscaler_2, state, "upscaler_2")


async def _run(request: Request, req: ExtrasRequest, state: ServerState, images: list) -> tuple[list[str], str]:
    first, second = _checked(req, state, [image.size for image in images])

    def task() -> tuple[list[str], str]:
        up_1, up_2 = (u() if callable(u) else u for u in (first, second))
        encoded, info = [], {}
        for image in images:
            result, info = extras_upscale(
                image, up_1, scale=req.upscaling_resize,
                size=(req.upscaling_resize_w, req.upscaling_resize_h) if req.resize_mode == 1 else None,
                crop=req.upscaling_crop, upscaler_2=up_2, upscaler_2_visibility=req.extras_upscaler_2_visibility,
            )  # fmt: skip
            texts = codec.text_chunks(image) | ({POSTPROCESSING_KEY: extras_infotext(info)} if info else {})
            encoded.append(codec.b64encode(codec.encode(result, texts=texts)))
        return encoded, _html(extras_infotext(info))

    job = await run_to_completion(request, state, Job(state.engine.default_model, kind="task", task=task,
                                                      source="a1111"))  # fmt: skip
    if job.error is not None:
        raise job.error
    return job.output


def _html(text: str) -> str:
    """A1111's `plaintext_to_html`."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


@router.post("/extra-single-image")
async def extra_single_image(request: Request, req: ExtrasSingleImageRequest, state: State):
    image = await run_in_threadpool(codec.decode_image, req.image, "image", state.config.limits.max_input_pixels)
    images, info = await _run(request, req, state, [image])
    return {"html_info": info, "image": images[0]}


@router.post("/extra-batch-images")
async def extra_batch_images(request: Request, req: ExtrasBatchImagesRequest, state: State):
    if not req.imageList:
        raise invalid("imageList", "no images")
    if len(req.imageList) > state.config.limits.max_images:
        raise invalid("imageList", f"{len(req.imageList)} images; this server's limit is "
                      f"{state.config.limits.max_images}")  # fmt: skip
    pixels = state.config.limits.max_input_pixels
    decoded = await run_in_threadpool(
        lambda: [codec.decode_image(f.data, f"imageList[{i}].data", pixels) for i, f in enumerate(req.imageList)]
    )
    images, info = await _run(request, req, state, decoded)
    return {"html_info": info, "images": images}
