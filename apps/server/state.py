"""What every route needs: the engine, the model table, the configuration; and waiting for a job from a handler."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from .config import ServerConfig
from .engine import Engine, Job
from .errors import ApiError
from .registry import ModelEntry, ModelRegistry

DISCONNECT_POLL_S = 0.5  # how often a waiting handler checks that its client is still there


@dataclass
class ServerState:
    engine: Engine
    registry: ModelRegistry
    config: ServerConfig
    # A1111 options set through POST /sdapi/v1/options that apply to later requests.
    # A1111 options this server applies (set by POST /options); its sampler settings at A1111's defaults
    options: dict = field(
        default_factory=lambda: {"CLIP_stop_at_last_layers": 1, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0,
                                 "s_noise": 1.0, "eta_noise_seed_delta": 0}
    )  # fmt: skip
    backend: dict = field(default_factory=dict)  # what the worker runs on (mlx_sd.backend.describe())

    def model(self, key: str | None, param: str) -> ModelEntry:
        """The model a request names (None: the current default); 404 naming `param` when there is none."""
        if key is None or key == "":
            return self.engine.default_model
        entry = self.registry.find(key)
        if entry is None:
            names = ", ".join(e.name for e in self.registry.list())
            raise ApiError(404, f"{param}: model {key!r} not found; available: {names}", param=param,
                           code="model_not_found")  # fmt: skip
        return entry


def server(request: Request) -> ServerState:
    """FastAPI dependency: the running server's state."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server)]  # route parameter: the running server's state


async def run_to_completion(request: Request, state: ServerState, job: Job) -> Job:
    """Queue `job` and wait for it to finish; a client that hangs up cancels its job, freeing the worker."""
    state.engine.submit(job)
    waiter = asyncio.ensure_future(job.wait())
    try:
        while not waiter.done():
            await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if not waiter.done() and await request.is_disconnected():
                state.engine.cancel(job)
    finally:
        if not waiter.done():  # this handler was cancelled: nobody will read the result
            waiter.cancel()
            state.engine.cancel(job)
    return job
