"""Start the server from parsed CLI arguments; stop it cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import uvicorn

from mlx_sd import backend
from mlx_sd.model import MANIFEST

from ..errors import UserError
from ..models import resolve_model
from .app import create_app
from .config import LOOPBACK_HOSTS, MIB, Limits, ServerConfig, parse_api_auth, read_styles
from .engine import Engine
from .registry import ModelEntry, ModelRegistry
from .state import ServerState

GRACEFUL_SHUTDOWN_S = 15  # after SIGTERM, open connections get this long before they are closed


class _Server(uvicorn.Server):
    """uvicorn, but a stop signal first cancels the queued and running jobs, so waiting requests answer at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine
        self.stop_signal: int | None = None

    def handle_exit(self, sig, frame) -> None:
        self.stop_signal = sig
        self.engine.stop()
        super().handle_exit(sig, frame)


def _initial_model(args, registry: ModelRegistry) -> ModelEntry:
    if args.model:
        entry = registry.find(args.model) if registry.models_dir else None
        if entry is not None:
            return entry
        folder = resolve_model(args.model)
        return registry.entry_for(folder)
    models = registry.list()
    if models:
        return models[0]
    if args.models_dir:
        raise UserError(f"--models-dir {args.models_dir} holds no converted models (folders with {MANIFEST}); "
                        f"convert one with `mlx-sd convert`, or pass --model")  # fmt: skip
    return registry.entry_for(resolve_model(None))


def serve(args) -> None:
    if args.models_dir is not None and not Path(args.models_dir).is_dir():
        raise UserError(f"--models-dir {args.models_dir} is not a folder")
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        api_auth = parse_api_auth(args.api_auth)
        styles = read_styles(args.styles) if args.styles is not None else {}
    except ValueError as e:
        raise UserError(str(e)) from None
    minimum = {"max_queue": 0, "max_size": 64, "max_steps": 1, "max_images": 1, "max_batch_size": 1,
               "max_prompt_length": 1, "max_body_mb": 0.001}  # fmt: skip
    for name, least in minimum.items():
        if getattr(args, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    limits = Limits(
        max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps, max_images=args.max_images,
        max_batch_size=args.max_batch_size, max_prompt_chars=args.max_prompt_length,
        max_body_bytes=int(args.max_body_mb * MIB), max_queue=args.max_queue,
    )  # fmt: skip
    origins = tuple(o.strip().rstrip("/") for o in args.cors_allow_origins.split(",") if o.strip())
    config = ServerConfig(host=args.host, port=args.port, limits=limits, api_key=args.api_key or None,
                          api_auth=api_auth, allowed_origins=origins, output_dir=args.output_dir,
                          keep_jobs=args.keep_jobs, styles=styles)  # fmt: skip
    registry = ModelRegistry(args.models_dir)
    initial = _initial_model(args, registry)
    folders = (("--lora-dir", args.lora_dir), ("--embeddings-dir", args.embeddings_dir),
               ("--controlnet-dir", args.controlnet_dir), ("--upscaler-dir", args.upscaler_dir))  # fmt: skip
    if (args.ip_adapter is None) != (args.image_encoder is None):
        raise UserError("--ip-adapter FILE and --image-encoder DIR go together")
    if args.ip_adapter is not None and not args.ip_adapter.is_file():
        raise UserError(f"--ip-adapter {args.ip_adapter} is not a file")
    if args.image_encoder is not None and not args.image_encoder.is_dir():
        raise UserError(f"--image-encoder {args.image_encoder} is not a folder")
    for flag, folder in folders:
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"{flag} {folder} is not a folder")
    engine = Engine(initial, max_queue=limits.max_queue, keep_jobs=config.keep_jobs, output_dir=config.output_dir,
                    lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                    controlnet_dir=args.controlnet_dir, upscaler_dir=args.upscaler_dir,
                    ip_adapter=(args.ip_adapter, args.image_encoder) if args.ip_adapter else None)  # fmt: skip
    state = ServerState(engine, registry, config, backend=backend.describe())
    app = create_app(state)

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    if config.host not in LOOPBACK_HOSTS and not config.auth_required:
        print(f"mlx-sd serve: listening on {config.host} without --api-key or --api-auth: anyone who can reach "
              f"this machine can use the server", file=sys.stderr)  # fmt: skip
    names = ", ".join(e.name for e in registry.list())
    print(f"mlx-sd serve: model {initial.name} (available: {names}); http://{config.host}:{config.port}/",
          file=sys.stderr, flush=True)  # fmt: skip
    uv = uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)  # fmt: skip
    engine.start()
    server = _Server(uv, engine)
    try:
        server.run()
    finally:
        engine.stop()
        engine.join()
    if server.stop_signal == signal.SIGINT:
        # uvicorn re-raises SIGINT at the end of its coroutine, where asyncio's own SIGINT handler may only cancel a
        # task that is already finishing, and run() then returns normally: exit as interrupted (130) either way.
        raise KeyboardInterrupt
