"""`mlx-sd serve`: a local HTTP server with AUTOMATIC1111, OpenAI Images and native job APIs, and a web page.

    app.py        the FastAPI application: routers, error shapes, authentication, browser guard, the page
    engine.py     one worker thread that owns the model, a bounded FIFO queue, jobs, cancellation
    a1111.py      /sdapi/v1 (A1111's field names, types and defaults); extras_api.py its Extras upscaling
    openai_api.py /v1/images/generations, /v1/images/edits, /v1/models
    jobs.py       /v1/jobs (+ server-sent events), /v1/capabilities
    registry.py   the models on offer (converted folders), looked up by name, never by path
    validation.py checks shared by the APIs; codec.py images in and out; config.py limits and auth settings
    static/index.html  the page (no build step)

The server's dependencies are an optional extra (`pip install 'mlx-sd[serve]'`); this module imports none of them,
so `mlx-sd serve` without them says how to install them.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

SERVE_EXTRA_HINT = "the server needs its optional dependencies: pip install 'mlx-sd[serve]'"


def add_parser(sub) -> None:
    from .config import Limits, ServerConfig

    limits, defaults = Limits(), ServerConfig()
    p = sub.add_parser("serve", help="run the local HTTP server (A1111 and OpenAI compatible APIs, web page)")
    p.add_argument("--model", help="initial model: a name in --models-dir, a converted folder, or anything "
                                   "`mlx-sd generate --model` accepts")  # fmt: skip
    p.add_argument("--models-dir", type=Path, help="folder of converted model folders clients can switch between")
    p.add_argument("--host", default=defaults.host, help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=defaults.port, help="default: %(default)s (A1111's port)")
    p.add_argument("--api-key", default=os.environ.get("MLX_SD_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $MLX_SD_API_KEY)")  # fmt: skip
    p.add_argument("--api-auth", default=os.environ.get("MLX_SD_API_AUTH"),
                   help="require HTTP basic auth, A1111 style: user:password[,user2:password2]")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=limits.max_queue,
                   help="requests waiting behind the running one; more get 503 (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-size", type=int, default=limits.max_width, help="largest width/height (default: %(default)s)")
    p.add_argument("--max-steps", type=int, default=limits.max_steps, help="default: %(default)s")
    p.add_argument("--max-images", type=int, default=limits.max_images,
                   help="images per request, batch size x count (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, default=limits.max_batch_size, help="default: %(default)s")
    p.add_argument("--max-prompt-length", type=int, default=limits.max_prompt_chars,
                   help="characters (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-body-mb", type=float, default=limits.max_body_bytes / 2**20,
                   help="request body size limit, base64 images included (default: %(default)s)")  # fmt: skip
    p.add_argument("--output-dir", type=Path, help="allow `save_images`: PNGs are written here")
    p.add_argument("--lora-dir", type=Path, help="folder of LoRA files for <lora:name:weight> in prompts")
    p.add_argument("--controlnet-dir", type=Path,
                   help="folder of ControlNets (files, diffusers folders) that requests name")  # fmt: skip
    p.add_argument(
        "--upscaler-dir",
        type=Path,
        metavar="DIR",
        help="folder of upscaler models (ESRGAN, SwinIR, DAT, ScuNET, HAT, SPAN, ...) for the hires fix and Extras",
    )
    p.add_argument("--ip-adapter", type=Path, metavar="FILE",
                   help="an IP-Adapter for image prompts (needs --image-encoder)")  # fmt: skip
    p.add_argument("--image-encoder", type=Path, metavar="DIR",
                   help="the IP-Adapter's CLIP image encoder, a transformers folder")  # fmt: skip
    p.add_argument("--embeddings-dir", type=Path,
                   help="folder of textual-inversion embeddings loaded into every model they fit")  # fmt: skip
    p.add_argument("--styles", type=Path, metavar="CSV",
                   help="A1111's styles.csv: prompt styles clients apply by name (`styles`)")  # fmt: skip
    p.add_argument("--cors-allow-origins", default="",
                   help="comma-separated browser origins allowed to call the API (default: only its own)")  # fmt: skip
    p.add_argument("--keep-jobs", type=int, default=defaults.keep_jobs, help="finished jobs kept for reading")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(run=run_serve)


def run_serve(args) -> None:
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: form uploads)
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError(SERVE_EXTRA_HINT) from None
    from .run import serve

    serve(args)
