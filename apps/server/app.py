"""The FastAPI application: the three APIs, the page, authentication, and the guards every request passes.

Guards, outermost first: CORS (only for origins given with --cors-allow-origins), then `BrowserGuard` (a browser
request from another origin, or with a Host header that is not this server's, is refused: a web page elsewhere
must not drive a local server, directly or through DNS rebinding), `BodyLimit`, then authentication on
every API route when a key or basic-auth users are configured. /health and the page itself stay open; the page
asks for the key when it needs one.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import asynccontextmanager
from importlib import resources
from secrets import compare_digest
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials, HTTPBearer
from fastapi.security.http import HTTPAuthorizationCredentials
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from mlx_sd import __version__

from . import a1111, controlnet_api, extras_api, jobs, openai_api
from .config import LOOPBACK_HOSTS
from .errors import ApiError, error_body
from .state import ServerState, State

log = logging.getLogger("mlx_sd.server")
LOCATION_PARTS = ("body", "query", "path", "header", "form", "cookie")


def _json_error(path: str, error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers)


def _validation_error(exc: RequestValidationError) -> ApiError:
    """Pydantic's errors as one message naming each field: "width: Input should be a multiple of 8"."""
    parts, first = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc holds a character position, not a field
            parts.append(f"body: invalid JSON ({err.get('ctx', {}).get('error', 'decode error')})")
            first = first or "body"
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in LOCATION_PARTS]
        field = ".".join(loc) or "body"
        first = first or field
        parts.append(f"{field}: {err.get('msg', 'invalid')}")
    return ApiError(422, "; ".join(parts) or "invalid request", param=first, code="invalid_value")


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, before reading them when Content-Length says so and
    while reading otherwise (chunked uploads). Pure ASGI, answering in the API's error shape."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = ApiError(413, f"request body larger than this server's limit of {self.limit} bytes "
                              f"(--max-body-mb)", code="body_too_large")  # fmt: skip
        length = Headers(scope=scope).get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _json_error(scope["path"], error)(scope, receive, send)
            return
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:  # FastAPI re-raises HTTPException from a body read as is
                    raise HTTPException(413, error.message)
            return message

        await self.app(scope, limited, send)


class BrowserGuard:
    """Refuse cross-origin browser requests and foreign Host headers (pure ASGI, so streaming is untouched)."""

    def __init__(self, app, allowed_origins: tuple[str, ...], allowed_hosts: tuple[str, ...] | None):
        self.app = app
        self.allowed_origins = set(allowed_origins)
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self._check(scope)
            if refusal is not None:
                await _json_error(scope["path"], ApiError(403, refusal, code="forbidden"))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, scope) -> str | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if self.allowed_hosts is not None and host:  # browsers always send Host; a bare HTTP/1.0 client may not
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in self.allowed_hosts:
                return f"Host {host!r} is not this server; connect to 127.0.0.1 or localhost"
        origin = headers.get("origin")
        if origin is None or origin in self.allowed_origins:
            return None
        if origin == f"{scope.get('scheme', 'http')}://{host}":
            return None
        return f"requests from the web page at {origin} are not allowed; start the server with " \
               f"--cors-allow-origins {origin} to allow them"  # fmt: skip


# Module level: FastAPI resolves the (postponed) annotations below in this module's namespace.
BEARER = HTTPBearer(auto_error=False, description="--api-key")
BASIC = HTTPBasic(auto_error=False, description="--api-auth user:password")


def _auth_dependency(state: ServerState):
    config = state.config

    def authenticate(token: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
                     credentials: Annotated[HTTPBasicCredentials | None, Depends(BASIC)]) -> None:  # fmt: skip
        if config.api_key and token is not None:
            if compare_digest(token.credentials.encode(), config.api_key.encode()):
                return
        if config.api_auth and credentials is not None:
            password = config.api_auth.get(credentials.username)
            if password is not None and compare_digest(credentials.password.encode(), password.encode()):
                return
        how = "Authorization: Bearer <key>" if config.api_key else "HTTP basic auth"
        raise ApiError(401, f"authentication required: send {how}", code="unauthorized",
                       headers={"WWW-Authenticate": "Basic" if config.api_auth else "Bearer"})  # fmt: skip

    return authenticate


def create_app(state: ServerState) -> FastAPI:
    """The application for a started or startable engine; `state.engine` is stopped when the app shuts down."""
    config = state.config

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.engine.stop()
        await run_in_threadpool(state.engine.join)

    app = FastAPI(
        title="mlx-sd", version=__version__, lifespan=lifespan,
        description="Stable Diffusion in MLX: AUTOMATIC1111-compatible (/sdapi/v1), OpenAI Images (/v1/images) "
                    "and native job (/v1/jobs) APIs.",
    )  # fmt: skip
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return _json_error(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return _json_error(request.url.path, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        headers = dict(exc.headers or {})
        return _json_error(request.url.path, ApiError(exc.status_code, str(exc.detail), headers=headers))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: answer 500, keep serving
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return _json_error(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}"))

    dependencies = [Depends(_auth_dependency(state))] if config.auth_required else []
    for router in (a1111.router, extras_api.router, controlnet_api.router, openai_api.router, jobs.router):
        app.include_router(router, dependencies=dependencies)

    @app.get("/health", tags=["Server"])
    def health(state: State):
        engine = state.engine
        running = engine.running()
        return {"status": "ok" if engine.alive else "stopping", "worker": "busy" if running else "idle",
                "queued": engine.queued(), "version": __version__}  # fmt: skip

    page = resources.files("mlx_sd_apps").joinpath("server/static/index.html")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        return HTMLResponse(page.read_text(encoding="utf-8"))

    app.add_middleware(BodyLimit, limit=config.limits.max_body_bytes)
    loopback = config.host in LOOPBACK_HOSTS
    app.add_middleware(BrowserGuard, allowed_origins=config.allowed_origins,
                       allowed_hosts=LOOPBACK_HOSTS if loopback else None)  # fmt: skip
    if config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["Retry-After", "X-MLX-SD-Ignored"])  # fmt: skip
    return app
